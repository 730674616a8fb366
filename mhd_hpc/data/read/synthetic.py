"""Synthetic JPEGs for tests and benchmarks (nothing downloads on the build machines)."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["synthetic_jpeg"]


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, mode: str = "RGB",
                   quality: int = 90) -> bytes:
    """A natural-ish image: gradients + random shapes + mild noise, JPEG-encoded.

    Pure noise would make JPEG files (and decode times) unrealistically large; flat colours
    unrealistically small. ``mode`` ``L`` / ``CMYK`` gives the odd JPEG variants ImageNet has.
    """
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.2, 1.0) + y * rng.uniform(0.2, 1.0)) % 256
                     for _ in range(3)], axis=-1)
    base += rng.normal(0, 8, size=base.shape)
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        box = [x0, y0, int(rng.integers(x0 + 3, width)), int(rng.integers(y0 + 3, height))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    buf = io.BytesIO()
    im.convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
