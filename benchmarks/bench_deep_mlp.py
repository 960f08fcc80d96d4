"""A 10,000-layer, width-256 ReZero MLP (Bachlechner et al. 2020, arXiv 2003.04887), batch 128:
time per training step, achieved GFLOP/s against the matmul peak measured in the same run, and
peak memory with and without activation checkpointing.

    .venv/bin/python benchmarks/bench_deep_mlp.py                     # depth 10,000
    .venv/bin/python benchmarks/bench_deep_mlp.py --depth 1000 --fit  # + fit 512 random labels
    .venv/bin/python benchmarks/bench_deep_mlp.py --scheme layernorm --width 64 --batch 64 --no-sgd

``--scheme layernorm`` times the pre-LayerNorm residual MLP instead (``x + W relu(LN(x)) + b``,
deep-fc's FC+LayerNorm arm), whose fused stack runs torch's LayerNorm kernels inside its nodes;
its FLOP count leaves out the LayerNorms (≈ 8·B·W per layer, small beside ``6·B·W²``).

Method.

* **Peak**: the best of (a) a chain of the model's own matmuls, ``(128×256) @ (256×256)`` in a
  loop (300), and (b) three ``1024×1024`` sgemms, each timed (CPU time) after a warm-up, in the
  child process *just before every timed step*: this VM's speed drifts by ±30% within minutes,
  so each step is compared with the peak of its own moment, and ``% peak`` is the median of
  those per-step ratios (their range is printed beside it).
* **Step**: one SGD step (``zero_grad``, forward, cross-entropy, backward, ``step``) on a fixed
  random batch, the same operations and optimizer (``make_optimizer``) :func:`depthlab.train`
  runs; median of ``--steps`` timed steps after one warm-up step. Four or five configurations — the
  fused stack (:mod:`depthlab.nn.fusion.stack`) without and with checkpointing, the fused stack with
  the same SGD step taken by its weights inside the backward pass
  (:class:`~depthlab.nn.fusion.stack.SGDInBackward`, ``TrainConfig(sgd_in_backward=True)``;
  ``--no-sgd`` drops it), with ``--threads`` ≥ 2 the fused stack without its gradient thread
  (``GRAD_THREAD = False``), and the same model module by module (``blocks.fuse = False``;
  ``--no-compare`` drops it) — run in one child process, one step each per round in rotated
  order, so that the time ratios compare steps
  taken minutes apart at most. The child first lets glibc keep freed memory (``--malloc
  keep``: no heap trimming, mmap only above 32 MiB), so that the configurations do not hand
  each other's memory back to the kernel between steps; minor page faults per step are
  printed (``faults``). Both wall time and CPU time
  (``time.process_time``) are taken; GFLOP/s, % of peak and the time ratio use CPU time, which
  on a shared machine does not count the time other processes hold the core (with one thread,
  CPU time is the compute time; with ``--threads`` > 1 it sums over threads). FLOPs are counted
  analytically: ``6·B·W²`` per hidden layer (forward ``2BW²``, backward ``4BW²``) plus the stem
  and classifier.
* **Memory** (after the timed steps, one memory step per configuration; before each, glibc's
  mmap threshold is set to 64 KiB and ``malloc_trim`` run, so that freed tensors go back to the
  OS and RSS tracks live memory): ``rss_model`` is the resident set after the timed steps
  (parameters, gradients, optimizer state; for SGD in the backward pass, after the gradients
  are freed, since it never holds the weights'); then one more step runs with
  gradients zeroed in place (not freed), and its peak resident set is read from the kernel's
  high-water mark ``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to
  ``/proc/self/clear_refs`` just before. ``step_mem`` = peak −
  ``rss_model`` is what a training step adds: activations saved for backward and temporaries.
  (``tracemalloc`` does not see torch's allocations, hence RSS.) Checkpointing can only shrink
  ``step_mem``: at width 256 and batch 128 the parameters, their gradients and the saved
  activations are each ≈ ``depth·W²`` floats, so the *total* peak cannot fall below ~2/3.
* **Activation checkpointing**: ``model.blocks.checkpoint_segments = s`` (default ``√depth``):
  only segment inputs are kept and each segment's forward is recomputed in the backward pass.
* ``--fit``: SGD (lr ``--fit-lr``, momentum 0.9) on shuffled minibatches (``--fit-batch``, 128)
  of 512 Gaussian inputs with random labels (``synthetic`` data set, ``random-labels``) until an
  epoch's predictions are all right and a full forward pass confirms 100% training accuracy;
  the stack's weights step in the backward pass unless ``--fit-grads``.

Targets (issue 3): ≥ 50% of the measured matmul peak; checkpointing cuts step memory to ≤ 1/3 at
≤ 1.4× the step time.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import depthlab as dl
from _results import write_csv
from depthlab.nn.fusion import stack as fused
from depthlab.nn.fusion.stack import SGDInBackward
from depthlab.train.optim import make_optimizer


def matmul_peak(width: int, batch: int, reps: int = 300, big: int = 3) -> dict[str, float]:
    """GFLOP per CPU-second of the model-shaped matmul chain and of ``big`` 1024³ sgemms."""
    out = {}
    w = torch.randn(width, width) / math.sqrt(width)
    x = torch.randn(batch, width)
    for _ in range(10):
        y = x @ w
    t = time.process_time()
    y = x
    for _ in range(reps):
        y = y @ w
    dt = time.process_time() - t
    out["chain"] = 2 * batch * width * width * reps / dt / 1e9
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.process_time()
    for _ in range(big):
        a @ b
    out["sgemm"] = 2 * n**3 * big / (time.process_time() - t) / 1e9
    return out


def step_flops(depth: int, width: int, batch: int, in_dim: int, classes: int) -> float:
    return 6.0 * batch * (depth * width * width + in_dim * width + width * classes)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _malloc_policy(trim_threshold: int, mmap_threshold: int, trim_now: bool = False) -> bool:
    """Set glibc's ``M_TRIM_THRESHOLD`` (-1: never trim) and ``M_MMAP_THRESHOLD``; optionally
    give back what the heap holds free now. False where this is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(-1, trim_threshold) and libc.mallopt(-3, mmap_threshold)
        if trim_now:
            libc.malloc_trim(0)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def _keep_freed_memory() -> bool:
    """Let glibc keep freed memory in the heap (no trimming; mmap only above 32 MiB), as a
    caching allocator would: otherwise the configurations, alternating, each give back the
    other's memory and every step pays page faults for its activations and gradients (a
    training loop repeating one configuration reaches that steady state by itself)."""
    return _malloc_policy(-1, 32 << 20)


def _return_freed_memory() -> None:
    """From now on let glibc serve allocations ≥ 64 KiB with mmap (freed tensors leave the
    resident set at once; trimming at glibc's default 128 KiB) and give back what the heap
    holds free, so that RSS tracks live memory. Done only for the memory step: per-allocation
    mmap slows the timed steps."""
    _malloc_policy(128 << 10, 64 << 10, trim_now=True)


def measure(args: argparse.Namespace) -> dict:
    """Build and warm up; time ``steps`` rounds of one step without and one with checkpointing
    (``segments``), alternating, each after a peak measurement; then one memory step per
    configuration. Runs inside the child process."""
    depth, width, batch, steps = args.depth, args.width, args.batch, args.steps
    segments, momentum = args.segments, args.momentum
    kept = args.malloc == "keep" and _keep_freed_memory()
    torch.manual_seed(0)
    t = time.perf_counter()
    model = dl.create_model("mlp", depth=depth, width=width, scheme=args.scheme, in_dim=64)
    build_s = time.perf_counter() - t
    opt = make_optimizer(model, dl.TrainConfig(lr=1e-3, momentum=momentum))
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    # (name, checkpoint segments, fused): the fused stack without and with checkpointing, and
    # the same model run module by module (fuse=False) for comparison
    configs = [("0", 0, True, None), (str(segments), segments, True, None)]
    if torch.get_num_threads() >= 2:  # the fused backward without its gradient thread
        configs.append(("inline", 0, True, None))
    if not args.no_sgd:  # the same SGD step, taken by the weights during the backward pass
        configs.append(("sgd", 0, True, SGDInBackward(opt)))
    if not args.no_compare:
        configs.append(("modules", 0, False, None))
    settings = {name: rest for name, *rest in configs}
    configs = [name for name, *_ in configs]

    def step(name: str, set_to_none: bool = True) -> None:
        blocks = model.blocks
        blocks.checkpoint_segments, blocks.fuse, blocks.sgd_in_backward = settings[name]
        fused.GRAD_THREAD = name != "inline"
        opt.zero_grad(set_to_none=set_to_none or blocks.sgd_in_backward is not None)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for name in configs:  # warm-up: allocates gradients and optimizer state
        step(name)
    flops = step_flops(depth, width, batch, 64, 10)
    rec = {name: {"wall": [], "cpu": [], "peak": [], "ratio": [], "faults": []} for name in configs}
    for r in range(steps):
        k = r % len(configs)
        for segs in configs[k:] + configs[:k]:  # rotate which goes first
            peak = max(matmul_peak(width, batch).values())  # just before this step
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t, c = time.perf_counter(), time.process_time()
            step(segs)
            wall, cpu = time.perf_counter() - t, time.process_time() - c
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            for key, val in (("wall", wall), ("cpu", cpu), ("peak", peak), ("faults", faults)):
                rec[segs][key].append(val)
            rec[segs]["ratio"].append(flops / cpu / 1e9 / peak)
    _return_freed_memory()
    out = {"build_s": build_s, "malloc_kept": kept, "configs": {}}
    # SGD in the backward pass last: it frees the weight gradients the others hold
    for segs in sorted(configs, key=lambda name: name == "sgd"):
        if segs == "sgd":  # this configuration never holds the weight gradients
            opt.zero_grad(set_to_none=True)
            _return_freed_memory()
        elif any(p.grad is None for p in model.parameters()):  # (the last timed step was "sgd")
            step(segs)
            _return_freed_memory()
        rss_model = _rss_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS high-water mark
            hwm_reset = True
        except OSError:
            hwm_reset = False
        step(segs, set_to_none=False)  # gradients zeroed in place: the baseline holds them
        peak_rss = _rss_kb("VmHWM")
        _return_freed_memory()
        r = rec[segs]
        out["configs"][segs] = {
            "step_s": statistics.median(r["wall"]),
            "cpu_s": statistics.median(r["cpu"]),
            "cpu_all": r["cpu"],
            "wall_all": r["wall"],
            "faults": statistics.median(r["faults"]),
            "peak_gflops": statistics.median(r["peak"]),
            "peak_ratio": statistics.median(r["ratio"]),
            "peak_ratio_range": (min(r["ratio"]), max(r["ratio"])),
            "rss_model_mb": rss_model / 1024,
            "peak_mb": peak_rss / 1024,
            "step_mem_mb": (peak_rss - rss_model) / 1024,
            "hwm_reset": hwm_reset,
        }
    return out


def run_child(args: argparse.Namespace, segments: int) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, __file__, "--child", "--depth", str(args.depth)]
    cmd += ["--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--segments", str(segments), "--momentum", str(args.momentum)]
    cmd += ["--malloc", args.malloc] + (["--no-compare"] if args.no_compare else [])
    cmd += ["--no-sgd"] if args.no_sgd else []
    cmd += ["--threads", str(args.threads), "--scheme", args.scheme]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def fit_random_labels(args: argparse.Namespace) -> dict:
    """SGD (momentum 0.9) on shuffled minibatches of the 512 examples until one epoch's
    predictions (made before each update) are all right; then one forward pass over the whole
    set (no update) confirms 100% training accuracy. The stack's weights take their step in the
    backward pass (:class:`~depthlab.nn.fusion.stack.SGDInBackward`) unless ``--fit-grads``."""
    torch.manual_seed(0)
    data = dl.create_dataset("synthetic", kind="random-labels", n=512, dim=64, num_classes=10)
    model = dl.create_model("mlp", depth=args.depth, width=args.width, scheme="rezero", in_dim=64)
    model.blocks.checkpoint_segments = args.fit_segments
    opt = torch.optim.SGD(model.parameters(), lr=args.fit_lr, momentum=0.9)
    if not args.fit_grads:  # the same SGD, the stack's weights stepped in the backward pass
        model.blocks.sgd_in_backward = SGDInBackward(opt)
    x, y = data.x_train, data.y_train
    n, bs = len(y), min(args.fit_batch, len(y))
    g = torch.Generator().manual_seed(0)
    t, c = time.perf_counter(), time.process_time()
    step, acc, fitted = 0, 0.0, False
    while step < args.fit_max_steps and not fitted:
        perm, correct, total = torch.randperm(n, generator=g), 0, 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            opt.zero_grad(set_to_none=True)
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            loss.backward()
            opt.step()
            step += 1
            correct += int((out.argmax(1) == y[idx]).sum())
            total += loss.item() * len(idx)
        acc = correct / n
        if args.verbose:
            print(f"  fit step {step}: epoch loss {total / n:.4f}, accuracy {acc:.3f}", flush=True)
        if not math.isfinite(total):
            break
        if acc == 1.0:
            with torch.no_grad():
                acc = (model(x).argmax(1) == y).float().mean().item()
            fitted = acc == 1.0
    return {
        "steps": step if fitted else None,
        "seconds": time.perf_counter() - t,
        "cpu_seconds": time.process_time() - c,
        "accuracy": acc,
        "diverged": not math.isfinite(total),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=10_000)
    ap.add_argument(
        "--scheme",
        choices=("rezero", "layernorm"),
        default="rezero",
        help="layernorm: the pre-LN residual MLP (x + W relu(LN(x)) + b), deep-fc's FC+LayerNorm",
    )
    ap.add_argument(
        "--csv",
        default=None,
        help="default benchmarks/results/deep_mlp.csv (--scheme layernorm: deep_mlp_layernorm.csv)",
    )
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--segments", type=int, default=0, help="checkpoint segments (0: √depth)")
    ap.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (0 saves memory)")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 default: shared machine; 0: torch's)",
    )
    ap.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory (no page faults from the alternation; default)",
    )
    ap.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the module-by-module (fuse=False) configuration",
    )
    ap.add_argument(
        "--no-sgd",
        action="store_true",
        help="skip the SGD-in-the-backward-pass (SGDInBackward) configuration",
    )
    ap.add_argument("--fit", action="store_true", help="also time fitting 512 random labels")
    ap.add_argument("--fit-lr", type=float, default=0.01)
    ap.add_argument("--fit-batch", type=int, default=128, help="minibatch size for --fit")
    ap.add_argument("--fit-max-steps", type=int, default=2000)
    ap.add_argument("--fit-segments", type=int, default=0, help="checkpoint segments for --fit")
    ap.add_argument(
        "--fit-grads",
        action="store_true",
        help="--fit with weight gradients and optimizer.step() (default: SGD in the backward pass)",
    )
    ap.add_argument("--fit-only", action="store_true", help="skip the timing and memory table")
    ap.add_argument("--verbose", action="store_true", help="print every --fit step")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        res = measure(args)
        print(json.dumps(res))
        return 0
    if args.fit_only:
        print_fit(args)
        return 0
    segments = args.segments or max(1, round(math.sqrt(args.depth)))
    flops = step_flops(args.depth, args.width, args.batch, 64, 10)
    res = run_child(args, segments)
    plain, ckpt = res["configs"]["0"], res["configs"][str(segments)]
    print(
        f"{'ReZero' if args.scheme == 'rezero' else 'pre-LayerNorm'} MLP depth {args.depth}, "
        f"width {args.width}, batch {args.batch}, "
        f"threads {torch.get_num_threads()}; model built in {res['build_s']:.1f} s; "
        "malloc "
        f"{'keeps freed memory' if res['malloc_kept'] else 'default'}"
    )
    print(
        f"{flops / 1e9:.1f} GFLOP per step; matmul peak = best of a (B×W)@(W×W) chain and 1024³ "
        "sgemms, GFLOP per CPU-second, measured just before each timed step; % peak = median "
        "over steps of (step GFLOP/s) / (that peak); the two configurations alternate step by step"
    )
    head = f"{'config':<22}{'s/step':>9}{'CPU s':>8}{'GFLOP/s':>9}{'peak':>7}{'% peak':>8}"
    head += f"{'range':>10}{'model MB':>10}"
    head += f"{'peak MB':>9}{'step MB':>9}{'time x':>8}{'step mem x':>11}{'faults':>9}"
    print(head)
    rows = [("no checkpointing", plain), (f"checkpoint {segments} seg", ckpt)]
    if "sgd" in res["configs"]:
        rows.append(("SGD in backward", res["configs"]["sgd"]))
    if "inline" in res["configs"]:
        rows.append(("no gradient thread", res["configs"]["inline"]))
    if "modules" in res["configs"]:
        rows.append(("module by module", res["configs"]["modules"]))
    for name, r in rows:
        gf = flops / r["cpu_s"] / 1e9
        lo, hi = r["peak_ratio_range"]
        print(
            f"{name:<22}{r['step_s']:>9.2f}{r['cpu_s']:>8.2f}{gf:>9.1f}{r['peak_gflops']:>7.0f}"
            f"{100 * r['peak_ratio']:>7.0f}%{f'{100 * lo:.0f}-{100 * hi:.0f}%':>10}"
            f"{r['rss_model_mb']:>10.0f}{r['peak_mb']:>9.0f}{r['step_mem_mb']:>9.0f}"
            f"{r['cpu_s'] / plain['cpu_s']:>8.2f}"
            f"{r['step_mem_mb'] / max(plain['step_mem_mb'], 1e-9):>11.2f}{r['faults']:>9.0f}"
        )
    name = "deep_mlp.csv" if args.scheme == "rezero" else f"deep_mlp_{args.scheme}.csv"
    write_csv(name, _csv_rows(args, rows, flops, plain), args.csv)
    pairs = [c / p for c, p in zip(ckpt["cpu_all"], plain["cpu_all"])]
    print(
        "checkpointing time ratio per round (CPU): "
        + ", ".join(f"{q:.2f}" for q in pairs)
        + f"; median {statistics.median(pairs):.2f}"
    )
    if "inline" in res["configs"]:
        for key, label in (("cpu_all", "CPU"), ("wall_all", "wall")):
            pairs = [i / p for i, p in zip(res["configs"]["inline"][key], plain[key])]
            print(
                f"gradient-thread speed-up over the fused backward without it per round ({label}): "
                + ", ".join(f"{q:.2f}" for q in pairs)
                + f"; median {statistics.median(pairs):.2f}"
            )
    if "sgd" in res["configs"]:
        pairs = [p / s for s, p in zip(res["configs"]["sgd"]["cpu_all"], plain["cpu_all"])]
        print(
            "SGD-in-backward speed-up over the step with gradients per round (CPU): "
            + ", ".join(f"{q:.2f}" for q in pairs)
            + f"; median {statistics.median(pairs):.2f}"
        )
    if "modules" in res["configs"]:
        pairs = [m / p for m, p in zip(res["configs"]["modules"]["cpu_all"], plain["cpu_all"])]
        print(
            "fused speed-up over module by module per round (CPU): "
            + ", ".join(f"{q:.2f}" for q in pairs)
            + f"; median {statistics.median(pairs):.2f}"
        )
    if not (plain["hwm_reset"] and ckpt["hwm_reset"]):
        print("note: /proc/self/clear_refs not writable; peaks include the warm-up step")
    if args.fit:
        print_fit(args)
    return 0


def _csv_rows(args: argparse.Namespace, rows: list, flops: float, plain: dict) -> list[dict]:
    """The table's rows for ``benchmarks/results/deep_mlp.csv``."""
    out = []
    for name, r in rows:
        lo, hi = r["peak_ratio_range"]
        out.append({
            "config": name, "depth": args.depth, "width": args.width, "batch": args.batch,
            "s_per_step": round(r["step_s"], 3), "cpu_s": round(r["cpu_s"], 3),
            "gflops": round(flops / r["cpu_s"] / 1e9, 1),
            "pct_peak": round(100 * r["peak_ratio"]),
            "pct_peak_range": f"{100 * lo:.0f}–{100 * hi:.0f}",
            "model_mb": round(r["rss_model_mb"]), "step_mb": round(r["step_mem_mb"]),
            "time_x": round(r["cpu_s"] / plain["cpu_s"], 2),
            "step_mem_x": round(r["step_mem_mb"] / max(plain["step_mem_mb"], 1e-9), 2),
        })  # fmt: skip
    return out


def print_fit(args: argparse.Namespace) -> None:
    fit = fit_random_labels(args)
    where = f"depth {args.depth}, batch {args.fit_batch}, lr {args.fit_lr}, momentum 0.9, "
    where += "optimizer.step()" if args.fit_grads else "SGD in the backward pass"
    if fit["diverged"]:
        print(
            f"fit 512 random labels: diverged (loss not finite) ({fit['seconds']:.0f} s; {where})"
        )
    elif fit["steps"] is None:
        print(
            f"fit 512 random labels: not reached in {args.fit_max_steps} steps "
            f"({fit['seconds']:.0f} s, accuracy {fit['accuracy']:.3f}; {where})"
        )
    else:
        print(
            f"fit 512 random labels to 100% train accuracy: {fit['steps']} steps, "
            f"{fit['seconds']:.1f} s wall, {fit['cpu_seconds']:.1f} s CPU ({where})"
        )


if __name__ == "__main__":
    sys.exit(main())
