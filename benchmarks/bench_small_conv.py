"""A 3×3 convolution on 2×2 maps as one matrix product (``depthlab.nn.conv3x3_2x2``) against
``F.conv2d`` on a CPU, alone and inside deep ResNet training steps.

    .venv/bin/python benchmarks/bench_small_conv.py                 # both tables
    .venv/bin/python benchmarks/bench_small_conv.py --steps 0       # the kernel table only

**Kernel**: forward and backward (input, weight and bias gradients) of one convolution C → C on
(N, C, 2, 2), NCHW and channels-last (input and weight in the same layout), median of
``--calls`` calls that alternate between the two functions.

**Step**: seconds per SGD step (forward, cross-entropy, backward, SGD with momentum and weight
decay) of deep nets on 1×8×8 inputs in channels-last memory — the CIFAR ResNet-1004 (16/32/64
channels, batch 32) under ``batchnorm``, ``fixup`` and ``skipinit`` and the pre-activation
Wide-ResNet 1000-2 (32/64/128 channels, batch 64, skipinit-depth's net) under ``skipinit`` and
``batchnorm`` — with the matrix-product path on (``depthlab.nn.Conv2d``'s default) and off
(``F.conv2d`` for every convolution), the two taking turns step by step; the median of
``--steps`` steps each and their ratio. Their last stage runs on 2×2 maps; the other two stages
(8×8, 4×4) are unchanged.

Runs on one thread (``--threads``). A CSV of every figure is written to
``benchmarks/results/small_conv.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import depthlab as dl
from _results import write_csv
from depthlab.nn import Conv2d, conv3x3_2x2

RESULTS = Path(__file__).parent / "results" / "small_conv.csv"
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
#: (label, model kwargs, batch, schemes)
NETS = (
    ("resnet-1004", {"depth": 1004}, 32, ("batchnorm", "fixup", "skipinit")),
    ("wrn-1000-2", {"depth": 1000, "width": 2, "variant": "preact"}, 64, ("skipinit", "batchnorm")),
)


def _row(part: str, what: str, layout: str, ref: float, new: float, digits: int) -> dict:
    """One CSV row: ``F.conv2d``'s and the matrix product's milliseconds and their ratio."""
    return {
        "part": part, "what": what, "layout": layout, "conv2d_ms": round(ref * 1e3, digits),
        "gemm_ms": round(new * 1e3, digits), "ratio": round(new / ref, 3),
    }  # fmt: skip


def kernel_rows(batches, channels, calls: int) -> list[dict]:
    rows = []
    for n in batches:
        for c in channels:
            for name, fmt in LAYOUTS.items():
                x = torch.randn(n, c, 2, 2).contiguous(memory_format=fmt).requires_grad_()
                w = torch.randn(c, c, 3, 3).contiguous(memory_format=fmt).requires_grad_()
                b = torch.randn(c, requires_grad=True)
                g = torch.randn(n, c, 2, 2).contiguous(memory_format=fmt)
                fns = {
                    "conv2d": lambda x=x, w=w, b=b: F.conv2d(x, w, b, padding=1),
                    "gemm": lambda x=x, w=w, b=b: conv3x3_2x2(x, w, b),
                }
                times = {k: [] for k in fns}
                for i in range(calls + 5):
                    for k, fn in fns.items():
                        t0 = time.perf_counter()
                        torch.autograd.grad(fn(), (x, w, b), g)
                        if i >= 5:
                            times[k].append(time.perf_counter() - t0)
                ref, new = (statistics.median(times[k]) for k in ("conv2d", "gemm"))
                rows.append(_row("kernel", f"C{c} N{n}", name, ref, new, 4))
                print(
                    f"conv {c:3d}→{c:3d} on ({n}, {c}, 2, 2) {name}: F.conv2d "
                    f"{ref * 1e3:6.3f} ms, matrix product {new * 1e3:6.3f} ms ({new / ref:.2f}×)",
                    flush=True,
                )
    return rows


def step_rows(steps: int) -> list[dict]:
    rows = []
    real = Conv2d._small_map
    for label, kwargs, batch, schemes in NETS:
        for scheme in schemes:
            torch.manual_seed(0)
            model = dl.create_model("resnet", scheme=scheme, in_channels=1, **kwargs)
            model.to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
            x = torch.randn(batch, 1, 8, 8).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 10, (batch,))
            times = {"on": [], "off": []}
            for i in range(steps + 1):
                for mode in ("on", "off") if i % 2 else ("off", "on"):
                    Conv2d._small_map = real if mode == "on" else (lambda *a: False)
                    t0 = time.perf_counter()
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    if i:  # the first round warms up
                        times[mode].append(time.perf_counter() - t0)
            Conv2d._small_map = real
            on, off = (statistics.median(times[k]) for k in ("on", "off"))
            rows.append(_row("step", f"{label} {scheme} batch {batch}", "nhwc", off, on, 1))
            print(
                f"{label} {scheme}, batch {batch}: F.conv2d {off:.3f} s/step, with the 2×2 "
                f"matrix product {on:.3f} s/step ({on / off:.2f}×; ranges "
                f"{min(times['off']):.2f}–{max(times['off']):.2f} / "
                f"{min(times['on']):.2f}–{max(times['on']):.2f})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--channels", default="16,32,64,128")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per kernel")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per net and mode (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--csv", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    rows = kernel_rows(
        [int(v) for v in args.batches.split(",")],
        [int(v) for v in args.channels.split(",")],
        args.calls,
    )
    if args.steps:
        rows += step_rows(args.steps)
    write_csv("small_conv.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
