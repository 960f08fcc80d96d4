"""Run logging: ``metrics.jsonl`` (always, when there is an output folder), TensorBoard event
files (when ``tensorboard`` is importable) and a tqdm progress bar (on a TTY, unless quiet)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from depthlab.io import atomic_write_text

METRICS = "metrics.jsonl"


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
                    self._tb.add_scalar(k, v, step)

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
