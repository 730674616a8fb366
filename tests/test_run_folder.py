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


def test_a_methods_own_key_is_part_of_that_methods_identity_only():
    """separate.self_distill (added after run folders existed, old behaviour: true) leaves the
    fingerprint of every other method alone whatever its value, and a separate run from before
    it (no such key in its saved config) keeps its fingerprint and resumes as it trained."""
    from mhd_hpc.config import config_from_saved
    from mhd_hpc.run.folder import legacy_fingerprint

    job = str(ROOT / "jobs" / "digits.yaml")
    mhd = load_config(job)
    assert "separate.self_distill" not in identity(mhd)
    assert fingerprint(mhd) == fingerprint(load_config(job, ["separate.self_distill=true"]))
    first = config_from_saved({})  # every later-added key at its old value: a first-version run
    first.separate.self_distill = False  # what such a run now reads when the key is new
    assert legacy_fingerprint(first) not in ("-", legacy_fingerprint(JobConfig()))
    first.separate.self_distill = True
    assert legacy_fingerprint(first) == legacy_fingerprint(config_from_saved({}))
    paper = load_config(job, ["method=separate"])
    ablation = load_config(job, ["method=separate", "separate.self_distill=true"])
    assert "separate.self_distill" in identity(paper)
    assert fingerprint(paper) != fingerprint(ablation)
    saved = ablation.to_dict()
    del saved["separate"]  # what a run folder written before the key holds
    old = config_from_saved(saved)
    assert old.separate.self_distill is True and fingerprint(old) == fingerprint(ablation)
