"""Run logging: ``metrics.jsonl`` (always, when there is an output folder), TensorBoard event
files (when ``tensorboard`` is importable) and a tqdm progress bar (on a TTY, unless quiet).

TensorBoard tags are nested: ``train/loss``, ``train/accuracy``, ``train/lr``,
``train/grad_norm``, ``train/examples_per_s``, ``test/loss``, ``test/accuracy``, ``test/bpb``;
at each evaluation :meth:`RunLogger.log_model` adds the model's scalar parameters — every gate α
(``gates/alpha``: a histogram over blocks, its mean |α|, and one scalar per block for up to
:data:`MAX_SCALAR_TAGS` blocks) and Fixup's scalar biases and multipliers
(``scalars/bias``, ``scalars/multiplier``) — and, with ``diagnose_every``, per-block
diagnostics on a fixed probe batch: the output variance of each residual block
(``diagnostics/block_out_var``, a histogram over blocks, with its first and last values as
scalars) and the gradient norm with respect to each block's output
(``diagnostics/block_grad_norm``, likewise).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from depthlab.io import atomic_write_text

METRICS = "metrics.jsonl"
#: models with at most this many gates get one TensorBoard scalar per gate
MAX_SCALAR_TAGS = 64


def tag(key: str) -> str:
    """The nested TensorBoard tag of a record key: ``train_loss`` → ``train/loss``,
    ``test_bpb`` → ``test/bpb``, ``lr`` → ``train/lr``."""
    for prefix in ("train", "test"):
        if key.startswith(prefix + "_"):
            return f"{prefix}/{key[len(prefix) + 1 :]}"
    return f"train/{key}"


def _clean(v: Any) -> Any:
    """JSON has no NaN/inf: write them as the strings "nan", "inf", "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def dumps(record: dict[str, Any]) -> str:
    return json.dumps({k: _clean(v) for k, v in record.items()})


class RunLogger:
    """Writes records as they come; ``out_dir=None`` or ``enabled=False`` (non-zero ranks) logs
    nothing to disk."""

    def __init__(
        self,
        out_dir: str | Path | None,
        total_steps: int,
        start_step: int = 0,
        quiet: bool = True,
        enabled: bool = True,
        records: list[dict[str, Any]] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir) if (out_dir is not None and enabled) else None
        self._file = None
        self._tb = None
        self._bar = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # on resume, the log restarts from the checkpoint's records (atomic rewrite)
            text = "".join(dumps(r) + "\n" for r in (records or []))
            atomic_write_text(self.out_dir / METRICS, text)
            self._file = open(self.out_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tb"), purge_step=start_step)
            except ImportError:
                self._tb = None
        if enabled and not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(tag(k), v, step)

    def scalar(self, name: str, value: float, step: int) -> None:
        """One TensorBoard scalar that is not part of the records (e.g. wall-clock throughput)."""
        if self._tb is not None:
            self._tb.add_scalar(name, value, step)

    @property
    def tensorboard(self) -> bool:
        """True when TensorBoard events are written."""
        return self._tb is not None

    def log_model(self, step: int, model: Any) -> None:
        """The model's scalar parameters: gates, scalar biases, multipliers (module docstring)."""
        if self._tb is None:
            return
        import torch

        from depthlab.nn.residual import residual_blocks
        from depthlab.nn.scalars import Bias, Gate

        block_gates = {id(b.gate) for b in residual_blocks(model) if b.gate is not None}
        groups: dict[str, list[float]] = {"gates/alpha": [], "scalars/bias": [],
                                          "scalars/multiplier": []}  # fmt: skip
        seen: set[int] = set()
        for m in model.modules():
            if isinstance(m, Gate):
                p, name = m.alpha, "gates/alpha" if id(m) in block_gates else "scalars/multiplier"
            elif isinstance(m, Bias):
                p, name = next(iter(m.parameters()), None), "scalars/bias"
            else:
                continue
            if not isinstance(p, torch.Tensor) or p.dim() != 0 or id(p) in seen:
                continue  # a gate shared by a layer's sublayers counts once
            seen.add(id(p))
            groups[name].append(float(p.detach()))
        for name, values in groups.items():
            if not values:
                continue
            t = torch.tensor(values)
            self._tb.add_histogram(name, t, step)
            self._tb.add_scalar(f"{name}_mean_abs", float(t.abs().mean()), step)
            if len(values) <= MAX_SCALAR_TAGS:
                for i, x in enumerate(values):
                    self._tb.add_scalar(f"{name}/{i:03d}", x, step)

    def log_diagnostics(self, step: int, out_var: list[float], grad_norm: list[float]) -> None:
        """Per-block diagnostics (module docstring)."""
        if self._tb is None:
            return
        import torch

        for name, values in (("block_out_var", out_var), ("block_grad_norm", grad_norm)):
            if values:
                self._tb.add_histogram(f"diagnostics/{name}", torch.tensor(values), step)
                self._tb.add_scalar(f"diagnostics/{name}_first", values[0], step)
                self._tb.add_scalar(f"diagnostics/{name}_last", values[-1], step)

    def progress(self, n: int, loss: float, examples_per_s: float) -> None:
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(loss=f"{loss:.4g}", ex_s=f"{examples_per_s:.0f}", refresh=False)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
