"""Run folders without MPI (mhd_hpc/run/folder.py): run identity, folders of other jobs."""

from mhd_hpc.config import RESUMABLE_CHANGES, JobConfig, load_config
from mhd_hpc.run.folder import fingerprint, identity

from conftest import ROOT


def test_run_identity_ignores_bookkeeping_keys_only():
    base = load_config(str(ROOT / "jobs" / "digits.yaml"))
    assert not any(k in identity(base) for k in RESUMABLE_CHANGES)
    longer = load_config(str(ROOT / "jobs" / "digits.yaml"), ["run.steps=900",
                                                              "run.out_dir=elsewhere"])
    assert fingerprint(longer) == fingerprint(base)
    other = load_config(str(ROOT / "jobs" / "digits.yaml"), ["distill.nu_aux=1"])
    assert fingerprint(other) != fingerprint(base)
    assert len(fingerprint(JobConfig())) == 16


def test_another_dataset_than_the_runs_is_refused_before_anything_is_written(tmp_path):
    from mhd_hpc.config import load_config
    from mhd_hpc.run.folder import claim_run_dir

    cfg = load_config(str(ROOT / "jobs" / "digits.yaml"), [f"run.out_dir={tmp_path / 'run'}"])
    folder, problem = claim_run_dir(cfg, "digest-a", {"p": 1})
    assert problem is None
    folder.lock.release()
    config = (tmp_path / "run" / "config.yaml").read_text()
    folder, problem = claim_run_dir(cfg, "digest-b", {"p": 2})
    assert folder is None and "data.root=data holds a different dataset" in problem
    # Every differing setting is named at once, with the overrides that resume the run.
    other = load_config(str(ROOT / "jobs" / "digits.yaml"),
                        [f"run.out_dir={tmp_path / 'run'}", "distill.nu_aux=1",
                         "distill.warmup_steps=7"])
    folder, problem = claim_run_dir(other, "digest-a", {"p": 1})
    assert "(and 1 more: distill.warmup_steps)" in problem
    assert "resume it with distill.nu_aux=3.0 distill.warmup_steps=100" in problem
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert '"p": 1' in (tmp_path / "run" / "partition.json").read_text()
