"""Training steps of the `deep` arms whose signals underflow, with and without flushing denormals.

    .venv/bin/python benchmarks/bench_denormal.py                 # every network, 3 steps
    .venv/bin/python benchmarks/bench_denormal.py --nets scaled-1004 --steps 5

Some arms of the ``deep`` grid are there to fail: the 1/√2-scaled ResNet, the skip-free MLP. In
float32 their activations or gradients shrink below 2⁻¹²⁶ ≈ 1.2e-38 (denormal numbers), and a
CPU does arithmetic on denormals many times slower than on normal numbers. ``torch.set_flush_
denormal(True)`` (flush-to-zero and denormals-are-zero) removes the penalty but changes the
arithmetic: a denormal becomes 0. This script measures both sides of that trade for each
network, as the experiments build it (:func:`depthlab.experiments.timing.build_step`, one
thread), in a fresh process per mode — ``ieee`` (``--no-flush-denormal``) and ``flush`` (the
``deep`` preset's default): seconds
per step (median of ``--steps`` steps from the same initialisation and batch), the number of
denormal gradient entries after the last step and the loss of each step, so that a change in the
training itself is visible (``max_loss_diff``). It decides nothing; CSV
``benchmarks/results/denormal.csv``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from _results import child_result, chosen, print_table, write_csv

#: name: (model, sizes, batch, example shape, scheme, optimizer, channels-last, experiment arm)
NETS = {
    "scaled-1004": ("resnet", {"depth": 1004, "width": 1, "variant": "preact"}, 64, (1, 8, 8),
                    "scaled", "sgd", True, "depth-sweep scaled"),
    "wrn-1000-k2-scaled": ("resnet", {"depth": 1000, "width": 2, "variant": "preact"}, 64,
                           (1, 8, 8), "scaled", "sgd", True, "skipinit-depth scaled"),
    "mlp-10000-noskip": ("mlp", {"depth": 10000, "width": 64, "in_dim": 64}, 64, (64,), "noskip",
                         "adam", False, "deep-fc noskip"),
    "bn-1004": ("resnet", {"depth": 1004, "width": 1, "variant": "preact"}, 64, (1, 8, 8),
                "batchnorm", "sgd", True, "depth-sweep batchnorm (a control: no denormals)"),
}  # fmt: skip
MODES = ("ieee", "flush")


def child(net: str, mode: str, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    from depthlab.experiments.timing import Step, build_step

    torch.set_num_threads(1)
    torch.set_flush_denormal(mode == "flush")
    model_name, sizes, batch, shape, scheme, optimizer, cl, _ = NETS[net]
    if model_name == "resnet":
        sizes = {**sizes, "in_channels": shape[0]}
    step = Step(model=model_name, sizes=tuple(sorted(sizes.items())), batch=batch, shape=shape,
                scheme=scheme, optimizer=optimizer, channels_last=cl)  # fmt: skip
    model, one_step = build_step(step)
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(one_step())
        times.append(time.perf_counter() - t0)
    tiny = torch.finfo(torch.float32).tiny
    denormal = sum(
        int(((p.grad.abs() < tiny) & (p.grad != 0)).sum())
        for p in model.parameters()
        if p.grad is not None
    )
    return {"s_per_step": statistics.median(times), "losses": losses, "denormal_grads": denormal}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma list of: {', '.join(NETS)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--csv", default=None)
    ap.add_argument("--child", nargs=2, metavar=("NET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return 0
    nets = chosen(ap, args.nets, NETS)
    rows = []
    for net in nets:
        got = {}
        for mode in MODES:
            got[mode] = child_result(__file__, "--child", net, mode, "--steps", str(args.steps))
            print(f"{net:20s} {mode:6s} {got[mode]['s_per_step']:7.2f} s/step  "
                  f"{got[mode]['denormal_grads']:9d} denormal gradients  losses "
                  f"{' '.join(f'{x:.6g}' for x in got[mode]['losses'])}", flush=True)  # fmt: skip
        ieee, flush = got["ieee"], got["flush"]
        diff = max(abs(a - b) for a, b in zip(ieee["losses"], flush["losses"], strict=True))
        rows.append({
            "net": net, "arm": NETS[net][7], "steps": args.steps,
            "ieee_s_per_step": round(ieee["s_per_step"], 3),
            "flush_s_per_step": round(flush["s_per_step"], 3),
            "ratio_flush_over_ieee": round(flush["s_per_step"] / ieee["s_per_step"], 3),
            "ieee_denormal_grads": ieee["denormal_grads"],
            "max_loss_diff": f"{diff:.3g}",
        })  # fmt: skip
    print_table(rows, [("net", "20"), ("ieee_s_per_step", "8"), ("flush_s_per_step", "8"),
                       ("ratio_flush_over_ieee", "6"), ("ieee_denormal_grads", "10"),
                       ("max_loss_diff", "10")])  # fmt: skip
    write_csv("denormal.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
