"""Time the private training step (``privacy.enabled``: DP-SGD on the private term) against
the non-private step of the same GroupNorm model, on the same batches.

    python tools/bench_privacy.py --arch cnn_mnist --image-size 28 --channels 1
    python tools/bench_privacy.py --arch resnet18 --image-size 64 --batch 64 --device cuda

Both sides are ``mhd_hpc.method.step.TrainStep``, the code the trainer runs, with the ``mhd``
method of one client and no peers (the distillation terms on the public batch are the client's
own chain). *private*: the per-sample gradients of the private cross-entropy (``torch.func``),
clipped and noised (``privacy.dp_sgd.PrivateGradient``), and the public terms' backward;
*plain*: the same model and optimizer, one pass over [private; public]. Prints ms/step of each
(median over repeats) and their ratio; ``--json`` writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

try:
    import mhd_hpc  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mhd_hpc.data.read.batches import Batch  # noqa: E402
from mhd_hpc.distributed.intra import SingleRank  # noqa: E402
from mhd_hpc.method.losses import aux_head_weight  # noqa: E402
from mhd_hpc.method.step import DistillSettings, TrainStep  # noqa: E402
from mhd_hpc.method.strategies import make_strategy  # noqa: E402
from mhd_hpc.method.targets import NoTargets  # noqa: E402
from mhd_hpc.models import build_model  # noqa: E402
from mhd_hpc.privacy.dp_sgd import PrivateGradient  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import timed  # noqa: E402  (median over repeats of the mean ms/step)


def make_step(args, device: torch.device, private: bool):
    """(a step function of the step number, the batches) for one side."""
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes, args.aux_heads, args.channels, args.image_size,
                        0, "group").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dp = (PrivateGradient(model, clip_norm=1.0, noise_multiplier=1.0,
                          expected_batch=args.batch, key=1, device=device, chunk=args.chunk)
          if private else None)
    distill = DistillSettings(aux_head_weight=aux_head_weight(3.0, args.aux_heads, "chain"),
                              nu_emb=0.0)
    step = TrainStep(model, opt, strategy=make_strategy("mhd", world=None,
                                                        intra=SingleRank(world=None)),
                     source=NoTargets(), distill=distill, seed=0, client=0, device=device,
                     private=dp, private_steps=10 ** 9)
    g = torch.Generator().manual_seed(0)
    shape = (args.channels, args.image_size, args.image_size)
    x = torch.randn(args.batch, *shape, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    pub = torch.randn(args.public_batch, *shape, generator=g).to(device)
    priv_batch = Batch([str(i) for i in range(args.batch)], x, y)
    pub_batch = Batch([str(i) for i in range(args.public_batch)], pub,
                      torch.zeros(args.public_batch, dtype=torch.int64, device=device))

    def run(n: int, start: list[int] = [0]) -> None:
        for _ in range(n):
            start[0] += 1
            step(start[0], priv_batch, pub_batch)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python tools/bench_privacy.py --arch cnn_mnist "
                                       "--image-size 28 --channels 1 --threads 1")
    p.add_argument("--arch", default="cnn_mnist")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--aux-heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=32, help="private batch")
    p.add_argument("--public-batch", type=int, default=64)
    p.add_argument("--chunk", type=int, default=32, help="per-sample gradients at a time")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = default)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = {k: getattr(args, k) for k in ("arch", "image_size", "batch", "public_batch",
                                            "aux_heads", "chunk", "device")}
    result["threads"] = torch.get_num_threads()
    for name, private in (("plain", False), ("private", True)):
        result[f"{name}_ms"] = timed(make_step(args, device, private), device, args.warmup,
                                     args.steps, args.repeats)
    result["ratio"] = result["private_ms"] / result["plain_ms"]
    print(f"{args.arch}, {args.image_size} px, batch {args.batch} private + "
          f"{args.public_batch} public, {args.aux_heads} aux heads, GroupNorm, {args.device}, "
          f"{result['threads']} thread(s)")
    print(f"  plain   {result['plain_ms']:8.1f} ms/step")
    print(f"  private {result['private_ms']:8.1f} ms/step  ({result['ratio']:.2f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
