"""Per-cell scheduling overhead of the sweep executors, side by side: the local process pool
(``--jobs``) against Ray tasks on a local Ray cluster, for cells that sleep ``--seconds``.

    .venv/bin/python benchmarks/bench_executors.py [--small 20] [--large 80] [--rounds 3]
        [--csv benchmarks/results/executors.csv]

Each executor runs a sweep of ``--small`` and one of ``--large`` cells on 2 workers (2 CPUs of a
Ray head started here with ``ray start``); the start-up (spawning the pool, connecting to Ray)
cancels in the difference, so the cost of one cell on a worker is
``(wall(large) − wall(small)) × workers / (large − small)`` and the overhead is that minus the
sleep. Rounds alternate the executors; the table gives the median over rounds. Needs the ray
extra (``pip install 'depthlab[ray]'``).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _sleep_cells  # noqa: E402,F401 - registers bench-sleep
from depthlab.experiments.runner import run  # noqa: E402

WORKERS = 2


def _sweep(executor: str, n: int, seconds: float, tag: str, address: str | None) -> float:
    out = Path(tempfile.mkdtemp(prefix="depthlab-bench-"))
    try:
        t = time.perf_counter()
        kw = {"executor": "ray", "address": address} if executor == "ray" else {"jobs": WORKERS}
        (r,) = run("bench-sleep", "smoke", out, {"n": n, "seconds": seconds, "tag": tag},
                   log=lambda s: None, **kw)  # fmt: skip
        assert r.error is None and len(r.records) == n
        return time.perf_counter() - t
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", type=int, default=20)
    ap.add_argument("--large", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "executors.csv"))
    args = ap.parse_args(argv)
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_executors: skipped, needs the ray extra (pip install 'depthlab[ray]')")
        return 0
    import os

    os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway node on the loopback (test_ray.py)
    ray_bin = Path(sys.executable).with_name("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                    str(port), "--num-cpus", str(WORKERS), "--include-dashboard", "false",
                    "--disable-usage-stats"], check=True, capture_output=True)  # fmt: skip
    address = f"127.0.0.1:{port}"
    rows = []
    try:
        for r in range(args.rounds):
            for executor in ("local", "ray"):
                walls = {
                    n: _sweep(executor, n, args.seconds, f"{executor}-{r}-{n}", address)
                    for n in (args.small, args.large)
                }
                per_cell = (
                    (walls[args.large] - walls[args.small]) * WORKERS / (args.large - args.small)
                )
                rows.append({"round": r, "executor": executor, "wall_small_s": walls[args.small],
                             "wall_large_s": walls[args.large], "per_cell_s": per_cell,
                             "overhead_ms": 1000 * (per_cell - args.seconds)})  # fmt: skip
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True)
    med = {
        e: {k: statistics.median(x[k] for x in rows if x["executor"] == e)
            for k in ("wall_small_s", "wall_large_s", "per_cell_s", "overhead_ms")}
        for e in ("local", "ray")
    }  # fmt: skip
    above = [
        1000 * (a["per_cell_s"] - b["per_cell_s"])
        for a, b in zip(
            [x for x in rows if x["executor"] == "ray"],
            [x for x in rows if x["executor"] == "local"],
            strict=True,
        )
    ]
    print(f"{args.small} and {args.large} cells of {args.seconds:g} s on {WORKERS} workers, "
          f"median of {args.rounds} rounds")  # fmt: skip
    print(
        f"{'executor':<8} {'wall small':>11} {'wall large':>11} {'per cell':>10} {'overhead':>10}"
    )
    for e, m in med.items():
        print(f"{e:<8} {m['wall_small_s']:>10.2f}s {m['wall_large_s']:>10.2f}s "
              f"{1000 * m['per_cell_s']:>8.1f}ms {m['overhead_ms']:>8.1f}ms")  # fmt: skip
    print(
        f"ray above the pool, per cell (per round): "
        f"{', '.join(f'{x:.1f}' for x in above)} ms; median {statistics.median(above):.1f} ms"
    )
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "ray_above_pool_ms"])
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow(
                {**row, "ray_above_pool_ms": above[i // 2] if row["executor"] == "ray" else ""}
            )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
