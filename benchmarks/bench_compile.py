"""Does ``torch.compile`` make the deep ResNets' CPU steps faster? Eager against compiled, side by
side, on the nets of ``bench_deep_resnet.py``.

    .venv/bin/python benchmarks/bench_compile.py                    # 110 and 1,004 layers
    .venv/bin/python benchmarks/bench_compile.py --depths 110 --modes eager,model --steps 10

The nets and the step are ``bench_deep_resnet.py``'s (its ``Run``: depthlab's CIFAR ResNets on
1×8×8 inputs, batch 32, channels-last, ``batchnorm`` / ``fixup`` (post-activation) /
``skipinit``; forward, cross-entropy, backward and the experiments' fused SGD), one thread, freed
memory kept for reuse as in ``depthlab run``'s workers. Three modes:

* ``eager``: as ``depthlab run`` trains them (depthlab's fused kernels: the 2×2-map convolutions
  as one matrix product, the fused scalars);
* ``blocks``: every residual block compiled (``nn.Module.compile``: "regional compilation", one
  compiled graph per block shape, shared by the blocks of a stage; Dynamo traces
  ``nn.Conv2d``'s own path, so Inductor fuses the pointwise ops around oneDNN's convolutions);
* ``model``: the whole network compiled into one graph (its compile time grows with depth:
  only nets of at most ``--model-max-depth`` layers);
* ``graphs`` (``--device cuda`` only): ``blocks`` with ``mode="reduce-overhead"``, each compiled
  block replayed as a CUDA graph — one launch where eager PyTorch launches every kernel, the
  cost that sets the pace of these narrow nets on a GPU (``bench_deep_resnet.py``'s H200 rows).

Each (scheme, depth, mode) runs in a process of its own, the modes taking turns in each of
``--rounds`` rounds; a process takes ``--warmup`` untimed steps (the first one compiles: its time
is reported as ``first_step_s``) and then ``--steps`` timed ones. The table gives the median
seconds per step, and each compiled mode's speed-up over eager of the same scheme and depth,
measured in the same run; the CSV (``results/compile_resnet.csv``; on a GPU
``compile_resnet_cuda.csv``) every figure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch

from _results import RESULTS, write_csv
from bench_deep_resnet import SCHEMES, Run
from depthlab.heap import keep_freed_memory

MODES = ("eager", "blocks", "model", "graphs")


def _time(spec: dict) -> dict:
    """In a process of its own: build the net, compile it as ``spec["mode"]`` says, time it."""
    torch.set_num_threads(spec["threads"])
    keep_freed_memory()
    r = Run(
        spec["scheme"], spec["depth"], spec["shape"], "nhwc", spec["batch"], float("inf"),
        spec["device"],
    )  # fmt: skip
    mode = spec["mode"]
    if mode in ("blocks", "graphs"):
        for block in r.model.blocks:
            block.compile(mode="reduce-overhead" if mode == "graphs" else None)
    elif mode == "model":
        r.model = torch.compile(r.model)

    def step() -> float:
        if mode == "graphs":  # a new iteration: the graphs' outputs of the last one may go
            torch.compiler.cudagraph_mark_step_begin()
        return r.step()

    first = step()
    for _ in range(spec["warmup"] - 1):
        step()
    return {"first": first, "times": [step() for _ in range(spec["steps"])]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depths", default="110,1004")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--modes", default=None,
                    help="default: eager,blocks,model (and graphs on a GPU)")  # fmt: skip
    ap.add_argument("--input", default="1x8x8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (≥ 1)")
    ap.add_argument("--rounds", type=int, default=2, help="processes per net and mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-max-depth", type=int, default=200,
                    help="the deepest net compiled whole (mode 'model')")  # fmt: skip
    ap.add_argument("--device", default="cpu", help="cpu | cuda (or cuda:N)")
    ap.add_argument("--csv", default=None,
                    help="default: results/compile_resnet.csv (cuda: …_cuda.csv)")  # fmt: skip
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    modes = args.modes.split(",") if args.modes else list(MODES if cuda else MODES[:3])
    bad = [m for m in modes if m not in MODES]
    if bad or args.warmup < 1 or ("graphs" in modes and not cuda):
        ap.error(f"--modes takes {', '.join(MODES)} ('graphs' with --device cuda); --warmup ≥ 1")
    shape = tuple(int(v) for v in args.input.split("x"))
    name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    csv_path = args.csv or str(
        RESULTS / ("compile_resnet_cuda.csv" if cuda else "compile_resnet.csv")
    )
    print(
        f"torch {torch.__version__}, {name}, {args.threads} thread(s), batch {args.batch}, {shape}"
    )
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        for scheme in args.schemes.split(","):
            runs = [m for m in modes if m != "model" or depth <= args.model_max_depth]
            got: dict[str, dict] = {m: {"times": [], "first": []} for m in runs}
            for k in range(args.rounds):
                for mode in runs[k % len(runs) :] + runs[: k % len(runs)]:
                    spec = {"scheme": scheme, "depth": depth, "shape": shape, "mode": mode,
                            "batch": args.batch, "threads": args.threads, "device": args.device,
                            "warmup": args.warmup, "steps": args.steps}  # fmt: skip
                    try:
                        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                            res = pool.submit(_time, spec).result()
                    except Exception as e:  # noqa: BLE001 - a mode that fails here is reported
                        print(f"{scheme} {depth} {mode}: failed ({type(e).__name__}: {e})")
                        continue
                    got[mode]["times"] += res["times"]
                    got[mode]["first"].append(res["first"])
            got = {m: g for m, g in got.items() if g["times"]}
            eager = statistics.median(got["eager"]["times"]) if "eager" in got else None
            for mode, g in got.items():
                t = statistics.median(g["times"])
                row = {
                    "scheme": scheme, "depth": depth, "input": args.input, "mode": mode,
                    "batch": args.batch, "threads": args.threads, "device": name,
                    "torch": torch.__version__,
                    "s_per_step": round(t, 4), "s_min": round(min(g["times"]), 4),
                    "s_max": round(max(g["times"]), 4),
                    "first_step_s": round(statistics.median(g["first"]), 2),
                    "speedup_vs_eager": round(eager / t, 3) if eager else "",
                }  # fmt: skip
                rows.append(row)
                vs = f"{row['speedup_vs_eager']:.2f}× eager" if eager else ""
                print(
                    f"{scheme:9s} {depth:6d} {mode:6s} {t:8.4f} s/step "
                    f"({row['s_min']:.4f}–{row['s_max']:.4f})  first step "
                    f"{row['first_step_s']:7.2f} s  {vs}",
                    flush=True,
                )
            write_csv("compile_resnet.csv", rows, csv_path)  # after every net: nothing is lost
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
