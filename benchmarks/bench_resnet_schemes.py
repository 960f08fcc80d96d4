"""Train-step throughput of a CIFAR ResNet-56 under each residual scheme, side by side.

    .venv/bin/python benchmarks/bench_resnet_schemes.py                # batch 128, 6 timed steps x 3
    .venv/bin/python benchmarks/bench_resnet_schemes.py --steps 2 --repeats 1 --batch 32   # quick

Every scheme's model is built once; then, for each repeat, each scheme runs ``--warmup`` untimed
and ``--steps`` timed SGD steps (forward, cross-entropy, backward, optimizer step) on one fixed
random batch, in a rotated order so that drift in machine load is spread over the schemes. The
table reports the median images/s over repeats, the spread (min-max), and the ratios to
``batchnorm`` and to ``plain`` measured in the same run.

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=56)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per scheme per repeat")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    schemes = args.schemes.split(",")

    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    runs = {}
    for name in schemes:
        model = dl.create_model("resnet", depth=args.depth, scheme=name, num_classes=10)
        # a small learning rate keeps the unnormalized 'plain' net finite over the timed steps
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        runs[name] = (model.train(), opt)

    rates: dict[str, list[float]] = {name: [] for name in schemes}
    for rep in range(args.repeats):
        order = schemes[rep % len(schemes) :] + schemes[: rep % len(schemes)]
        for name in order:
            model, opt = runs[name]
            for _ in range(args.warmup):
                train_step(model, opt, x, y)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, x, y)
            rates[name].append(args.steps * args.batch / (time.perf_counter() - t0))

    med = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"ResNet-{args.depth} (CIFAR 3x32x32), batch {args.batch}, SGD train step, "
        f"{torch.get_num_threads()} threads, {args.repeats}x{args.steps} timed steps per scheme"
    )
    print(f"{'scheme':<10} {'images/s':>9} {'min-max':>13} {'vs batchnorm':>13} {'vs plain':>9}")
    for name in schemes:
        lo, hi = min(rates[name]), max(rates[name])
        vs_bn = f"{med[name] / med['batchnorm']:.2f}x" if "batchnorm" in med else "-"
        vs_plain = f"{med[name] / med['plain']:.3f}x" if "plain" in med else "-"
        print(f"{name:<10} {med[name]:>9.1f} {lo:>6.1f}-{hi:<6.1f} {vs_bn:>13} {vs_plain:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
