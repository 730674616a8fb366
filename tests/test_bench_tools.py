"""tools/bench_step.py runs at tiny sizes and measures (its timings are not checked)."""

# bench_step drives the trainer's own TrainStep, so a change to what the step asks of its
# collaborators must not break the benchmark unnoticed (it once did: a strategy stand-in lacked a
# method the FedMD work added).

import json
import sys
from pathlib import Path

import pytest

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
