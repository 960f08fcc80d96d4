"""``depthlab.train.optim.optimizer_step``: torch's fused Adam/AdamW kernel called on lists kept
between steps gives the update ``optimizer.step()`` gives, to the bit, and steps aside wherever
the kept lists could be wrong (a parameter without a gradient, a reloaded state, hooks)."""

from __future__ import annotations

import copy

import pytest
import torch

from depthlab.train.optim import _LISTS, optimizer_step

pytestmark = pytest.mark.skipif(
    not hasattr(torch, "_fused_adam_"), reason="this torch has no fused Adam kernel"
)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (5,), (), (3, 4, 2), (7,)] * 3
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _groups(params: list, wd: float) -> list[dict]:
    return [
        {"params": params[:6], "weight_decay": wd},
        {"params": params[6:11], "lr": 3e-3},
        {"params": params[11:], "lr": 1e-2, "weight_decay": 0.0},
    ]


def _grads(params: list, step: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else torch.randn(p.shape, generator=g)


def _pair(cls, **kw):
    a, b = _params(0), _params(0)
    return (
        a,
        b,
        cls(_groups(a, 0.1), lr=1e-3, fused=True, **kw),
        cls(_groups(b, 0.1), lr=1e-3, fused=True, **kw),
    )


def _in_step(a, b, opt_a, opt_b, steps: range, check: bool = False) -> None:
    """Torch's ``step()`` on ``a``, :func:`optimizer_step` on ``b``, the same gradients."""
    for step in steps:
        _grads(a, step)
        _grads(b, step)
        opt_a.step()
        optimizer_step(opt_b)
        if check:
            _same(a, b, opt_a, opt_b)


def _same(a, b, opt_a, opt_b) -> None:
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
        sa, sb = opt_a.state.get(p, {}), opt_b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("maximize", [False, True])
def test_equals_torchs_step_to_the_bit(cls, maximize):
    """12 steps over three groups (weight decay, lr changed mid-run as a schedule does, a step
    where one parameter has no gradient): parameters, moments and step counters equal torch's."""
    a, b, opt_a, opt_b = _pair(cls, maximize=maximize)
    fast = 0
    for step in range(12):
        skip = 4 if step == 6 else None
        _grads(a, step, skip)
        _grads(b, step, skip)
        if step == 8:
            for ga, gb in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
                ga["lr"] = gb["lr"] = ga["lr"] * 0.5
        opt_a.step()
        kept = getattr(opt_b, _LISTS, None)
        optimizer_step(opt_b)
        fast += kept is not None and kept[1] is not None and skip is None
        _same(a, b, opt_a, opt_b)
    assert fast >= 9  # the kept lists were used after the first step


def test_a_reloaded_state_is_not_stepped_through_stale_lists():
    a, b, opt_a, opt_b = _pair(torch.optim.Adam)
    _in_step(a, b, opt_a, opt_b, range(3))
    saved = opt_a.state_dict()  # (references to opt_a's tensors: each load gets a copy)
    opt_b.load_state_dict(copy.deepcopy(saved))  # new state tensors; the kept lists: the old
    opt_a.load_state_dict(copy.deepcopy(saved))
    _in_step(a, b, opt_a, opt_b, range(3, 6), check=True)
    assert all(opt_b.state[p]["step"].item() == 6 for p in b)


def test_hooks_amsgrad_and_other_optimizers_get_their_own_step():
    calls = []
    a, b, opt_a, opt_b = _pair(torch.optim.Adam)
    opt_b.register_step_post_hook(lambda *_: calls.append(1))
    for step in range(3):
        _grads(b, step)
        optimizer_step(opt_b)
    assert calls == [1, 1, 1]  # every step ran torch's step, hooks and all
    for cls, kw in ((torch.optim.Adam, {"amsgrad": True}), (torch.optim.SGD, {"momentum": 0.9})):
        p, q = _params(1), _params(1)
        o1 = cls(_groups(p, 0.0), lr=1e-3, fused=True, **kw)
        o2 = cls(_groups(q, 0.0), lr=1e-3, fused=True, **kw)
        _in_step(p, q, o1, o2, range(3))
        assert getattr(o2, _LISTS, (None, None))[1] is None
        _same(p, q, o1, o2)


def test_step_counters_are_views_of_one_tensor_per_group(monkeypatch):
    """Once the lists are kept, each group's ``state[p]["step"]`` are 0-dim views of one tensor,
    incremented by one ``add_`` (no per-tensor ``_foreach_add_``), and still each its own
    counter: torch's ``step()`` with one gradient missing advances all but that one."""
    a, b, opt_a, opt_b = _pair(torch.optim.Adam)
    for step in range(2):
        _grads(b, step)
        optimizer_step(opt_b)
    for group in opt_b.param_groups:
        steps = [opt_b.state[p]["step"] for p in group["params"]]
        assert all(s.dim() == 0 and s.dtype == torch.float32 for s in steps)
        assert len({s.untyped_storage().data_ptr() for s in steps}) == 1
        assert len({s.data_ptr() for s in steps}) == len(steps)

    def no_foreach(*args, **kwargs):
        raise AssertionError("step counters incremented one tensor at a time")

    monkeypatch.setattr(torch, "_foreach_add_", no_foreach)
    _grads(b, 2)
    optimizer_step(opt_b)
    assert all(opt_b.state[p]["step"].item() == 3 for p in b)
    monkeypatch.undo()
    _grads(b, 3, skip=4)
    opt_b.step()  # torch's own step on the views
    assert [opt_b.state[p]["step"].item() for p in b] == [3.0 if i == 4 else 4.0 for i in range(15)]


def test_a_saved_state_with_shared_counters_reloads_and_continues(tmp_path):
    """``state_dict()`` of the view-backed counters goes through ``torch.save`` and
    ``torch.load(weights_only=True)``; a fresh optimizer loaded from it steps as torch's."""
    a, b, opt_a, opt_b = _pair(torch.optim.Adam)
    _in_step(a, b, opt_a, opt_b, range(3))
    torch.save(opt_b.state_dict(), tmp_path / "opt.pt")
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = torch.optim.Adam(_groups(c, 0.1), lr=1e-3, fused=True)
    opt_c.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    _in_step(a, c, opt_a, opt_c, range(3, 6), check=True)
    assert all(opt_c.state[p]["step"].item() == 6 for p in c)
