"""Image streams (mhd_hpc/data/read/streams.py, stream_factory.py): backends agree with StepBatches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from _jpeg_tree import build_dataset, make_image_folder
from mhd_hpc.data.read.batches import StepBatches, iterate_eval, load_split
from mhd_hpc.data.build.embedded import build_digits_shards
from mhd_hpc.data.manifest import load_manifest
from mhd_hpc.data.read.pil_stream import decode_pil, random_resized_box
from mhd_hpc.data.read.synthetic import synthetic_jpeg
from mhd_hpc.data.shards import Samples
from mhd_hpc.data.read.stream_factory import LOADERS, dali_available, open_stream
from mhd_hpc.data.read.feed import to_device
from mhd_hpc.data.read.streams import (
    SplitTable, centre_offset, resize_shorter_to, resized_size,
)

needs_dali = pytest.mark.skipif(
    not dali_available(), reason="nvidia.dali not importable (pip install nvidia-dali-cuda120)")
STD255 = 0.229 * 255  # one uint8 level is ~1/STD255 in normalised units


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, dict, dict]:
    root = tmp_path_factory.mktemp("jpegs")
    special = make_image_folder(root / "src")
    # Every split JPEG (as datasets built before): these tests compare the decode paths;
    # test_decoded_public_split_reads_raw covers the default layout.
    manifest = build_dataset(root / "src", root / "out", decode_public=False)
    return str(root / "out"), manifest, special


def _expected_keys(ds: str, manifest: dict, split: str, bs: int, seed: int, step: int,
                   part: int = 0, num_parts: int = 1) -> list[str]:
    table = SplitTable.load(ds, split, manifest)
    stub = Samples(table.keys, np.zeros((len(table), 0, 0, 0), np.uint8), table.labels)
    order = StepBatches(stub, bs, {}, seed, part=part, num_parts=num_parts)
    return [table.keys[i] for i in order.indices(step)]


def ready(batch):
    """What the model gets: the batch normalised (and mirrored) where it is used, here the CPU
    (loaders hand over raw uint8; devices.to_device finishes the job)."""
    return to_device(batch, torch.device("cpu"))


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same image up to resampler rounding (DALI float vs PIL fixed point): <= 2 uint8 levels."""
    d = (a - b).abs().flatten() * STD255
    assert d.mean() < 0.5 and d.max() < 2.5, (d.mean(), d.max())


def test_wds_order_matches_step_batches_and_resumes(dataset) -> None:
    ds, m, _ = dataset
    stream, name = open_stream(ds, "client_000", 5, seed=7, kind="public", loader="wds",
                               threads=0)
    assert name == "wds"
    steps = [0, 1, 2, 9, 3, 3]  # consecutive, a jump forward, a jump back (resume), a repeat
    got = {s: ready(stream.batch(s)) for s in steps}
    for s, b in got.items():
        assert b.keys == _expected_keys(ds, m, "client_000", 5, 7, s)
        assert b.images.shape == (5, 3, 32, 32) and b.images.dtype == torch.float32
        assert b.labels.dtype == torch.int64
    fresh, _ = open_stream(ds, "client_000", 5, seed=7, kind="public", loader="wds", threads=0)
    assert torch.equal(ready(fresh.batch(3)).images, got[3].images)
    # Parts of a client's ranks concatenate to the global batch.
    parts = [open_stream(ds, "public", 3, seed=1, kind="public", loader="wds", part=p,
                         num_parts=2, threads=0)[0].batch(4).keys for p in range(2)]
    assert parts[0] + parts[1] == _expected_keys(ds, m, "public", 3, 1, 4)
    assert len(parts[0]) == 2 and len(parts[1]) == 1
    # Evaluation parts are contiguous slices that together cover the split once.
    eval_keys = [k for p in range(3) for b in open_stream(
        ds, "test", 2, 0, "eval", loader="wds", part=p, num_parts=3, threads=0)[0].eval_batches()
        for k in b.keys]
    assert eval_keys == SplitTable.load(ds, "test", m).keys


def test_wds_workers_and_train_kind_deterministic(dataset) -> None:
    ds, _, _ = dataset
    a, _ = open_stream(ds, "client_001", 4, seed=2, kind="train", loader="wds", threads=2)
    seq = [a.batch(s) for s in range(4)]
    b, _ = open_stream(ds, "client_001", 4, seed=2, kind="train", loader="wds", threads=0)
    # Augmentation is a function of (seed, step, part): a resumed stream repeats it exactly.
    assert torch.equal(b.batch(2).images, seq[2].images)
    pub, _ = open_stream(ds, "client_001", 4, seed=2, kind="public", loader="wds", threads=0)
    assert pub.batch(2).keys == seq[2].keys
    assert not torch.equal(pub.batch(2).images, seq[2].images)
    a.close()


def test_reference_decode_of_gray_and_cmyk(dataset) -> None:
    """The PIL path equals an independent PIL reference on the odd-mode images."""
    ds, m, special = dataset
    for mode in ("L", "CMYK"):
        src = Image.open(special[mode]).convert("RGB")
        nw, nh = resized_size(*src.size, resize_shorter_to(32))
        x, y = centre_offset(nw, 32), centre_offset(nh, 32)
        ref = np.asarray(src.resize((nw, nh), Image.BILINEAR).crop((x, y, x + 32, y + 32)))
        key = "n0000000{0}_n0000000{0}_{1}".format(*((0, 1) if mode == "L" else (1, 2)))
        found = None
        for split in [s for s in m["splits"] if s != "test"]:
            stream, _ = open_stream(ds, split, 4, seed=0, kind="eval", loader="wds", threads=0)
            for b in map(ready, stream.eval_batches()):
                if key in b.keys:
                    found = b.images[b.keys.index(key)]
        assert found is not None, key
        mean = torch.tensor(m["normalize"]["mean"]).view(3, 1, 1)
        std = torch.tensor(m["normalize"]["std"]).view(3, 1, 1)
        pixels = (found * std + mean) * 255
        ref_t = torch.from_numpy(ref.transpose(2, 0, 1).copy()).float()
        assert (pixels - ref_t).abs().max() < 0.01
        if mode == "L":
            assert torch.allclose(pixels[0], pixels[1], atol=0.01)


@needs_dali
@pytest.mark.parametrize("split", ["public", "client_002"])
def test_dali_and_wds_agree_on_public_kind(dataset, split: str) -> None:
    ds, m, _ = dataset
    dali, name = open_stream(ds, split, 3, seed=5, kind="public", loader="dali", threads=1)
    auto_name = open_stream(ds, split, 3, seed=5, kind="public", loader="auto")[1]
    wds, _ = open_stream(ds, split, 3, seed=5, kind="public", loader="wds", threads=0)
    assert name == auto_name == "dali"
    # A resume backwards on one split (it rebuilds DALI's pipeline and spawns its workers:
    # seconds; a jump forward takes the same branch), straight steps on the other.
    steps = [0, 1, 2, 1] if split == "public" else [0, 1]
    for step in steps:
        a, b = ready(dali.batch(step)), ready(wds.batch(step))
        assert a.keys == b.keys == _expected_keys(ds, m, split, 3, 5, step)
        assert torch.equal(a.labels, b.labels)
        _close(a.images, b.images)
    assert dali.global_key_hash(4) == wds.global_key_hash(4)
    dali.close()


@needs_dali
def test_dali_and_wds_agree_on_eval_over_every_split(dataset) -> None:
    """Every sample once, in order; covers the grayscale and CMYK JPEGs wherever they landed."""
    ds, m, _ = dataset
    for split, count in m["counts"].items():
        out = {}
        for backend, threads in (("dali", 1), ("wds", 0)):  # wds decodes in-process here
            stream, _ = open_stream(ds, split, 5, seed=0, kind="eval", loader=backend,
                                    threads=threads)
            out[backend] = [ready(b) for b in stream.eval_batches()]
        keys = [k for b in out["wds"] for k in b.keys]
        assert keys == SplitTable.load(ds, split, m).keys and len(keys) == count
        assert [len(b) for b in out["wds"]][-1] == (count % 5 or 5)
        for a, b in zip(out["dali"], out["wds"]):
            assert a.keys == b.keys and torch.equal(a.labels, b.labels)
            _close(a.images, b.images)


@needs_dali
def test_dali_train_kind_shapes(dataset) -> None:
    ds, m, _ = dataset
    dali, _ = open_stream(ds, "client_000", 4, seed=3, kind="train", loader="dali", threads=1)
    wds, _ = open_stream(ds, "client_000", 4, seed=3, kind="train", loader="wds", threads=0)
    for step in (0, 1, 2):  # no jump: each would rebuild the pipeline (the public test jumps)
        a, b = ready(dali.batch(step)), ready(wds.batch(step))
        assert a.keys == b.keys and torch.equal(a.labels, b.labels)
        assert a.images.shape == b.images.shape == (4, 3, 32, 32)
        assert a.images.dtype == b.images.dtype == torch.float32
        assert a.images.abs().max() < 3.0  # normalised
    dali.close()


def test_npy_dataset_through_open_stream(tmp_path: Path) -> None:
    ds = build_digits_shards(str(tmp_path), num_clients=2, public_fraction=0.1,
                             label_assignment="random", labels_per_client=3, skew=10.0, seed=0)
    stream, name = open_stream(ds, "client_000", 8, seed=4, kind="train", loader="auto")
    assert name == "memory"  # .npy samples are served from memory: no loader decodes them
    samples = load_split(ds, "client_000")
    norm = load_manifest(ds)["normalize"]
    ref = StepBatches(samples, 8, norm, seed=4)
    for step in (0, 3, 1):
        a, b = ready(stream.batch(step)), ref.batch(step)
        assert a.keys == b.keys and torch.equal(a.images, b.images)
    test, _ = open_stream(ds, "test", 50, seed=0, kind="eval", loader="wds")
    got = list(test.eval_batches())
    want = list(iterate_eval(load_split(ds, "test"), 50, norm))
    assert [b.keys for b in got] == [b.keys for b in want]
    with pytest.raises(ValueError, match="npy.*loader='wds'"):
        open_stream(ds, "public", 8, seed=0, kind="public", loader="dali")


def test_open_stream_errors(dataset) -> None:
    ds, _, _ = dataset
    with pytest.raises(ValueError, match="unknown loader "):
        open_stream(ds, "public", 2, 0, "public", loader="torchvision")
    with pytest.raises(ValueError, match="unknown stream kind"):
        open_stream(ds, "public", 2, 0, "augmented")
    with pytest.raises(ValueError, match="split 'nope' not in"):
        open_stream(ds, "nope", 2, 0, "public")
    stream, _ = open_stream(ds, "test", 2, 0, "eval", loader="wds")
    with pytest.raises(ValueError, match="batch\\(step\\) needs kind"):
        stream.batch(0)


def test_loader_factory_rejects_dali(tmp_path: Path) -> None:
    # The backend choice moved from load_split (a .npy reader only) to the stream factory: an
    # .npy dataset cannot be read by DALI, and an unknown backend names the valid ones.
    d0 = build_digits_shards(str(tmp_path), num_clients=2, public_fraction=0.1,
                             label_assignment="random", labels_per_client=3, skew=10.0, seed=0)
    with pytest.raises(ValueError, match="DALI loader reads JPEG shards only.*wds"):
        open_stream(d0, "test", 8, 0, "eval", loader="dali")
    with pytest.raises(ValueError, match="unknown loader ") as err:
        open_stream(d0, "test", 8, 0, "eval", loader="pillow")
    assert all(b in str(err.value) for b in LOADERS)


def test_decoded_public_split_reads_raw_with_every_loader(tmp_path: Path) -> None:
    """The default build stores public and test decoded: whatever data.loader says, they are
    read as raw uint8 records (no decode), equal to what the PIL loader makes of the JPEGs."""
    make_image_folder(tmp_path / "src")
    jpeg = build_dataset(tmp_path / "src", tmp_path / "jpeg", decode_public=False)
    raw = build_dataset(tmp_path / "src", tmp_path / "raw")
    assert raw["split_formats"] == {"public": "u8", "test": "u8"} and "split_formats" not in \
        {k for k, v in jpeg.items() if v}
    loaders = ["wds", "auto"] + (["dali"] if dali_available() else [])
    for loader in loaders:
        stream, name = open_stream(str(tmp_path / "raw"), "public", 3, seed=5, kind="public",
                                   loader=loader, threads=0)
        ref, _ = open_stream(str(tmp_path / "jpeg"), "public", 3, seed=5, kind="public",
                             loader="wds", threads=0)
        assert name == "raw"
        for step in (0, 4):
            a, b = stream.batch(step), ref.batch(step)
            assert a.keys == b.keys and torch.equal(a.labels, b.labels)
            assert torch.equal(a.images, b.images)  # the same PIL transform, once at build


@pytest.mark.parametrize("wh,size", [((500, 375), 224), ((375, 500), 224), ((90, 60), 64)])
def test_train_decode_equals_pil_bilinear_up_to_rounding(wh, size) -> None:
    """The train transform's resize (torch's uint8 antialiased kernel) gives PIL's BILINEAR
    pixels for the same random box: crops larger than S (downscaled) and smaller (upscaled).
    (No crop here is twice S, so no DCT-scaled draft: the next test covers that.)"""
    rng = np.random.default_rng(3)
    diffs = []
    for k in range(12):
        data = synthetic_jpeg(rng, *wh)
        got, flip = decode_pil(data, size, True, np.random.default_rng(k))
        assert got.shape == (3, size, size) and got.dtype == np.uint8
        ref_rng = np.random.default_rng(k)  # the same draws: box, then the flip
        x, y, cw, ch = random_resized_box(*wh, ref_rng)
        assert flip == bool(ref_rng.random() < 0.5)
        src = Image.open(io.BytesIO(data)).convert("RGB")
        ref = np.asarray(src.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch)))
        diffs.append(np.abs(got.transpose(1, 2, 0).astype(int) - ref.astype(int)))
    d = np.stack(diffs)
    # Measured: mean 0.01 levels downscaling, 0.07 upscaling (weights rounded differently;
    # 0.6 % of pixels of the upscaled crops differ by more than 2 levels).
    assert d.mean() < 0.1 and (d > 2).mean() < 0.01, (d.mean(), (d > 2).mean())


def test_train_decode_of_a_large_jpeg_uses_the_draft() -> None:
    """A crop many times S decodes DCT-scaled (the box follows the smaller image) and still
    gives the crop's content: close to resizing the full-size decode."""
    data = synthetic_jpeg(np.random.default_rng(0), 1600, 1200)
    got, _ = decode_pil(data, 32, True, np.random.default_rng(5))
    x, y, cw, ch = random_resized_box(1600, 1200, np.random.default_rng(5))
    assert min(cw, ch) >= 4 * 32  # the draft scales this crop by at least 1/4
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(
        (32, 32), Image.BILINEAR, box=(x, y, x + cw, y + ch)))
    diff = np.abs(got.transpose(1, 2, 0).astype(int) - ref.astype(int))
    assert diff.mean() < 4, diff.mean()


@needs_dali
def test_dali_cpu_train_crops_resized_by_torch_match_dalis_resize() -> None:
    """The CPU train graph hands out ROI-decoded crops and flips; resized by torch and mirrored
    where used, they equal DALI's own resize + mirror of the same draws up to rounding."""
    from nvidia.dali import fn, pipeline_def, types

    from mhd_hpc.data.read.dali_streams import _images, build_pipeline

    rng = np.random.default_rng(3)
    jpegs = [np.frombuffer(synthetic_jpeg(rng, w, h), np.uint8)
             for w, h in [(500, 375), (375, 500), (400, 300), (90, 60)] * 4]
    size, norm = 64, {"mean": [0.5] * 3, "std": [0.25] * 3, "scale": 1 / 255}

    def source(info):
        return jpegs

    ours = build_pipeline(source, True, size, norm, len(jpegs), threads=1, seed=11)

    @pipeline_def(batch_size=len(jpegs), num_threads=1, device_id=None, seed=11)
    def reference():
        data = fn.external_source(source=source, batch=True, batch_info=True,
                                  dtype=types.UINT8, ndim=1)
        # The same random operators in the same order: the same draws.
        crops = fn.decoders.image_random_crop(
            data, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0],
            random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        mirror = fn.random.coin_flip(probability=0.5)
        images = fn.resize(crops, size=[size, size], interp_type=types.INTERP_LINEAR,
                           antialias=True)
        return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8,
                                        output_layout="CHW"), mirror

    ref = reference()
    ref.build()
    for _ in range(2):
        outs = ours.run()
        assert len(outs) == 2 and {tuple(np.asarray(c).shape)[2] for c in outs[0]} == {3}
        images, flips = _images(outs, size)
        expected, mirror = ref.run()
        want = torch.from_numpy(np.array(expected.as_tensor())).float()
        assert flips is not None and flips.tolist() == (np.array(mirror.as_tensor()) != 0).tolist()
        assert 0 < int(flips.sum()) < len(jpegs)
        got = images.clone()
        got[flips] = got[flips].flip(-1)
        assert images.shape == want.shape == (len(jpegs), 3, size, size)
        d = (got.float() - want).abs()
        # Inside, the same filter up to rounding; on the outermost pixels of strong
        # downscales DALI clamps the filter at the border where torch (like PIL) renormalises
        # the weights inside the image: up to 16 levels on 0.07 % of the pixels here.
        assert d.mean() < 0.5 and d[..., 1:-1, 1:-1].max() <= 2, (d.mean(), d.max())
        assert (d > 3).float().mean() < 0.005


def test_resize_crops_on_threads_equals_serial() -> None:
    from concurrent.futures import ThreadPoolExecutor

    from mhd_hpc.data.read.streams import resize_crops, resize_uint8

    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
             for h, w in [(300, 200), (40, 50), (224, 224), (375, 500)]]
    serial = resize_crops(crops, 48)
    with ThreadPoolExecutor(3) as pool:
        threaded = resize_crops(crops, 48, pool)
    assert serial.shape == (4, 3, 48, 48) and serial.dtype == torch.uint8
    assert torch.equal(serial, threaded)
    assert np.array_equal(serial[2].numpy(), resize_uint8(crops[2], 48))


def test_wds_ring_slots_are_not_overwritten_while_read(dataset) -> None:
    """Workers decode into a reused ring of shared-memory slots: with a slow taker, workers
    that ran ahead must not overwrite a slot before it is copied out (many laps of the ring),
    and an eval pass in between (in process, threads=0) must not redirect the train writes."""
    import time

    ds, _, _ = dataset
    ref, _ = open_stream(ds, "client_001", 4, seed=9, kind="train", loader="wds", threads=0)
    want = [ref.batch(s) for s in range(14)]
    fast, _ = open_stream(ds, "client_001", 4, seed=9, kind="train", loader="wds", threads=2,
                          prefetch=1)  # a ring of 2 * 1 + 2 = 4 slots: 3 laps
    for s in range(14):
        got = fast.batch(s)
        time.sleep(0.05)  # the workers run ahead meanwhile
        assert torch.equal(got.images, want[s].images), s
        assert got.flip is None and want[s].flip is None or torch.equal(got.flip, want[s].flip)
    fast.close()
    mixed, _ = open_stream(ds, "client_001", 4, seed=9, kind="train", loader="wds", threads=0)
    first = mixed.batch(0)
    evals = [b.images.clone() for b in mixed.eval_batches()]
    assert torch.equal(first.images, want[0].images)
    assert torch.equal(mixed.batch(1).images, want[1].images) and evals
    assert [torch.equal(a, b.images) for a, b in zip(evals, mixed.eval_batches())] == \
        [True] * len(evals)
    ref.close()
    mixed.close()
