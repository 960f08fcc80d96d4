"""Train-step throughput of a CIFAR ResNet-56 under each residual scheme, side by side.

    .venv/bin/python benchmarks/bench_resnet_schemes.py  # batch 128, 3x6 timed steps per scheme
    .venv/bin/python benchmarks/bench_resnet_schemes.py --steps 2 --repeats 1 --batch 32  # quick

Every scheme's model is built once and warmed up (``--warmup`` steps); then the schemes take
turns, one SGD step (forward, cross-entropy, backward, optimizer step on one fixed random batch)
each per round, in a rotated order, for ``--repeats x --steps`` rounds, so that drift in machine
load is spread over all schemes. The table reports images/s from the median wall-clock step time
and, beside it, from the median CPU time of the process (less sensitive to other processes on a
shared machine), each with its ratios to ``batchnorm`` and to ``plain`` measured in the same run.

Targets (issue 2): every normalization-free scheme >= 1.25x the ``batchnorm`` throughput, and the
scheme machinery (gates, scalar biases) costs <= 5% over ``plain`` (ratio vs plain >= 0.95).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import depthlab as dl

SCHEMES = ("batchnorm", "plain", "skipinit", "rezero", "fixup")


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()  # time the kernels, not their launch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per scheme per repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC activations and weights")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (CPU-time columns: host time)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    schemes = args.schemes.split(",")

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.to(dev, memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,)).to(dev)
    runs = {}
    for name in schemes:
        model = dl.create_model("resnet", depth=args.depth, scheme=name, num_classes=10)
        model = model.to(dev, memory_format=fmt)
        # a small learning rate keeps the unnormalized 'plain' net finite over the timed steps
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runs[name] = (model.train(), opt)

    for name in schemes:  # warm-up: allocator, oneDNN kernel selection
        for _ in range(args.warmup):
            train_step(*runs[name], x, y)
    wall: dict[str, list[float]] = {name: [] for name in schemes}
    cpu: dict[str, list[float]] = {name: [] for name in schemes}
    for step in range(args.repeats * args.steps):  # one step per scheme per round, rotated order
        k = step % len(schemes)
        for name in schemes[k:] + schemes[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(*runs[name], x, y)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    # images/s from the median step time: robust to load spikes from other processes
    rate = {name: args.batch / statistics.median(t) for name, t in wall.items()}
    cpu_rate = {name: args.batch / statistics.median(t) for name, t in cpu.items()}
    print(
        f"ResNet-{args.depth} (CIFAR 3x32x32), batch {args.batch}, SGD train step, "
        f"{torch.get_num_threads()} threads, {'NHWC' if args.channels_last else 'NCHW'}, "
        f"{torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}, "
        f"{args.repeats * args.steps} timed steps per scheme (interleaved), median step time"
    )
    header = ["scheme", "images/s", "vs batchnorm", "vs plain", "img/CPU-s", "vs bn", "vs plain"]
    print(
        f"{header[0]:<10} {header[1]:>9} {header[2]:>13} {header[3]:>9}   "
        f"{header[4]:>9} {header[5]:>7} {header[6]:>9}"
    )
    for name in schemes:
        cells = []
        for r in (rate, cpu_rate):
            vs_bn = f"{r[name] / r['batchnorm']:.2f}x" if "batchnorm" in r else "-"
            vs_plain = f"{r[name] / r['plain']:.3f}x" if "plain" in r else "-"
            cells.append((r[name], vs_bn, vs_plain))
        (a, b, c), (d, e, f) = cells
        print(f"{name:<10} {a:>9.1f} {b:>13} {c:>9}   {d:>9.1f} {e:>7} {f:>9}")
    # each round runs every scheme once within seconds: the speed-up within a round, its median
    # over rounds, and the spread (first to third quartile), are robust to the machine's drift
    print("\nper-round CPU-time speed-ups (median [quartiles] over rounds):")
    for ref in ("batchnorm", "plain"):
        if ref not in cpu:
            continue
        parts = []
        for name in schemes:
            if name == ref:
                continue
            q = [b / a for a, b in zip(cpu[name], cpu[ref])]
            lo, med, hi = statistics.quantiles(q, n=4) if len(q) > 1 else (q[0],) * 3
            parts.append(f"{name} {med:.3f} [{lo:.3f}, {hi:.3f}]")
        print(f"  vs {ref}: " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
