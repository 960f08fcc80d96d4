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
    if not isinstance(payload, dict):
        raise DepthlabError(f"{path} is not a depthlab checkpoint; {fix}")
    payload["metadata"] = meta
    return payload


def check_compatible(meta: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Refuse to resume ``model`` from a checkpoint written for a different model."""
    saved, now = meta.get("model", {}), model_identity(model)
    if saved != now:
        diff = [k for k in now if not isinstance(saved, dict) or saved.get(k) != now[k]]
        saved = saved if isinstance(saved, dict) else {}
        raise DepthlabError(
            f"checkpoint {path} was written for a different model ({', '.join(diff)} differ: "
            f"saved {_short(saved)}, now {_short(now)}); resume with the same model settings, or "
            f"use a new --out"
        )


#: the schema of the metadata :func:`validate` requires (key: accepted types)
_META = {
    "step": (int,),
    "wall_time_s": (int, float),
    "initial_loss": (int, float, str, type(None)),
    "records": (list,),
    "diverged": (bool,),
    "diverged_step": (int, type(None)),
}


def validate(payload: dict[str, Any], model: nn.Module, path: str | Path) -> None:
    """Check an untrusted checkpoint against ``model`` before anything is loaded from it: the
    metadata schema (a step ≥ 0, the records of the steps before it), every tensor's name,
    shape and dtype against the model's state dict, the optimizer state's presence and group
    count, and the size and type of every RNG state. A failure is a :class:`DepthlabError`."""
    fix = "delete it (or choose a new --out) to start afresh"

    def bad(what: str) -> DepthlabError:
        return DepthlabError(f"checkpoint {path} is damaged: {what}; {fix}")

    check_compatible(payload["metadata"], model, path)
    _validate_metadata(payload["metadata"], bad)
    _validate_tensors(payload, model, bad)
    _validate_rng(payload.get("rng"), bad)


def _validate_metadata(meta: dict[str, Any], bad) -> None:
    """The metadata schema: every key with its type, a step ≥ 0, well-formed records."""
    for key, types in _META.items():
        if key not in meta:
            raise bad(f"its metadata lacks '{key}'")
        value = meta[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise bad(f"metadata '{key}' is {value!r}")
    step = meta["step"]
    if step < 0:
        raise bad(f"its step is {step}")
    for r in meta["records"]:
        if not isinstance(r, dict) or not isinstance(r.get("step"), int) or r["step"] < 0:
            raise bad(f"a record is {str(r)[:80]!r}")
    if meta["diverged_step"] is not None and not 0 <= meta["diverged_step"] <= step:
        raise bad(f"diverged_step {meta['diverged_step']} is outside 0..{step}")


def _validate_tensors(payload: dict[str, Any], model: nn.Module, bad) -> None:
    """Every model tensor's name, shape and dtype; the optimizer state's presence and size."""
    state = payload.get("model")
    if not isinstance(state, dict):
        raise bad("it holds no model weights")
    want = model.state_dict()
    if set(state) != set(want):
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        raise bad(f"its tensors do not match the model (missing {missing[:3]}, extra {extra[:3]})")
    for k, t in want.items():
        got = state[k]
        if not isinstance(got, torch.Tensor) or got.shape != t.shape or got.dtype != t.dtype:
            shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise bad(f"tensor {k} has shape {shape}, the model's has {tuple(t.shape)}")
    opt = payload.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list):
        raise bad("it holds no optimizer state")
    if not isinstance(opt.get("state"), dict):
        raise bad("its optimizer state is malformed")
    n_params = sum(len(g.get("params", [])) for g in opt["param_groups"] if isinstance(g, dict))
    n_model = sum(1 for p in model.parameters() if p.requires_grad)
    if n_params != n_model:
        raise bad(f"its optimizer holds {n_params} parameters, the model has {n_model}")


def validate_optimizer(saved: Any, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """The saved optimizer state must have the groups of ``optimizer`` and, per parameter,
    state tensors of that parameter's shape (momentum buffers, Adam moments)."""
    fix = "delete it (or choose a new --out) to start afresh"
    now = optimizer.state_dict()
    groups = saved.get("param_groups", []) if isinstance(saved, dict) else []
    if [len(g.get("params", [])) for g in groups if isinstance(g, dict)] != [
        len(g["params"]) for g in now["param_groups"]
    ]:
        raise DepthlabError(
            f"checkpoint {path} is damaged: its optimizer groups do not match the model's "
            f"(was it written with another optimizer or scheme?); {fix}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in now["param_groups"] for i in g["params"]]
    shape = {i: p.shape for i, p in zip(ids, params)}
    for i, st in saved.get("state", {}).items():
        if i not in shape or not isinstance(st, dict):
            raise DepthlabError(f"checkpoint {path} is damaged: optimizer state {i!r}; {fix}")
        for name, t in st.items():
            if not isinstance(t, torch.Tensor):
                continue
            if name != "step" and t.shape != shape[i]:
                raise DepthlabError(
                    f"checkpoint {path} is damaged: optimizer state '{name}' of parameter {i} "
                    f"has shape {tuple(t.shape)}, the parameter {tuple(shape[i])}; {fix}"
                )


def _validate_rng(rng: Any, bad: Any) -> None:
    """The RNG states must be exactly what :func:`rng_state` writes."""
    if not isinstance(rng, dict):
        raise bad("it holds no RNG state")
    t = rng.get("torch")
    expected = torch.get_rng_state()
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.shape != expected.shape:
        raise bad("its torch RNG state has the wrong size or type")
    keys = rng.get("numpy_keys")
    if not isinstance(keys, torch.Tensor) or keys.shape != (624,) or keys.dtype != torch.int64:
        raise bad("its numpy RNG state has the wrong size or type")
    if bool(((keys < 0) | (keys > 0xFFFFFFFF)).any()):
        raise bad("its numpy RNG state holds values outside 32 bits")
    rest = rng.get("numpy_rest")
    if (
        not isinstance(rest, list)
        or len(rest) != 4
        or rest[0] != "MT19937"
        or not isinstance(rest[1], int)
        or not 0 <= rest[1] <= 624
        or not isinstance(rest[2], int)
        or not isinstance(rest[3], (int, float))
    ):
        raise bad("its numpy RNG position is malformed")
    try:
        py = json.loads(rng.get("python"))
        ok = (
            isinstance(py, list)
            and len(py) == 3
            and isinstance(py[1], list)
            and len(py[1]) == 625
            and all(isinstance(x, int) and 0 <= x <= 0xFFFFFFFF for x in py[1][:624])
        )
        if ok:
            random.Random().setstate((py[0], tuple(py[1]), py[2]))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise bad("its python RNG state is malformed")
    if "cuda" in rng:
        cuda = rng["cuda"]
        if not isinstance(cuda, list) or not all(isinstance(c, torch.Tensor) for c in cuda):
            raise bad("its CUDA RNG state is malformed")


def _short(ident: dict[str, Any]) -> str:
    cfg = ident.get("config", {})
    inner = ", ".join(f"{k}={v}" for k, v in cfg.items()) if isinstance(cfg, dict) else str(cfg)
    return f"{ident.get('class')}({inner}) scheme={ident.get('scheme')}"
