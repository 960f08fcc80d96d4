"""Jacobian spectra of a deep residual network: matrix-free (Lanczos on JVP/VJP) vs dense SVD.

The network is the first stage of a CIFAR ResNet (``n`` pre-activation basic blocks, 16 channels,
no downsampling), so J ∈ R^{16384 × 16384} for a 16×32×32 input (16,384 dimensions; ``--pool``
adds 2×2 average pooling: J ∈ R^{4096 × 16384}). ``--scheme skipinit --alpha 0.5`` (default):
SkipInit blocks with their gates at 0.5 (a trained-like, non-identity J); ``--scheme batchnorm``:
BatchNorm in eval mode with running statistics calibrated on a random batch — at init that J is
nearly singular (bottom singular values 1e-5…6e-4 against a top of 11), below what a float32
Gram operator (or float32 dense SVD, error ≈ 1e-6 absolute) resolves, so only its top end is a
fair comparison.

Side by side in one process: the dense path (``torch.func.jacrev`` + ``torch.linalg.svdvals``)
and the matrix-free path (block Lanczos on J Jᵀ with vmapped products and partial
reorthogonalisation; ARPACK with --arpack) for the top and bottom ``k`` singular values, and the
bottom ``k`` again with a full reorthogonalisation every block (the previous design);
then a 16×80×80 input (102,400 dimensions, square Jacobian: 39 GiB dense in float32), its top
singular values analysed matrix-free only.

    .venv/bin/python benchmarks/bench_jacobian.py [--blocks 3] [--k 10] [--pool] [--large-size 80]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import depthlab as dl
from _results import write_csv
from depthlab.diagnostics.jacobian import (
    block_lanczos_singular_values,
    calibrate_batchnorm,
    dense_singular_values,
    lanczos_singular_values,
)


def stage(blocks: int, pool: bool, scheme: str = "batchnorm", alpha: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    opts = {"alpha_init": alpha} if scheme in ("skipinit", "rezero") else {}
    net = dl.create_model(
        "resnet", depth=6 * blocks + 2, scheme=scheme, scheme_options=opts, variant="preact"
    )
    layers = list(net.blocks[:blocks])  # stage 1: 16 channels, stride 1
    if pool:
        layers.append(nn.AvgPool2d(2))
    model = nn.Sequential(*layers)
    if scheme == "batchnorm":
        calibrate_batchnorm(model, [torch.randn(64, 16, 32, 32)])
    return model.eval().requires_grad_(False)


def per_example(model: nn.Module, shape: tuple[int, ...]):
    return lambda v: model(v.reshape(1, *shape)).reshape(-1)


def timed_free(g, v, k, which, args, reorth="partial"):
    t = time.perf_counter()
    try:
        res = block_lanczos_singular_values(
            g,
            v,
            k,
            which=which,
            tol=args.tol,
            max_dim=args.max_dim,
            rtol=args.rtol or None,
            reorth=reorth,
        )
    except dl.DepthlabError as e:
        return None, time.perf_counter() - t, str(e)
    return res, time.perf_counter() - t, ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--scheme", default="skipinit", help="residual scheme of the stage")
    ap.add_argument("--alpha", type=float, default=0.5, help="SkipInit/ReZero gate value")
    ap.add_argument(
        "--rtol", type=float, default=1e-3, help="stagnation stop (0: residual test only)"
    )
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-2, help="Ritz residual ≤ tol·θ (s: ≤ tol/2)")
    ap.add_argument("--max-dim", type=int, default=4096, help="block Lanczos basis limit")
    ap.add_argument("--pool", action="store_true", help="2×2 average pool: J is 4096 × 16384")
    ap.add_argument("--large-size", type=int, default=80, help="spatial size of the large input")
    ap.add_argument("--large-k", type=int, default=5, help="top-k for the large input")
    ap.add_argument("--arpack", action="store_true", help="also time ARPACK (one product a time)")
    ap.add_argument(
        "--no-compare-full",
        dest="compare_full",
        action="store_false",
        help="skip the bottom-k run that reorthogonalises every block (for comparison)",
    )
    ap.add_argument("--csv", default=None, help="default benchmarks/results/jacobian.csv")
    args = ap.parse_args()
    k = args.k

    model = stage(args.blocks, args.pool, args.scheme, args.alpha)
    shape = (16, 32, 32)
    g = per_example(model, shape)
    v = torch.randn(shape).reshape(-1)
    with torch.no_grad():
        m = g(v).numel()
    gate = f", alpha {args.alpha}" if args.scheme in ("skipinit", "rezero") else ""
    print(
        f"stage of {args.blocks} {args.scheme}{gate} basic blocks"
        f"{' + avgpool' if args.pool else ''}: J is {m} x {v.numel()}, float32, "
        f"threads={torch.get_num_threads()}; stop: residual <= {args.tol}·θ or Ritz values "
        f"moving < {args.rtol} per check"
    )
    t = time.perf_counter()
    s = dense_singular_values(g, v, chunk_size=256)
    t_dense = time.perf_counter() - t
    print(
        "\n| method | time (s) | J products | full reorth. passes | max rel. error "
        "| speed-up vs dense |"
    )
    print("|---|---|---|---|---|---|")
    r = min(m, v.numel())
    print(f"| dense (jacrev + svdvals), all {len(s)} | {t_dense:.1f} | {r} | — | — | 1.0× |")
    rows = [_row(f"dense (jacrev + svdvals), all {len(s)}", m, v.numel(), t_dense, r, "", "", 1.0)]
    runs = [("top", "partial"), ("bottom", "partial")] + (
        [("bottom", "full")] if args.compare_full else []
    )
    for which, reorth in runs:
        res, sec, err = timed_free(g, v, k, which, args, reorth)
        name = f"block Lanczos {which}-{k}" + (", reorth. every block" if reorth == "full" else "")
        if res is None:
            print(f"| {name} | {sec:.1f} | — | — | not converged: {err[:60]} | — |")
            rows.append(_row(name, m, v.numel(), sec, "", "", "not converged", ""))
            continue
        ref = s[:k] if which == "top" else s[-k:]
        rel = np.abs(res[which] / ref - 1).max()
        print(
            f"| {name} | {sec:.1f} | {int(res['products'])} | {int(res['reorths'])} | "
            f"{rel:.1e} | {t_dense / sec:.1f}× |"
        )
        rows.append(
            _row(name, m, v.numel(), sec, int(res["products"]), int(res["reorths"]),
                 f"{rel:.1e}", round(t_dense / sec, 1))
        )  # fmt: skip
        print(f"<!-- {which}: dense {ref.tolist()} -->")
        print(
            f"<!-- {which} dense {np.round(ref, 4).tolist()} "
            f"free {np.round(res[which], 4).tolist()} -->"
        )
    if args.arpack:
        t = time.perf_counter()
        arp = lanczos_singular_values(g, v, k, which="top", tol=args.tol)
        sec = time.perf_counter() - t
        rel = np.abs(arp["top"] / s[:k] - 1).max()
        print(
            f"| ARPACK top-{k} | {sec:.1f} | {int(arp['products'])} | — | {rel:.1e} | "
            f"{t_dense / sec:.1f}× |"
        )
        rows.append(
            _row(f"ARPACK top-{k}", m, v.numel(), sec, int(arp["products"]), "", f"{rel:.1e}",
                 round(t_dense / sec, 1))
        )  # fmt: skip

    size = args.large_size
    big = stage(args.blocks, False, args.scheme, args.alpha)
    shape = (16, size, size)
    g = per_example(big, shape)
    v = torch.randn(shape).reshape(-1)
    n = v.numel()
    res, sec, err = timed_free(g, v, args.large_k, "top", args)
    print(f"\nlarge: J is {n} x {n} (dense float32 would need {n * n * 4 / 2**30:.0f} GiB)")
    name = f"block Lanczos top-{args.large_k}, large input"
    if res is None:
        print(f"matrix-free top-{args.large_k}: not converged after {sec:.1f} s: {err}")
        rows.append(_row(name, n, n, sec, "", "", "not converged", ""))
    else:
        print(
            f"matrix-free top-{args.large_k}: {sec:.1f} s, {int(res['products'])} J products, "
            f"s = {np.round(res['top'], 4).tolist()}"
        )
        rows.append(_row(name, n, n, sec, int(res["products"]), int(res["reorths"]), "", ""))
    write_csv("jacobian.csv", rows, args.csv)


def _row(method, m, n, sec, products, reorths, rel, speedup) -> dict:
    return {
        "method": method, "J": f"{m} x {n}", "time_s": round(sec, 2), "J_products": products,
        "full_reorth_passes": reorths, "max_rel_error": rel, "speedup_vs_dense": speedup,
    }  # fmt: skip


if __name__ == "__main__":
    main()
