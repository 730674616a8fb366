"""tools/bench_step.py, tools/bench_batched_clients.py and tools/bench_privacy.py run at tiny
sizes and measure (their timings are not checked)."""

# bench_step drives the trainer's own TrainStep, so a change to what the step asks of its
# collaborators must not break the benchmark unnoticed (it once did: a strategy stand-in lacked a
# method the FedMD work added).

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_batched_clients  # noqa: E402
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


def test_bench_loader_runs_every_stream_through_the_trainers_path(tmp_path):
    """The loader benchmark at toy sizes, both streams (train and public) read at each step.
    Its figures for docs/performance.md are not checked, but what the training-thread figure
    is for is: loader-bound (no step between batches) the training thread waits for every
    batch to be read; with a device step between batches (``--step-ms``) the feed reads the
    next batch during the step, so the training thread only takes it over, in a fraction of
    that time, and the step bounds the rate. (Every measurement spawns a process that imports
    torch, seconds each: two, without loader workers, keep the quick subset quick.)"""
    import bench_loader

    dataset = bench_loader.make_dataset(tmp_path, 40, 32)  # once: seconds
    args = ["--dataset", str(dataset), "--batch", "4", "--ranks", "1", "--seconds", "0.25",
            "--loaders", "wds", "--streams", "train+public",
            "--threads", "0"]  # decode on the feed's thread: no worker process to start
    out = tmp_path / "loader.json"
    assert bench_loader.main([*args, "--json", str(out)]) == 0
    [bound] = json.loads(out.read_text())
    assert bound["streams"] == "train+public"
    assert bound["img_s"] > 0 and bound["train_thread_ms_per_batch"] > 0
    paced = tmp_path / "paced.json"
    assert bench_loader.main([*args, "--step-ms", "40", "--json", str(paced)]) == 0
    [hidden] = json.loads(paced.read_text())
    waited = bound["train_thread_ms_per_batch"]  # the same streams, loader-bound
    assert 0 < hidden["train_thread_ms_per_batch"] < 0.75 * waited, (hidden, bound)
    assert hidden["img_s"] <= 2 * 4 / 0.04 * 1.05  # at most a batch of 4 per stream and step


def test_bench_loader_max_side_stores_the_training_jpegs_smaller(tmp_path):
    """--max-side builds the training JPEGs as make_shards --max-side does: none is larger."""
    import io
    import tarfile

    import bench_loader
    from PIL import Image

    out = Path(bench_loader.make_dataset(tmp_path, 20, 32, max_side=100))
    sides = []
    for tar in sorted(out.rglob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    sides.append(max(Image.open(io.BytesIO(t.extractfile(m).read())).size))
    assert len(sides) >= 10 and max(sides) == 100  # generated at 500 px and more


def test_bench_batched_clients_computes_the_same_losses_both_ways(capsys):
    args = ["--arch", "cnn_small", "--channels", "3", "--size", "8", "--aux-heads", "2",
            "--batch", "4", "--public-batch", "4", "--clients", "1", "3", "--warmup", "0",
            "--repeats", "1"]
    assert bench_batched_clients.main(args) == 0  # exits with the two losses if they differ
    out = capsys.readouterr().out
    assert "| 3 |" in out and "| 1 |" in out


def test_bench_privacy_times_the_private_and_the_plain_step(tmp_path):
    import bench_privacy

    out = tmp_path / "privacy.json"
    args = ["--arch", "cnn_small", "--image-size", "8", "--aux-heads", "2", "--batch", "5",
            "--public-batch", "4", "--chunk", "2", "--steps", "2", "--warmup", "1",
            "--repeats", "1", "--json", str(out)]
    assert bench_privacy.main(args) == 0
    result = json.loads(out.read_text())
    assert result["private_ms"] > 0 and result["plain_ms"] > 0 and result["chunk"] == 2
