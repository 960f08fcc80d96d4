"""Transformer layer step time against torch's own layer, and the byte LM's training throughput.

    .venv/bin/python benchmarks/bench_transformer.py            # d 256, 8 heads, seq 128, batch 32
    .venv/bin/python benchmarks/bench_transformer.py --batch 8 --steps 3 --lm-depth 2   # quick

Part 1, one layer, forward + backward (loss ``mean(y²)``) on a fixed random batch (B, T, C):
``torch.nn.TransformerEncoderLayer(norm_first=True, batch_first=True)`` (the reference, Pre-LN)
beside depthlab's ``TransformerBlock`` under ``prenorm`` and ``rezero``. Same width, heads and
feed-forward width (4·d), dropout 0, non-causal (``--causal``: causal for all three; torch's layer
then gets the causal mask with ``is_causal=True``). The variants take turns, one step each per
round in a rotated order, so drift in machine load spreads over all of them; the table gives the
median wall-clock step time and the median process CPU time, each as a ratio to torch's layer.
Target (issue 5): ours <= 1.05x torch's step time.

Part 2: ``transformer-lm`` training steps (Adam, cross-entropy over 256 bytes) on random byte
windows of the same shape: bytes/s = B·T / median step time.

``--attention`` instead times causal attention alone, forward + backward, at 16 to 128 keys
(batch 16, 4 heads of width 8: the deep byte LMs' shape): depthlab's short-sequence path
(``short_attention``, two batched GEMMs) beside ``F.scaled_dot_product_attention``, interleaved;
it writes ``attention.csv``. The model takes the short path up to ``SHORT_KEYS`` keys.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from _results import write_csv
from depthlab.models import TransformerBlock


def timed(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median wall and CPU seconds per call of each step function, interleaved."""
    names = list(steps)
    for name in names:
        for _ in range(warmup):
            steps[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return (
        {n: statistics.median(t) for n, t in wall.items()},
        {n: statistics.median(t) for n, t in cpu.items()},
    )


def layer_steps(args) -> dict[str, Callable[[], None]]:
    d, h, T, B = args.d_model, args.nhead, args.seq, args.batch
    torch.manual_seed(0)
    x = torch.randn(B, T, d, requires_grad=True)  # (B, T, C)
    ref = nn.TransformerEncoderLayer(
        d, h, 4 * d, dropout=0.0, norm_first=True, batch_first=True
    ).train()
    mask = nn.Transformer.generate_square_subsequent_mask(T) if args.causal else None

    def torch_step() -> None:
        ref.zero_grad(set_to_none=True)
        ref(x, src_mask=mask, is_causal=args.causal).square().mean().backward()

    steps = {"torch TransformerEncoderLayer (pre-LN)": torch_step}
    for scheme in ("prenorm", "rezero"):
        blk = TransformerBlock(d, h, 4 * d, 0.0, scheme, causal=args.causal).train()
        if scheme == "rezero":
            with torch.no_grad():  # α ≠ 0: every branch does its full work in forward and backward
                blk.attn.gate.alpha.fill_(0.5)

        def step(blk: nn.Module = blk) -> None:
            blk.zero_grad(set_to_none=True)
            blk(x).square().mean().backward()

        steps[f"depthlab TransformerBlock {scheme}"] = step
    return steps


def lm_steps(args) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    win = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    x, y = win[:, :-1], win[:, 1:]
    steps = {}
    for scheme in ("prenorm", "rezero"):
        model = dl.create_model(
            "transformer-lm",
            depth=args.lm_depth,
            scheme=scheme,
            d_model=args.d_model,
            nhead=args.nhead,
            context=args.seq,
        ).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4, foreach=True)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step()

        steps[f"transformer-lm {scheme}, {args.lm_depth} layers"] = step
    return steps


def attention(args) -> int:
    """Causal attention, forward + backward: the short path against torch's fused kernel."""
    from depthlab.nn.transformer import SHORT_KEYS, short_attention

    def sdpa(q, k, v) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def short(q, k, v) -> torch.Tensor:
        return short_attention(q, k, v, True)

    print(
        f"Causal attention fwd+bwd, batch 16, 4 heads × 8, {torch.get_num_threads()} threads, "
        f"median of {args.steps} interleaved calls; the model's short path: ≤ {SHORT_KEYS} keys"
    )
    print(f"{'keys':>5} {'short µs':>9} {'sdpa µs':>9} {'short/sdpa':>11}")
    rows = []
    for keys in (16, 32, 64, 128):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(16, 4, keys, 8, generator=g, requires_grad=True) for _ in range(3))

        def step(f=None, q=q, k=k, v=v) -> None:
            out = f(q, k, v)
            out.backward(out)

        wall, _ = timed({"short": lambda: step(short), "sdpa": lambda: step(sdpa)},
                        args.steps, args.warmup)  # fmt: skip
        ratio = wall["short"] / wall["sdpa"]
        print(f"{keys:>5} {wall['short'] * 1e6:>9.0f} {wall['sdpa'] * 1e6:>9.0f} {ratio:>11.2f}")
        rows.append({"keys": keys, "short_us": round(wall["short"] * 1e6, 1),
                     "sdpa_us": round(wall["sdpa"] * 1e6, 1), "short_vs_sdpa": round(ratio, 3),
                     "model_path": "short" if keys <= SHORT_KEYS else "sdpa"})  # fmt: skip
    write_csv("attention.csv", rows, args.csv)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--nhead", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--steps", type=int, default=15, help="timed rounds per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lm-depth", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--attention", action="store_true", help="time causal attention alone")
    ap.add_argument("--csv", default=None, help="default benchmarks/results/transformer.csv")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.attention:
        return attention(args)

    shape = f"d_model {args.d_model}, {args.nhead} heads, seq {args.seq}, batch {args.batch}"
    print(
        f"One layer, forward+backward, {shape}, {'causal' if args.causal else 'non-causal'}, "
        f"dropout 0, {torch.get_num_threads()} threads, median of {args.steps} interleaved steps"
    )
    wall, cpu = timed(layer_steps(args), args.steps, args.warmup)
    ref = next(iter(wall))
    print(f"{'variant':<40} {'ms/step':>8} {'vs torch':>9} {'CPU ms':>8} {'vs torch':>9}")
    rows = []
    for name in wall:
        print(
            f"{name:<40} {wall[name] * 1e3:>8.1f} {wall[name] / wall[ref]:>8.2f}x "
            f"{cpu[name] * 1e3:>8.1f} {cpu[name] / cpu[ref]:>8.2f}x"
        )
        rows.append({
            "part": "layer", "variant": name, "ms_per_step": round(wall[name] * 1e3, 2),
            "vs_torch": round(wall[name] / wall[ref], 3), "cpu_ms": round(cpu[name] * 1e3, 2),
            "cpu_vs_torch": round(cpu[name] / cpu[ref], 3), "bytes_per_s": "",
        })  # fmt: skip

    print(f"\nLM training step (Adam), {shape}")
    wall, cpu = timed(lm_steps(args), max(3, args.steps // 3), 2)
    n = args.batch * args.seq
    print(f"{'variant':<40} {'ms/step':>8} {'bytes/s':>9} {'bytes/CPU-s':>12}")
    for name in wall:
        print(f"{name:<40} {wall[name] * 1e3:>8.1f} {n / wall[name]:>9.0f} {n / cpu[name]:>12.0f}")
        rows.append({
            "part": f"LM step, depth {args.lm_depth}", "variant": name,
            "ms_per_step": round(wall[name] * 1e3, 2), "vs_torch": "",
            "cpu_ms": round(cpu[name] * 1e3, 2), "cpu_vs_torch": "",
            "bytes_per_s": round(n / wall[name]),
        })  # fmt: skip
    write_csv("transformer.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
