"""The benchmarks run (tiny sizes; their timings are not checked, only that they measure):
`tools/bench_step.py` drives the trainer's own TrainStep, so a change to what the step asks of
its collaborators must not break the benchmark unnoticed (it once did: a strategy stand-in
lacked a method the FedMD work added)."""

import json
import sys
from pathlib import Path

import pytest

from conftest import run_mpi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_step  # noqa: E402


@pytest.mark.parametrize("precision,extra", [
    ("fp32", []),
    ("bf16", ["--peers", "1", "--top-k", "3", "--codec"]),
])
def test_bench_step_measures_the_framework_and_the_bare_loop(tmp_path, precision, extra):
    out = tmp_path / "step.json"
    args = ["--arch", "cnn_small", "--batch", "8", "--image-size", "8", "--aux-heads", "2",
            "--steps", "2", "--warmup", "1", "--repeats", "1", "--precision", precision,
            "--json", str(out), *extra]
    assert bench_step.main(args) == 0
    result = json.loads(out.read_text())
    assert result["precision"] == precision and result["peers"] == (1 if extra else 0)
    for key in ("bare_ms", "framework_ms", "ratio"):
        assert result[key] > 0
    assert ("codec_ms" in result) == bool(extra)


def test_bench_exchange_under_mpirun(tmp_path):
    out = tmp_path / "exchange.json"
    res = run_mpi(2, [str(ROOT / "tools" / "bench_exchange.py"), "--batch", "16",
                      "--classes", "20", "--heads", "2", "--emb", "8", "--steps", "3",
                      "--json", str(out)], timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())
    assert "top 1" in res.stdout and rows
