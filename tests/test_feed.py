"""Batches to the device (mhd_hpc/data/read/feed.py): uint8 mirrored and normalised where the
model is, and the feed that prepares the next step's batch on its own thread."""

import pytest
import torch


class _SteppedStream:
    """A stream whose batch is a pure function of the step (uint8, with normalise and flip)."""

    def batch(self, step: int):
        from mhd_hpc.data.read.batches import Batch

        g = torch.Generator().manual_seed(step)
        images = torch.randint(0, 256, (4, 3, 5, 5), generator=g, dtype=torch.uint8)
        return Batch(keys=[f"{step}-{i}" for i in range(4)], images=images,
                     labels=torch.arange(4) + step,
                     normalize={"scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.4]},
                     flip=torch.tensor([True, False, step % 2 == 0, False]))


def test_cpu_feed_finishes_batches_in_the_background(monkeypatch):
    """On a CPU the feed's background thread normalises and mirrors step t + 1 while step t
    trains: the training thread only hands over, and the batches are exactly to_device's, in
    order and after a jump (a resume)."""
    import threading

    from mhd_hpc.data.read import feed as feed_module

    threads: list[str] = []
    real = feed_module.normalize_tensor

    def recording(images, spec):
        threads.append(threading.current_thread().name)
        return real(images, spec)

    monkeypatch.setattr(feed_module, "normalize_tensor", recording)
    stream, cpu = _SteppedStream(), torch.device("cpu")
    feed = feed_module.BatchFeed(stream, cpu)
    try:
        for step in [0, 1, 2, 3, 7, 8]:
            got = feed.batch(step)
            want = feed_module.to_device(stream.batch(step), cpu)
            assert got.keys == want.keys and torch.equal(got.labels, want.labels)
            assert got.normalize is None and got.flip is None
            assert torch.equal(got.images, want.images), step
    finally:
        feed.close()
    # every "want" above ran on this thread; of the feed's own work only the first batch and
    # the jump to step 7 (nothing prefetched for them) ran here
    main = threading.current_thread().name
    assert threads.count(main) == 6 + 2
    assert sum(name.startswith("batch-feed") for name in threads) == len(threads) - 8 >= 4


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_mirror_flips_exactly_the_marked_samples(dtype):
    from mhd_hpc.data.read.feed import mirror

    images = torch.randint(0, 256, (5, 3, 4, 6)).to(dtype)
    before = images.clone()
    flip = torch.tensor([True, False, True, True, False])
    out = mirror(images, flip)
    assert torch.equal(out, torch.where(flip[:, None, None, None], images.flip(-1), images))
    assert torch.equal(out[0, :, :, 0], images[0, :, :, -1]) and torch.equal(out[1], images[1])
    assert torch.equal(images, before)  # the given batch is left as it is
    # A channels-last view mirrors the same pixels.
    cl = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(mirror(cl, flip), out)


def test_to_device_numbers_are_the_normalise_then_mirror_definition():
    """Mirroring the uint8 batch before the normalisation gives the same bits as normalising
    first (the order the numbers were defined in)."""
    from mhd_hpc.data.read.batches import normalize_tensor
    from mhd_hpc.data.read.feed import to_device

    batch = _SteppedStream().batch(2)
    want = normalize_tensor(batch.images, batch.normalize)
    want = torch.where(batch.flip[:, None, None, None], want.flip(-1), want)
    got = to_device(batch, torch.device("cpu"))
    assert got.flip is None and got.normalize is None and torch.equal(got.images, want)
