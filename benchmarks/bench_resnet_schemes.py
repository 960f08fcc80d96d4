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

``--roofline`` (CPU) adds where the time goes: the convolutions' FLOPs per step (counted with
``torch.utils.flop_counter``), the host's float32 peak (the faster of a 4096x4096 matmul and a
large 3x3 convolution, best of five each) and, from the profiler over six more steps per scheme
(interleaved; medians), each step's time inside the convolution kernels (forward and backward)
and inside BatchNorm's, with the convolutions' GFLOP/s and their share of that peak. A
normalization-free model is the BatchNorm model with the norms removed and scalars added, so the
last line sets the time budget of the >= 1.25x target against what ``plain``'s convolutions alone
take on this host.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import depthlab as dl
from _results import write_csv

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
    ap.add_argument("--csv", default=None, help="default benchmarks/results/resnet_schemes.csv")
    ap.add_argument(
        "--roofline-csv", default=None, help="default benchmarks/results/resnet_roofline.csv"
    )
    ap.add_argument(
        "--variant",
        default="preact",
        choices=("preact", "postact", "scheme"),
        help="the ResNet every scheme runs on (scheme: each scheme's default, Fixup postact)",
    )
    ap.add_argument("--device", default="cpu", help="cpu | cuda (CPU-time columns: host time)")
    ap.add_argument(
        "--roofline", action="store_true", help="CPU: conv FLOPs, float32 peak, time in conv/BN ops"
    )
    args = ap.parse_args(argv)
    if args.roofline and args.device != "cpu":
        ap.error("--roofline profiles CPU kernels; run it with --device cpu")
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
        variant = None if args.variant == "scheme" else args.variant
        model = dl.create_model(
            "resnet", depth=args.depth, scheme=name, num_classes=10, variant=variant
        )
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
    write_csv("resnet_schemes.csv", _rows(schemes, rate, cpu_rate, cpu), args.csv)
    if args.roofline:
        rows = roofline(runs, x, y)
        write_csv("resnet_roofline.csv", rows, args.roofline_csv)
    return 0


def _rows(schemes, rate, cpu_rate, cpu) -> list[dict]:
    """The CSV rows: images/s by wall and CPU time, and the per-round CPU-time speed-ups over
    ``batchnorm`` and ``plain`` (median and quartiles over rounds)."""
    rows = []
    for name in schemes:
        row = {
            "scheme": name, "images_per_s": round(rate[name], 1),
            "images_per_cpu_s": round(cpu_rate[name], 1),
        }  # fmt: skip
        for ref in ("batchnorm", "plain"):
            if ref in cpu:
                q = [b / a for a, b in zip(cpu[name], cpu[ref])]
                lo, med, hi = statistics.quantiles(q, n=4) if len(q) > 1 else (q[0],) * 3
                row[f"cpu_speedup_vs_{ref}"] = round(med, 3)
                row[f"vs_{ref}_q1_q3"] = f"{lo:.3f}–{hi:.3f}"
        rows.append(row)
    return rows


def conv_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """FLOPs of the convolutions in one forward and one backward pass (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()["Global"]
    fwd = sum(v for k, v in counts.items() if str(k).endswith("convolution"))
    bwd = sum(v for k, v in counts.items() if str(k).endswith("convolution_backward"))
    return float(fwd), float(bwd)


def _best_rate(fn, flops: float, tries: int = 5) -> float:
    fn()  # warm-up (oneDNN primitive creation, allocator)
    best = float("inf")
    for _ in range(tries):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def peak_rates() -> tuple[float, float]:
    """FLOP/s of two compute-bound float32 kernels on the CPU, best of five each: a 4096 x 4096
    matmul (MKL) and a 3x3 convolution, 256 -> 256 channels on 16 x 32 x 32 NHWC maps (oneDNN).
    The larger is the reference the ResNet's convolutions are held against."""
    a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
    gemm = _best_rate(lambda: a @ b, 2.0 * 4096**3)
    x = torch.randn(16, 256, 32, 32).to(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3).to(memory_format=torch.channels_last)
    conv = _best_rate(lambda: F.conv2d(x, w, padding=1), 2.0 * 16 * 32 * 32 * 256 * 256 * 9)
    return gemm, conv


#: profiler event names of the CPU convolution and BatchNorm kernels (forward and backward)
CONV_OPS = (
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
    "aten::thnn_conv2d",
)
BN_OPS = ("aten::native_batch_norm", "aten::native_batch_norm_backward")


def profile_step(model, opt, x, y) -> tuple[float, float, float]:
    """Seconds in one profiled step: the whole step, inside convolution kernels, inside BatchNorm
    kernels (self times of the profiler's events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        train_step(model, opt, x, y)
        total = time.perf_counter() - t0
    self_us = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    conv = sum(self_us.get(k, 0.0) for k in CONV_OPS) / 1e6
    bn = sum(self_us.get(k, 0.0) for k in BN_OPS) / 1e6
    return total, conv, bn


def roofline(runs: dict, x: torch.Tensor, y: torch.Tensor, rounds: int = 6) -> list[dict]:
    """Print the convolutions' FLOPs, the float32 peak and, per scheme, the medians over ``rounds``
    profiled steps of the step time and the time in convolution and BatchNorm kernels; return
    those figures as CSV rows (one per scheme)."""
    name0 = next(iter(runs))
    fwd, bwd = conv_flops(runs[name0][0], x, y)
    gemm, big_conv = peak_rates()
    rate = max(gemm, big_conv)
    print(
        f"\nroofline: convolutions {(fwd + bwd) / 1e9:.1f} GFLOP per step (forward "
        f"{fwd / 1e9:.1f}, backward {bwd / 1e9:.1f}); float32 peak {rate / 1e9:.1f} GFLOP/s "
        f"(4096x4096 matmul {gemm / 1e9:.1f}, 3x3 conv 256 ch {big_conv / 1e9:.1f})"
    )
    print(
        f"{'scheme':<10} {'step ms':>8} {'conv ms':>8} {'conv GFLOP/s':>13} {'of peak':>8} "
        f"{'BN ms':>7} {'other ms':>9}"
    )
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):  # one profiled step per scheme per round, rotated like the timing
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(profile_step(*runs[name], x, y))
    prof, out = {}, []
    for name, rows in samples.items():
        total, conv, bn = prof[name] = tuple(statistics.median(col) for col in zip(*rows))
        other = statistics.median(t - c - b for t, c, b in rows)  # within each step
        out.append({
            "scheme": name, "step_ms": round(total * 1e3, 1), "conv_ms": round(conv * 1e3, 1),
            "conv_gflops": round((fwd + bwd) / conv / 1e9, 1),
            "pct_of_peak": round(100 * (fwd + bwd) / conv / rate, 1),
            "bn_ms": round(bn * 1e3, 1), "other_ms": round(other * 1e3, 1),
            "conv_gflop_per_step": round((fwd + bwd) / 1e9, 2), "peak_gflops": round(rate / 1e9, 1),
            "rounds": rounds,
        })  # fmt: skip
        print(
            f"{name:<10} {total * 1e3:>8.0f} {conv * 1e3:>8.0f} {(fwd + bwd) / conv / 1e9:>13.1f} "
            f"{(fwd + bwd) / conv / rate:>8.0%} {bn * 1e3:>7.0f} {other * 1e3:>9.0f}"
        )
    if "batchnorm" in prof and "plain" in prof:
        # every model runs the same convolutions: the fastest conv time measured in any of them is
        # a lower bound for that part of a normalization-free step
        budget = prof["batchnorm"][0] / 1.25
        conv = min(c for _, c, _ in prof.values())
        plain = statistics.median(t - c for t, c, _ in samples["plain"])
        print(
            f"for >= 1.25x batchnorm a step may take {budget * 1e3:.0f} ms; the convolutions alone "
            f"take >= {conv * 1e3:.0f} ms (fastest of the schemes, {(fwd + bwd) / conv / rate:.0%} "
            f"of the peak), leaving {(budget - conv) * 1e3:.0f} ms for all other work; plain's "
            f"other work takes {plain * 1e3:.0f} ms, BatchNorm's kernels "
            f"{prof['batchnorm'][2] * 1e3:.0f} ms"
        )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
