"""Seconds per SGD step of 1,000- and 10,000-layer ResNets on a CPU, with the FLOP rate they reach
beside the convolution peak measured in the same run.

    .venv/bin/python benchmarks/bench_deep_resnet.py                      # the full table
    .venv/bin/python benchmarks/bench_deep_resnet.py --depths 1004 --inputs 1x8x8 --steps 2
    .venv/bin/python benchmarks/bench_deep_resnet.py --depths 10004 --inputs 3x32x32 \
        --layouts nhwc --append          # add rows to the CSV, replacing those measured again

The networks are depthlab's CIFAR ResNets (basic blocks, 16/32/64 channels, depth 6n+2: 1,004 and
10,004 layers) under ``batchnorm``, ``fixup`` (its post-activation network) and ``skipinit``, on
random batches of 32 images of 1×8×8 (digits-sized) and 3×32×32 (CIFAR-sized). One step is the
training step of the ``depth-sweep`` experiment: forward, cross-entropy, backward, and its
optimizer as the experiments build it (``make_optimizer``: torch's fused SGD kernel over the three
parameter groups, lr 0.1, momentum 0.9, weight decay 5e-4 on the kernels, Fixup's scalars at
lr/10). Each model is timed in NCHW and in channels-last (NHWC) memory, each in a process of its
own, as ``depthlab run``'s workers train one cell's model per process (a net steps more slowly
in a process where other models have stepped, on the heap they left behind). Models take
turns, one process each per round (``--rounds``, ``--steps`` timed steps each after
``--warmup``, default 2), so that drift in the machine's load is spread over all of them. A
deep net's first steps fault its memory in — a 10,004-layer net's second step took 1.3–1.5×
a later one's, with 10⁵ minor page faults where later steps have none — so the CSV gives the
median ``minor_faults_per_step`` of the timed steps (and the ``warmup`` they followed). Where a
model's activations would exceed ``--max-act-gb``, it runs with activation checkpointing
(``checkpoint_segments`` = √blocks; the recomputation is an extra forward pass, so its FLOP rate
counts only the model's own FLOPs). The processes keep freed memory for reuse
(:func:`depthlab.heap.keep_freed_memory`) and start with huge pages for ``malloc``
(:func:`depthlab.heap.worker_environment`), as ``depthlab run``'s workers do (``--default-malloc``:
glibc as it comes; the CSV's ``malloc`` column says which: ``default``, ``kept``, ``kept+huge``).

FLOPs per step are counted by ``torch.utils.flop_counter`` on one step (convolutions and the
linear head, forward and backward) in two ways: the **model's FLOPs** (``gflop_per_step``, the
rate and the shares of the peaks), counted with ``depthlab.nn.fusion(False)`` so that every 3×3
convolution counts as ``F.conv2d`` does (9 taps per output, the zero padding included) whatever
kernel runs it — the convention of model-FLOP utilization, like the recomputation that
checkpointing adds and that is not counted either; and the **executed FLOPs**
(``gflop_executed``, ``pct_conv_train_peak_executed``), counted as the step runs, where a 3×3
convolution on 2×2 maps is one matrix product of 16 of those 36 multiply-adds per output
(:func:`depthlab.nn.conv3x3_2x2`), so a 1×8×8 net's last stage counts 16/36 of its model FLOPs.

The peaks, measured in the same run, best of five:

* ``conv fwd``: a 3×3 convolution 256→256 channels on 16×32×32 NHWC maps, forward only;
* ``conv train``: forward and both backward convolutions of a 3×3, 64→64 convolution on a batch
  of 32 NHWC 32×32 maps (what a ResNet step's convolutions can reach at best).

The table gives, per model, the median seconds per step, the FLOP rate and its share of each
peak; a CSV of every figure (and the thread count) is written to
``benchmarks/results/deep_resnet.csv`` after every depth × input group. The models of a group
are built together and freed before the next group's: six 10,004-layer models hold ≈ 12 GB.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import depthlab as dl
from _results import write_csv
from depthlab.heap import (
    HUGE_PAGES_TUNABLE,
    keep_freed_memory,
    starting_workers,
    worker_environment,
)
from depthlab.resources import estimate
from depthlab.train.config import TrainConfig
from depthlab.train.optim import make_optimizer

SCHEMES = ("batchnorm", "fixup", "skipinit")
RESULTS = Path(__file__).parent / "results" / "deep_resnet.csv"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peaks(device: torch.device) -> dict[str, float]:
    """FLOP/s of the two reference convolutions (see the module docstring) on ``device``."""
    cl = torch.channels_last
    x = torch.randn(16, 256, 32, 32, device=device).to(memory_format=cl)
    w = torch.randn(256, 256, 3, 3, device=device).to(memory_format=cl)
    fwd = 2.0 * 16 * 32 * 32 * 256 * 256 * 9 / _best(lambda: F.conv2d(x, w, padding=1), device)
    x = torch.randn(32, 64, 32, 32, device=device).to(memory_format=cl).requires_grad_()
    w = torch.randn(64, 64, 3, 3, device=device).to(memory_format=cl).requires_grad_()
    g = torch.randn(32, 64, 32, 32, device=device).to(memory_format=cl)

    def train() -> None:
        torch.autograd.grad(F.conv2d(x, w, padding=1), (x, w), g)

    flops = 3 * 2.0 * 32 * 32 * 32 * 64 * 64 * 9
    return {"conv_fwd": fwd, "conv_train": flops / _best(train, device)}


class Run:
    """One model (scheme, depth, input, layout) with its optimizer and batch."""

    def __init__(self, scheme, depth, shape, layout, batch, max_act_gb, device="cpu") -> None:
        self.scheme, self.depth, self.shape, self.layout = scheme, depth, shape, layout
        torch.manual_seed(0)
        opts = {"zero_init_residual": True} if scheme == "batchnorm" else None
        self.model = dl.create_model(
            "resnet", depth=depth, in_channels=shape[0], num_classes=10, scheme=scheme,
            scheme_options=opts, variant="postact" if scheme == "fixup" else "preact",
        )  # fmt: skip
        est = estimate("resnet", {"depth": depth, "in_channels": shape[0]}, shape)
        act_gb = batch * est.activations_per_example * 4 / 2**30
        self.segments = 0
        if act_gb > max_act_gb:
            blocks = self.model.blocks
            self.segments = math.ceil(math.sqrt(len(blocks)))
            blocks.checkpoint_segments = self.segments
        self.device = torch.device(device)
        self.model.to(self.device)
        self.x = torch.randn(batch, *shape, device=self.device)
        self.y = torch.randint(0, 10, (batch,), device=self.device)
        if layout == "nhwc":
            self.model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        cfg = TrainConfig(
            optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
            scalar_lr_mult=0.1 if scheme == "fixup" else 1.0,
        )  # fmt: skip
        self.opt = make_optimizer(self.model, cfg)
        self.flops = self.flops_executed = 0.0

    def step(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        _sync(self.device)
        return time.perf_counter() - t0

    def count(self) -> None:
        """FLOPs of one step (forward and backward, no recomputation). Above
        :data:`COUNT_DIRECT` layers they are extrapolated from the 8- and 14-layer nets of the
        same scheme, input and layout, which is exact: every block after a stage's first has
        the same FLOPs, so a step's count is ``F(8) + (n − 1)·(F(14) − F(8))`` for ``n`` blocks
        per stage. (``FlopCounterMode`` tracks every module, and on exit from a step of a
        10,004-layer net its hook removal crashed the interpreter here.)"""
        for executed in (False, True):
            if self.depth <= COUNT_DIRECT:
                flops = _count(self.model, self.x, self.y, executed)
                self.opt.zero_grad(set_to_none=True)
            else:
                small = [
                    Run(self.scheme, d, self.shape, self.layout, len(self.x), math.inf, self.device)
                    for d in (8, 14)
                ]
                f1, f2 = (_count(r.model, r.x, r.y, executed) for r in small)
                flops = f1 + ((self.depth - 2) // 6 - 1) * (f2 - f1)
            if executed:
                self.flops_executed = flops
            else:
                self.flops = flops


#: the deepest net whose FLOPs are counted directly (see :meth:`Run.count`)
COUNT_DIRECT = 2000


def _count(model, x, y, executed: bool = False) -> float:
    """FLOPs of one forward and backward pass of ``model`` on ``(x, y)``, without recomputation:
    the model's (every layer module by module, ``fusion(False)``) or, with ``executed``, those
    of the kernels the step runs (see the module docstring)."""
    blocks = model.blocks
    segments, blocks.checkpoint_segments = blocks.checkpoint_segments, 0
    try:
        with dl.nn.fusion(executed), FlopCounterMode(display=False) as fc:
            F.cross_entropy(model(x), y).backward()
    finally:
        blocks.checkpoint_segments = segments
    return float(fc.get_total_flops())


def _key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in ("scheme", "depth", "input", "layout"))


def _kept_rows(path: str) -> list[dict]:
    """The rows of an earlier CSV (``--append``); this run replaces those it measures again."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _time_model(spec: dict) -> dict:
    """In a process of its own: build one model, count its FLOPs (``spec["count"]``), warm up and
    time ``spec["steps"]`` steps."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    if spec["keep"]:
        keep_freed_memory()
    r = Run(*spec["run"])
    if spec["count"]:
        r.count()
    for _ in range(spec["warmup"]):
        r.step()
    times, faults = [], []
    for _ in range(spec["steps"]):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times.append(r.step())
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"times": times, "faults": faults, "flops": r.flops, "executed": r.flops_executed,
            "segments": r.segments}  # fmt: skip


class Timed:
    """One model's figures, gathered from its processes."""

    def __init__(self, scheme: str, layout: str, shape: tuple, depth: int) -> None:
        self.scheme, self.layout, self.shape, self.depth = scheme, layout, shape, depth
        self.times: list[float] = []
        self.faults: list[int] = []
        self.flops = self.flops_executed = 0.0
        self.segments = 0

    @property
    def label(self) -> str:
        ck = f", ckpt {self.segments}" if self.segments else ""
        return f"{self.scheme} {self.depth} {'x'.join(map(str, self.shape))} {self.layout}{ck}"


def _measure_group(depth: int, shape: tuple, args: argparse.Namespace, peak: dict) -> list[dict]:
    """Count and time every scheme × layout at one depth and input, each model in a process of
    its own (one at a time: at 10,004 layers a model holds ≈ 2 GB of parameters, gradients and
    momentum and several GB of activations); their rows."""
    runs = [
        Timed(s, lay, shape, depth)
        for s in args.schemes.split(",")
        for lay in args.layouts.split(",")
    ]
    ctx = multiprocessing.get_context("spawn")
    for k in range(args.rounds):
        for r in runs[k % len(runs) :] + runs[: k % len(runs)]:
            spec = {
                "run": (r.scheme, depth, shape, r.layout, args.batch, args.max_act_gb, args.device),
                "threads": torch.get_num_threads(), "keep": args.malloc.startswith("kept"),
                "count": k == 0, "warmup": args.warmup, "steps": args.steps,
            }  # fmt: skip
            huge = starting_workers() if args.malloc == "kept+huge" else nullcontext()
            with huge, ProcessPoolExecutor(1, mp_context=ctx) as pool:
                got = pool.submit(_time_model, spec).result()
            r.times += got["times"]
            r.faults += got["faults"]
            if k == 0:
                r.flops, r.flops_executed, r.segments = (
                    got["flops"],
                    got["executed"],
                    got["segments"],
                )
    rows = []
    for r in runs:
        t = statistics.median(r.times)
        rate = r.flops / t
        row = {
            "scheme": r.scheme, "depth": depth, "input": "x".join(map(str, shape)),
            "layout": r.layout, "checkpoint_segments": r.segments, "batch": args.batch,
            "threads": torch.get_num_threads(), "device": args.device_name,
            "malloc": args.malloc,
            "s_per_step": round(t, 4), "s_min": round(min(r.times), 4),
            "s_max": round(max(r.times), 4), "warmup": args.warmup,
            "minor_faults_per_step": int(statistics.median(r.faults)),
            "gflop_per_step": round(r.flops / 1e9, 2),
            "gflops": round(rate / 1e9, 2),
            "pct_conv_train_peak": round(100 * rate / peak["conv_train"], 1),
            "pct_conv_fwd_peak": round(100 * rate / peak["conv_fwd"], 1),
            "gflop_executed": round(r.flops_executed / 1e9, 2),
            "pct_conv_train_peak_executed": round(
                100 * r.flops_executed / t / peak["conv_train"], 1
            ),
            "conv_train_peak_gflops": round(peak["conv_train"] / 1e9, 1),
            "conv_fwd_peak_gflops": round(peak["conv_fwd"] / 1e9, 1),
        }  # fmt: skip
        rows.append(row)
        print(
            f"{r.label:38s} {t:8.3f} s/step ({min(r.times):.3f}–{max(r.times):.3f})  "
            f"{row['gflops']:6.1f} GFLOP/s  {row['pct_conv_train_peak']:5.1f}% of conv "
            f"train peak, {row['pct_conv_fwd_peak']:5.1f}% of conv fwd peak (executed FLOPs: "
            f"{row['pct_conv_train_peak_executed']:.1f}% of train peak)",
            flush=True,
        )
    for r in runs:  # NHWC vs NCHW, side by side
        base = [q for q in runs if q.scheme == r.scheme and q.layout == "nchw"]
        if r.layout == "nhwc" and base:
            ratio = statistics.median(base[0].times) / statistics.median(r.times)
            print(f"  {r.scheme} {depth} {r.shape}: channels-last {ratio:.2f}× NCHW")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depths", default="1004,10004")
    ap.add_argument("--inputs", default="1x8x8,3x32x32")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--layouts", default="nchw,nhwc")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model and round")
    ap.add_argument("--rounds", type=int, default=2, help="processes per model, in turn")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    ap.add_argument("--max-act-gb", type=float, default=6.0,
                    help="checkpoint a model whose activations would exceed this")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); sweeps run 1 per cell")  # fmt: skip
    ap.add_argument("--csv", default=None,
                    help="default: results/deep_resnet.csv (cuda: …_cuda.csv)")  # fmt: skip
    ap.add_argument("--append", action="store_true",
                    help="keep the CSV's other rows (replace those measured again)")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu | cuda (or cuda:N)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="glibc's malloc as it comes (default: freed memory kept for reuse, as "
                         "in depthlab run's workers)")  # fmt: skip
    args = ap.parse_args(argv)
    kept = not args.default_malloc and keep_freed_memory()
    huge = kept and f"{HUGE_PAGES_TUNABLE}=1" in worker_environment().get("GLIBC_TUNABLES", "")
    args.malloc = ("kept+huge" if huge else "kept") if kept else "default"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.csv is None:
        args.csv = str(
            RESULTS if device.type == "cpu" else RESULTS.with_name("deep_resnet_cuda.csv")
        )
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.inputs.split(",")]
    depths = [int(d) for d in args.depths.split(",")]
    print(
        f"torch {torch.__version__}, {args.device_name}, {torch.get_num_threads()} threads, "
        f"batch {args.batch}, malloc {args.malloc}"
    )
    peak = peaks(device)
    print(
        f"peaks: conv fwd {peak['conv_fwd'] / 1e9:.1f} GFLOP/s, conv train (fwd + bwd) "
        f"{peak['conv_train'] / 1e9:.1f} GFLOP/s"
    )
    rows = _kept_rows(args.csv) if args.append else []
    for depth in depths:
        for shape in shapes:
            group = _measure_group(depth, shape, args, peak)
            keys = {_key(r) for r in group}
            rows = [r for r in rows if _key(r) not in keys] + group
            rows.sort(key=lambda r: (int(r["depth"]), r["input"], r["scheme"], r["layout"]))
            write_csv("deep_resnet.csv", rows, args.csv)  # after every group: nothing is lost
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
