"""Checkpoints: model, optimizer, schedule position, RNG states and data position in one file.

The file ``checkpoint.pt`` is written atomically (temporary file + rename, so a run killed while
saving leaves the previous checkpoint intact) and read with ``torch.load(weights_only=True)``:
only tensors and plain containers are stored, so loading never executes code. Metadata
(format tag, model identity, step, config, history records) is a JSON string inside it.

Because the training batch of step s is a pure function of (seed, s) (see
:mod:`depthlab.data.base`) and the lr is a pure function of s, restoring the step plus the
model/optimizer/RNG states makes a resumed run bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from depthlab.io import atomic_write
from depthlab.registry import DepthlabError

FORMAT = "depthlab-checkpoint"
VERSION = 1
FILENAME = "checkpoint.pt"


def model_identity(model: nn.Module) -> dict[str, Any]:
    """What must match for a checkpoint to be loaded into ``model``: class, config, scheme and
    the parameter shapes."""
    return {
        "class": type(model).__name__,
        "config": json.loads(json.dumps(getattr(model, "config", {}), default=str)),
        "scheme": str(getattr(model, "scheme", "")),
        "num_params": int(sum(p.numel() for p in model.parameters())),
    }


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states as tensors/plain values."""
    np_state = np.random.get_state()  # noqa: NPY002 — the legacy global RNG users seed
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_rest": [str(np_state[0]), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, pos, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(  # noqa: NPY002
        (name, state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached)
    )
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    meta: dict[str, Any],
) -> Path:
    """Write the checkpoint of a run that has completed ``step`` steps (atomically)."""
    metadata = {"format": FORMAT, "version": VERSION, "step": step, "model": model_identity(model)}
    metadata.update(meta)
    payload = {
        "metadata": json.dumps(metadata, default=str),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
    }
    return atomic_write(path, lambda p: torch.save(payload, p))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely; a corrupt or foreign file raises a :class:`DepthlabError`.

    Returns the payload with ``metadata`` decoded to a dict."""
    path = Path(path)
    fix = "delete it (or choose a new --out) to start afresh"
    if not path.is_file():
        raise DepthlabError(f"no checkpoint at {path}; run without --resume to start a new run")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(payload["metadata"])
    except Exception as e:  # noqa: BLE001 — every failure here means an unreadable file
        msg = str(e).splitlines()[0][:160] if str(e) else ""
        raise DepthlabError(
            f"checkpoint {path} is corrupt or not a depthlab checkpoint "
            f"({type(e).__name__}: {msg}); {fix}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DepthlabError(f"{path} is not a depthlab checkpoint (no '{FORMAT}' tag); {fix}")
    if meta.get("version") != VERSION:
        raise DepthlabError(
            f"{path} has checkpoint version {meta.get('version')}, expected {VERSION}"
        )
    payload["metadata"] = meta
    return payload


def check_compatible(meta: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Refuse to resume ``model`` from a checkpoint written for a different model."""
    saved, now = meta.get("model", {}), model_identity(model)
    if saved != now:
        diff = [k for k in now if saved.get(k) != now[k]]
        raise DepthlabError(
            f"checkpoint {path} was written for a different model ({', '.join(diff)} differ: "
            f"saved {_short(saved)}, now {_short(now)}); resume with the same model settings, or "
            f"use a new --out"
        )


def _short(ident: dict[str, Any]) -> str:
    cfg = ident.get("config", {})
    inner = ", ".join(f"{k}={v}" for k, v in cfg.items()) if isinstance(cfg, dict) else str(cfg)
    return f"{ident.get('class')}({inner}) scheme={ident.get('scheme')}"


def restore(payload: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model, optimizer and RNG states from a loaded payload."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload["rng"])
