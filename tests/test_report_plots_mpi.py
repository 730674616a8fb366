"""Seeing the results under real mpirun (issue 13): figures, comparison, TensorBoard, ETA."""

# Every figure from short real runs, the side-by-side comparison, TensorBoard event files without
# duplicated steps after a resume, and the progress line's throughput and ETA.

import json
import re

import pytest

pytest.importorskip("matplotlib", reason="pip install -e '.[plot]'")

import numpy as np  # noqa: E402

from mhd_hpc.report import main as report_main  # noqa: E402
from mhd_hpc.run.metrics_file import read_metrics  # noqa: E402

from conftest import SMALL, run_mpi, train_args  # noqa: E402

SHORT = [*SMALL, "run.steps=20", "run.log_every=5"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_root):
    """A prediction-mode run (cycle, probe, TensorBoard) and a pool-mode run."""
    base = tmp_path_factory.mktemp("runs")
    live, pool = base / "live", base / "pool"
    res = run_mpi(2, train_args(live, data_root, *SHORT, "topology.kind=cycle",
                                "eval.probe=true", "run.tensorboard=true"), timeout=240)
    assert res.returncode == 0, res.stderr
    res_pool = run_mpi(2, train_args(pool, data_root, *SHORT, "exchange.mode=pool",
                                     "exchange.pool_every=5", "exchange.pool_transfer_steps=2"),
                       timeout=240)
    assert res_pool.returncode == 0, res_pool.stderr
    return live, pool, res.stdout + res.stderr


@pytest.mark.slow
def test_every_figure_is_drawn(runs, tmp_path, capsys):
    live, pool, _ = runs
    assert report_main([str(live), "--plot", str(tmp_path / "live")]) == 0
    names = sorted(p.name for p in (tmp_path / "live").iterdir())
    assert names == ["accuracy.png", "by_distance.png", "cross_client.png", "losses.png",
                     "timing.png"]
    assert report_main([str(pool), "--plot"]) == 0  # default: RUN_DIR/plots
    pool_names = sorted(p.name for p in (pool / "plots").iterdir())
    assert pool_names == sorted(names + ["staleness.png"])
    for path in [*(tmp_path / "live").iterdir(), *(pool / "plots").iterdir()]:
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, path
    out = capsys.readouterr().out
    assert "linear probe on the frozen embedding" in out


@pytest.mark.slow
def test_runs_side_by_side(runs, tmp_path, capsys):
    live, pool, _ = runs
    assert report_main([str(live), str(pool), "--json"]) == 0
    comp = json.loads(capsys.readouterr().out)
    assert {"exchange.mode", "topology.kind", "eval.probe"} <= set(comp["differing"])
    assert [r["run"] for r in comp["runs"]] == ["live", "pool"]
    assert comp["runs"][1]["settings"]["exchange.mode"] == "pool"
    assert all(r["step"] == 20 and r["mb_sent"] > 0 for r in comp["runs"])
    assert report_main([str(live), str(pool), "--plot", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| run | ") and "| live |" in table
    assert (tmp_path / "compare.png").read_bytes().startswith(PNG)


@pytest.mark.slow
def test_progress_line_has_throughput_and_eta(runs):
    _, _, stdout = runs
    line = next(l for l in stdout.splitlines() if "step      5/20" in l)
    assert "samples/s per client (private + public)" in line and "| ETA " in line
    assert "(unweighted) | weighted total " in line
    assert re.search(r"sent \d+\.\d\d MB/client this interval \(\d+\.\d MB total\)", line)


@pytest.mark.slow
def test_a_short_run_says_so_and_prints_no_reprs(runs, capsys):
    """20 steps with the default 100-step distillation warm-up: one note at the start naming
    the keys and steps, "not judged" in the report; no numpy, object or signal-number reprs."""
    live, _, output = runs
    notes = [l for l in output.splitlines() if "NOTE: this short run" in l]
    assert len(notes) == 1 and "run.steps=20" in notes[0]
    assert "distill.warmup_steps=100" in notes[0] and "first judged step 100" in notes[0]
    assert "judged no evaluation of this run" in output
    for pattern in (r"np\.(int|float)\d+\(", r"object at 0x", r"signal \d"):
        assert not re.search(pattern, output), pattern
    assert report_main([str(live)]) == 0
    assert "HEALTH NOT JUDGED" in capsys.readouterr().out


@pytest.mark.slow
def test_tensorboard_resumes_without_duplicated_steps(tmp_path, data_root):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    job = [*SHORT, "run.steps=30", "run.tensorboard=true"]
    res = run_mpi(2, train_args(run, data_root, *job), env={"MHD_INJECT_FAULT": "1:28"},
                  timeout=240)
    assert res.returncode != 0  # logged 5..25, checkpointed 10 and 20, died at 28
    res = run_mpi(2, train_args(run, data_root, *job), timeout=240)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == ["client0", "client1",
                                                                        "mean"]
    for name in ("client0", "client1", "mean"):  # one TensorBoard run each, the same tags
        events = EventAccumulator(str(run / "tensorboard" / name))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss_ce")] == [5, 10, 15, 20, 25, 30]
        assert [e.step for e in events.Scalars("eval/beta_sh/aux2")] == [10, 20, 30]
    # The resumed process continues the run's wall time instead of starting again at 0.
    wall = read_metrics(run / "metrics.h5")["train"]["wall_s"].max(axis=1)
    assert np.all(np.diff(wall) > 0), wall
