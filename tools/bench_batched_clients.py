"""How much would batching hosted clients gain? One training step's forward and backward for N
clients of one architecture, run one after the other (what ``clients.per_rank`` does today)
and as one computation over stacked parameters (``torch.func.functional_call`` + ``vmap``).

Usage (CPU, about a minute)::

    python tools/bench_batched_clients.py                     # cnn_mnist, 28x28, N = 1, 4, 8
    python tools/bench_batched_clients.py --arch cnn_small --size 32 --channels 3 --clients 1 4

The step is the model's part of an MHD step: [private 32; public 64] through the backbone and
every head, the main head's cross-entropy on the private rows and a KL term per aux head on the
public rows (targets fixed), backward. No optimizer, exchange or data loading: an upper bound
on what batching the clients' computation could gain. BatchNorm keeps no running statistics
in either variant (``torch.func.replace_all_batch_norm_modules_``: vmap cannot update them in
place). Both variants are checked to compute the same losses first. Prints ms per
client-step, median of ``--repeats`` after ``--warmup``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mhd_hpc.models import build_model  # noqa: E402


def step_loss(outputs, labels: torch.Tensor, targets: list[torch.Tensor], b: int) -> torch.Tensor:
    _, logits = outputs
    loss = F.cross_entropy(logits[0][:b], labels)
    for head, target in zip(logits[1:], targets):
        # KL(target || head), written out: vmap has no batching rule for aten::kl_div
        kl = (target * (target.clamp_min(1e-8).log() - F.log_softmax(head[b:], 1))).sum(1)
        loss = loss + kl.mean()
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn_mnist")
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--aux-heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--public-batch", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, rows = args.batch, args.batch + args.public_batch
    print(f"{args.arch}, {args.aux_heads} aux heads, batch {b} + {args.public_batch}, "
          f"{args.threads} thread(s): ms per client-step, median of {args.repeats}\n")
    print("| clients | one after the other | batched (vmap) | gain |")
    print("|---|---|---|---|")
    for n in args.clients:
        models = [build_model(args.arch, 10, args.aux_heads, args.channels, args.size, 0)
                  for _ in range(n)]
        for m in models:
            torch.func.replace_all_batch_norm_modules_(m)
        x = torch.randn(n, rows, args.channels, args.size, args.size)
        y = torch.randint(0, 10, (n, b))
        t = [torch.softmax(torch.randn(n, args.public_batch, 10), -1)
             for _ in range(args.aux_heads)]

        def sequential() -> None:
            for i, m in enumerate(models):
                m.zero_grad(set_to_none=True)
                step_loss(m(x[i]), y[i], [tt[i] for tt in t], b).backward()

        params, buffers = torch.func.stack_module_state(models)
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        base = models[0]

        def one(p, bu, xi, yi, ti):
            return step_loss(torch.func.functional_call(base, (p, bu), (xi,)), yi, ti, b)

        batched_loss = torch.vmap(one, in_dims=(0, 0, 0, 0, 0))

        def batched() -> None:
            for v in params.values():
                v.grad = None
            batched_loss(params, buffers, x, y, t).sum().backward()

        with torch.no_grad():  # the same work both ways: the same losses
            want = sum(step_loss(m(x[i]), y[i], [tt[i] for tt in t], b)
                       for i, m in enumerate(models))
            got = batched_loss(params, buffers, x, y, t).sum()
        if not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
            raise SystemExit(f"batched loss {got.item()} != sequential {want.item()}")
        times = {}
        for name, fn in (("sequential", sequential), ("batched", batched)):
            for _ in range(args.warmup):
                fn()
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) * 1000 / n)
            times[name] = statistics.median(samples)
        print(f"| {n} | {times['sequential']:.1f} | {times['batched']:.1f} | "
              f"{times['sequential'] / times['batched']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
