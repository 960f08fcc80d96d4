"""Jacobian spectra of a deep residual network: matrix-free (Lanczos on JVP/VJP) vs dense SVD.

The network is the first stage of a CIFAR ResNet (``n`` pre-activation basic blocks, 16 channels,
no downsampling; BatchNorm in eval mode with running statistics calibrated on a random batch),
followed by 2×2 average pooling so the dense baseline stays affordable on a CPU:

    J ∈ R^{4096 × 16384} for a 16×32×32 input (16,384 dimensions).

Side by side in one process: the dense path (``torch.func.jacrev`` + ``torch.linalg.svdvals``)
and the matrix-free path (block Lanczos on J Jᵀ with vmapped products; ARPACK with --arpack) for
the top and bottom ``k`` singular values;
then a 16×80×80 input (102,400 dimensions, square Jacobian: 39 GiB dense in float32), its top
singular values analysed matrix-free only.

    .venv/bin/python benchmarks/bench_jacobian.py [--blocks 9] [--k 10] [--large-size 80]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

import depthlab as dl
from depthlab.diagnostics.jacobian import (
    block_lanczos_singular_values,
    calibrate_batchnorm,
    dense_singular_values,
    lanczos_singular_values,
)


def stage(blocks: int, pool: bool) -> nn.Module:
    torch.manual_seed(0)
    net = dl.create_model("resnet", depth=6 * blocks + 2, scheme="batchnorm")
    layers = list(net.blocks[:blocks])  # stage 1: 16 channels, stride 1
    if pool:
        layers.append(nn.AvgPool2d(2))
    model = nn.Sequential(*layers)
    calibrate_batchnorm(model, [torch.randn(64, 16, 32, 32)])
    return model.eval().requires_grad_(False)


def per_example(model: nn.Module, shape: tuple[int, ...]):
    return lambda v: model(v.reshape(1, *shape)).reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=9)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-2, help="Ritz residual ≤ tol·θ (s: ≤ tol/2)")
    ap.add_argument("--max-dim", type=int, default=2048, help="block Lanczos basis limit")
    ap.add_argument("--large-size", type=int, default=80, help="spatial size of the large input")
    ap.add_argument("--large-k", type=int, default=5, help="top-k for the large input")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--arpack", action="store_true", help="also time ARPACK (one product a time)")
    args = ap.parse_args()
    k = args.k

    model = stage(args.blocks, pool=True)
    shape = (16, 32, 32)
    g = per_example(model, shape)
    v = torch.randn(shape).reshape(-1)
    with torch.no_grad():
        m = g(v).numel()
    print(
        f"stage of {args.blocks} BN basic blocks + avgpool: J is {m} x {v.numel()}, "
        f"threads={torch.get_num_threads()}"
    )

    t = time.perf_counter()
    free = block_lanczos_singular_values(g, v, k, tol=args.tol, max_dim=args.max_dim)
    t_free = time.perf_counter() - t
    rows = [("matrix-free block Lanczos", t_free, int(free["products"]))]
    if args.arpack:
        t = time.perf_counter()
        arp = lanczos_singular_values(g, v, k, tol=args.tol)
        rows.append(("matrix-free ARPACK", time.perf_counter() - t, int(arp["products"])))
    if not args.skip_dense:
        t = time.perf_counter()
        s = dense_singular_values(g, v, chunk_size=256)
        t_dense = time.perf_counter() - t
        rows.insert(0, ("dense (jacrev + svdvals)", t_dense, m))
        err_top = np.abs(free["top"] / s[:k] - 1).max()
        err_bot = np.abs(free["bottom"] / s[-k:] - 1).max()
    print(f"\n{'method':28s} {'time (s)':>10s} {'G products':>11s}")
    for name, sec, prods in rows:
        print(f"{name:28s} {sec:10.2f} {prods:11d}")
    if not args.skip_dense:
        print(f"\nspeed-up matrix-free vs dense: {t_dense / t_free:.1f}x")
        print(f"max relative error top-{k}: {err_top:.2e}, bottom-{k}: {err_bot:.2e}")
        print(f"top-{k} dense : {np.round(s[:k], 4).tolist()}")
        print(f"top-{k} free  : {np.round(free['top'], 4).tolist()}")
        print(f"bottom-{k} dense: {np.round(s[-k:], 4).tolist()}")
        print(f"bottom-{k} free : {np.round(free['bottom'], 4).tolist()}")

    size = args.large_size
    big = stage(args.blocks, pool=False)
    shape = (16, size, size)
    g = per_example(big, shape)
    v = torch.randn(shape).reshape(-1)
    n = v.numel()
    t = time.perf_counter()
    res = block_lanczos_singular_values(
        g, v, args.large_k, which="top", tol=args.tol, max_dim=args.max_dim
    )
    t_big = time.perf_counter() - t
    print(f"\nlarge: J is {n} x {n} (dense float32 would need {n * n * 4 / 2**30:.0f} GiB)")
    print(f"matrix-free top-{args.large_k}: {t_big:.1f} s, {int(res['products'])} J products")
    print(f"top-{args.large_k}: {np.round(res['top'], 4).tolist()}")


if __name__ == "__main__":
    main()
