"""Time mhd_hpc's training step against a bare PyTorch loop that does the same work.

    python tools/bench_step.py --arch resnet18 --batch 32 --image-size 64 --precision fp32
    python tools/bench_step.py --arch resnet34 --batch 256 --image-size 224 --classes 1000 \
        --aux-heads 4 --precision bf16 --device cuda --peers 1 --top-k 10 --json out.json

*framework*: ``mhd_hpc.method.step.TrainStep``, the code the trainer runs (autocast, fp32 losses, the
device-side loss accumulation, the target source, the gradient scaler for fp16), plus the
trainer's per-step accumulation of the loss terms. With ``--peers N`` the target source is a
loopback: each step the client's own public outputs go through the real message codec (top-k,
fp16, one copy to a host buffer and back, decode on the device) N times, standing in for N peers
without MPI.

*bare*: the same model, optimizer and batches in a plain loop with the same forward/backward
work: CE on the private batch, each aux head distilled (soft cross-entropy) from the previous
head's detached softmax, and with peers the embedding term and targets from fixed tensors.

Prints ms/step, img/s (private + public images) and the framework/bare ratio; ``--codec`` also
times one pack + unpack of a message through a host buffer on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

try:
    import mhd_hpc  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mhd_hpc.distributed.codec import MessageCodec  # noqa: E402
from mhd_hpc.data.read.batches import Batch  # noqa: E402
from mhd_hpc.runtime.devices import resolve_channels_last, resolve_precision  # noqa: E402
from mhd_hpc.distributed.codec import PeerOutputs  # noqa: E402
from mhd_hpc.method.losses import aux_head_weight, normalize_embedding  # noqa: E402
from mhd_hpc.models import build_model  # noqa: E402
from mhd_hpc.run.progress import Interval  # noqa: E402
from mhd_hpc.method.step import DistillSettings, TrainStep  # noqa: E402
from mhd_hpc.method.strategies import Strategy, make_strategy  # noqa: E402
from mhd_hpc.method.targets import NoTargets  # noqa: E402
from mhd_hpc.distributed.intra import SingleRank  # noqa: E402


def one_rank_strategy() -> Strategy:
    """The trainer's own ``mhd`` strategy for one client of one rank (nothing to average): the
    real class, so that the benchmark follows whatever the step asks of a strategy."""
    return make_strategy("mhd", world=None, intra=SingleRank(world=None))


class LoopbackTargets(NoTargets):
    """``peers`` stand-in peers: this client's own outputs through the message codec."""

    def __init__(self, codec: MessageCodec, peers: int, device: torch.device):
        self.codec, self.peers, self.device = codec, peers, device
        self.host = torch.empty(codec.payload_bytes, dtype=torch.uint8,
                                pin_memory=device.type == "cuda")

    def targets(self, step, pub, pub_logits, pub_emb):
        probs = [torch.softmax(l.detach().float(), 1) for l in pub_logits[:-1]]  # as sent
        payload, _ = self.codec.encode_payload(probs, normalize_embedding(pub_emb.detach()))
        self.host.copy_(payload, non_blocking=True)
        if payload.is_cuda:
            torch.cuda.current_stream().synchronize()  # as the exchange does before MPI sends
        out = []
        for p in range(self.peers):
            heads, emb = self.codec.decode_payload(self.host.to(self.device, non_blocking=True))
            out.append(PeerOutputs(p + 1, heads, emb))
        return out


def make_batches(args, device, layout):
    g = torch.Generator().manual_seed(0)
    c = getattr(args, "in_channels", 3)
    x = torch.randn(args.batch, c, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    pub = torch.randn(args.public_batch or args.batch, c, args.image_size, args.image_size,
                      generator=g)
    return (x.to(device).contiguous(memory_format=layout), y.to(device),
            pub.to(device).contiguous(memory_format=layout))


def fresh(args, device, layout):
    torch.manual_seed(0)
    model = build_model(args.arch, args.classes, args.aux_heads, getattr(args, "in_channels", 3),
                        args.image_size, 0).to(device, memory_format=layout)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return model, opt


def framework_step(args, device, layout, precision, data: str | None = None):
    """The trainer's step on synthetic batches, or (``data``) on the batches of a dataset's
    client_000 and public splits, read through the trainer's own BatchFeed step by step."""
    model, opt = fresh(args, device, layout)
    x, y, pub_x = make_batches(args, device, layout)
    codec = MessageCodec(args.aux_heads, args.classes, pub_x.shape[0], args.top_k,
                         model.embedding_dim)
    source = LoopbackTargets(codec, args.peers, device) if args.peers else NoTargets()
    distill = DistillSettings(aux_head_weight=aux_head_weight(3.0, args.aux_heads, "chain"),
                              nu_emb=1.0)
    step = TrainStep(model, opt, strategy=one_rank_strategy(), source=source, distill=distill,
                     seed=0, client=0, device=device, precision=precision)
    # What the trainer hands the step: batches on the device (the public one with its keys).
    private = Batch(keys=[str(i) for i in range(x.shape[0])], images=x, labels=y)
    public = Batch(keys=[str(i) for i in range(pub_x.shape[0])], images=pub_x,
                   labels=torch.zeros(pub_x.shape[0], dtype=torch.int64, device=device))
    interval = Interval()
    if data is None:
        def run(n: int) -> None:
            for s in range(1, n + 1):
                interval.add(step(s, private, public))
        return run
    feeds = data_feeds(args, data, device, layout)
    counter = iter(range(1, 10 ** 9))

    def run_data(n: int) -> None:
        for _ in range(n):
            s = next(counter)
            interval.add(step(s, feeds[0].batch(s), feeds[1].batch(s)))
    return run_data


def data_feeds(args, data: str, device, layout):
    """BatchFeeds of ``data``'s client_000 (train) and public streams, as the trainer opens
    them (``data.loader`` = ``args.loader``, ``args.loader_threads`` workers)."""
    from mhd_hpc.data.read.stream_factory import open_stream
    from mhd_hpc.data.read.feed import BatchFeed

    opts = dict(loader=args.loader, threads=args.loader_threads, pin=device.type == "cuda")
    private = open_stream(data, "client_000", args.batch, 1, "train", **opts)[0]
    public = open_stream(data, "public", args.public_batch or args.batch, 2, "public", **opts)[0]
    return BatchFeed(private, device, layout), BatchFeed(public, device, layout)


def bare_step(args, device, layout, precision):
    model, opt = fresh(args, device, layout)
    x, y, pub_x = make_batches(args, device, layout)
    b, m = x.shape[0], args.aux_heads
    nu_aux = aux_head_weight(3.0, m, "chain")
    g = torch.Generator(device=device).manual_seed(1)
    peer_probs = [torch.softmax(torch.randn(pub_x.shape[0], args.classes, device=device,
                                            generator=g), 1) for _ in range(1 + m)]
    peer_emb = F.normalize(torch.randn(pub_x.shape[0], model.embedding_dim, device=device,
                                       generator=g), dim=1)
    scaler = torch.amp.GradScaler(device.type) if precision.scaled else None

    def run(n: int) -> None:
        for _ in range(n):
            with precision.autocast(device):
                emb, logits = model(torch.cat([x, pub_x]))
            logits = [l.float() for l in logits]
            loss = F.cross_entropy(logits[0][:b], y)
            if args.peers:
                loss = loss + (F.normalize(emb[b:].float(), dim=1) - peer_emb).pow(2).sum(1).mean()
            for k in range(1, m + 1):
                target = torch.softmax(logits[k - 1][b:].detach(), 1)
                if args.peers:  # the more confident of self and peer, per sample
                    pick = peer_probs[k - 1].amax(1) > target.amax(1)
                    target = torch.where(pick[:, None], peer_probs[k - 1], target)
                loss = loss - nu_aux * (target * F.log_softmax(logits[k][b:], 1)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
    return run


def timed(run, device, warmup: int, steps: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean ms/step over ``steps`` steps, after ``warmup``."""
    run(warmup)
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(1000 * (time.perf_counter() - t0) / steps)
    return statistics.median(out)


def codec_ms(args, device) -> float:
    """One pack + unpack of a message (the heads peers distill from: main .. aux_{m-1}; top-k,
    embedding) via a host buffer."""
    b = args.public_batch or args.batch
    codec = MessageCodec(args.aux_heads, args.classes, b, args.top_k, 512)
    probs = [torch.softmax(torch.randn(b, args.classes, device=device), 1)
             for _ in range(args.aux_heads)]
    emb = F.normalize(torch.randn(b, 512, device=device), dim=1)
    host = torch.empty(codec.payload_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda")

    def once(n: int) -> None:
        for _ in range(n):
            payload, _ = codec.encode_payload(probs, emb)
            host.copy_(payload, non_blocking=True)
            if device.type == "cuda":
                torch.cuda.current_stream().synchronize()
            codec.decode_payload(host.to(device, non_blocking=True))
    return timed(once, device, 5, 20, 3)


def profile(run, device) -> None:
    """Where the framework step's time goes (top operators by device, then host time)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    run(2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch_profile(activities=activities) as prof:
        run(3)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--batch", type=int, default=32, help="private batch")
    p.add_argument("--public-batch", type=int, default=0, help="public batch (0 = --batch)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--aux-heads", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--channels-last", default="auto", choices=("auto", "true", "false"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--peers", type=int, default=0, help="loopback peers through the codec")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--codec", action="store_true", help="also time pack + unpack")
    p.add_argument("--profile", action="store_true",
                   help="print torch.profiler's top operators of 3 framework steps")
    p.add_argument("--data", default=None, metavar="DATASET_DIR",
                   help="also time the step fed by this dataset's real loader (client_000 and "
                        "public, as tools/make_shards.py built them): the ratio to the "
                        "synthetic step says whether the data path keeps up")
    p.add_argument("--loader", default="auto", help="with --data: data.loader")
    p.add_argument("--loader-threads", type=int, default=2, help="with --data")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.data:  # the model's input is the dataset's
        from mhd_hpc.data.manifest import load_manifest

        manifest = load_manifest(args.data)
        args.image_size, args.classes = manifest["image_shape"][-1], manifest["num_classes"]
        args.in_channels = manifest["image_shape"][0]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the trainer does (pick_device)
    precision, _ = resolve_precision(args.precision, device)
    cl = {"true": True, "false": False}.get(args.channels_last, "auto")
    layout = (torch.channels_last if resolve_channels_last(cl, device)
              else torch.contiguous_format)
    args.top_k = min(args.top_k, args.classes)
    result = {"arch": args.arch, "batch": args.batch, "public_batch": args.public_batch or args.batch,
              "image_size": args.image_size, "classes": args.classes,
              "aux_heads": args.aux_heads, "precision": precision.name, "device": args.device,
              "channels_last": layout == torch.channels_last, "peers": args.peers,
              "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    for name, make in (("bare", bare_step), ("framework", framework_step)):
        result[f"{name}_ms"] = timed(make(args, device, layout, precision), device, args.warmup,
                                     args.steps, args.repeats)
    images = args.batch + (args.public_batch or args.batch)
    result["bare_img_s"] = 1000 * images / result["bare_ms"]
    result["framework_img_s"] = 1000 * images / result["framework_ms"]
    result["ratio"] = result["framework_ms"] / result["bare_ms"]
    if args.data:
        result["framework_data_ms"] = timed(framework_step(args, device, layout, precision,
                                                           args.data), device, args.warmup,
                                            args.steps, args.repeats)
        result["data_ratio"] = result["framework_data_ms"] / result["framework_ms"]
    if args.codec:
        result["codec_ms"] = codec_ms(args, device)
    if args.profile:
        profile(framework_step(args, device, layout, precision), device)
    print(f"{args.arch}, batch {args.batch}+{result['public_batch']}, {args.image_size} px, "
          f"{args.classes} classes, {args.aux_heads} aux heads, {precision.name}, "
          f"{'channels_last, ' if result['channels_last'] else ''}{args.device}"
          f"{', ' + result['gpu'] if result['gpu'] else ''}, peers {args.peers}")
    print(f"  bare      {result['bare_ms']:8.1f} ms/step  {result['bare_img_s']:8.0f} img/s")
    print(f"  framework {result['framework_ms']:8.1f} ms/step  "
          f"{result['framework_img_s']:8.0f} img/s  ratio {result['ratio']:.3f}")
    if args.data:
        print(f"  framework fed by {args.data} ({args.loader}) "
              f"{result['framework_data_ms']:8.1f} ms/step  data/synthetic "
              f"{result['data_ratio']:.3f}")
    if args.codec:
        print(f"  pack + unpack (top {args.top_k}) {result['codec_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
