"""``convert`` against the real torchvision and timm: every ResNet family × every scheme.

Runs in the second test environment (``make test-real``: ``.venv-real`` with the CUDA build of
torch, which runs on the CPU, torchvision and timm); elsewhere the module is skipped — unless
``DEPTHLAB_REAL_LIBS=1`` (set by ``make test-real``), where a missing library is an error.
Per model and scheme: no norm layer left that the scheme does not use, the model's own
activations kept (nothing swapped for ReLU), every block the identity on its skip path at init
for the schemes that are (``act(shortcut(x))``), and SGD steps that lower the loss.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.nn import residual_blocks

pytestmark = pytest.mark.real

_MISSING = [m for m in ("torchvision", "timm") if importlib.util.find_spec(m) is None]
if _MISSING:
    if os.environ.get("DEPTHLAB_REAL_LIBS") == "1":
        raise ImportError(
            f"DEPTHLAB_REAL_LIBS=1 but {', '.join(_MISSING)} cannot be imported; build the "
            "environment with `make test-real` (.venv-real)"
        )
    pytest.skip(
        f"{', '.join(_MISSING)} not installed: `make test-real` runs these in .venv-real",
        allow_module_level=True,
    )

import timm  # noqa: E402
import torchvision  # noqa: E402

NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)

#: (label, constructor) — the families convert supports, at their real sizes (no weights loaded)
MODELS = {
    "tv-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv-resnet50": lambda: torchvision.models.resnet50(num_classes=10),
    "tv-wide_resnet50_2": lambda: torchvision.models.wide_resnet50_2(num_classes=10),
    "tv-resnext50_32x4d": lambda: torchvision.models.resnext50_32x4d(num_classes=10),
    "timm-resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm-resnet50": lambda: timm.create_model("resnet50", num_classes=10),
    "timm-resnet50_gn": lambda: timm.create_model("resnet50_gn", num_classes=10),
    "timm-resnet26d": lambda: timm.create_model("resnet26d", num_classes=10),
    "timm-resnet50d": lambda: timm.create_model("resnet50d", num_classes=10),
    "timm-resnet10t": lambda: timm.create_model("resnet10t", num_classes=10),
    "timm-resnext50d_32x4d": lambda: timm.create_model("resnext50d_32x4d", num_classes=10),
    "timm-resnet18-silu": lambda: timm.create_model("resnet18", num_classes=10, act_layer="silu"),
    "timm-resnet26d-silu": lambda: timm.create_model("resnet26d", num_classes=10, act_layer="silu"),
    "timm-resnet18-droppath": lambda: timm.create_model(
        "resnet18", num_classes=10, drop_path_rate=0.1
    ),
}
#: schemes convert applies to a foreign model (nf builds its own weight layers; admin profiles ω
#: on the model's example_input, which a foreign model lacks: both refused, tested below)
SCHEMES = [s for s in dl.list_schemes() if s not in ("nf", "admin")]


def _activation_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.GELU))}


@pytest.fixture(scope="module")
def built():
    """Each model built once (seeded); tests convert copies."""
    out = {}
    for label, make in MODELS.items():
        torch.manual_seed(0)
        out[label] = make().eval()
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("label", list(MODELS))
def test_convert_real_model(built, label, scheme):
    torch.manual_seed(0)
    model = built[label]
    acts = _activation_types(model)
    net = dl.convert(model, scheme)
    blocks = residual_blocks(net)
    assert len(blocks) == sum(
        1 for m in model.modules() if type(m).__name__ in ("BasicBlock", "Bottleneck")
    )
    s = dl.get_scheme(scheme)
    kinds = {
        type(m)
        for m in (s.norm(8, "channels"), s.post_norm(8, "channels"), s.final_norm(8, "channels"))
        if m is not None
    }
    left = [type(m) for m in net.modules() if isinstance(m, NORMS)]
    assert all(k in kinds for k in left), f"{scheme}: norms left {left}"
    if not kinds:
        assert not left
    assert _activation_types(net) == acts  # SiLU stays SiLU; no ReLU slipped in
    drops = sum(type(m).__name__ == "DropPath" for m in model.modules())  # (rate 0 first)
    assert sum(type(b.branch[-1]).__name__ == "DropPath" for b in blocks) == drops
    x = torch.randn(2, 3, 64, 64)
    if dl.get_scheme(scheme).identity_at_init():
        seen = {}
        hooks = [
            b.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o))) for b in blocks
        ]
        net.eval()
        with torch.no_grad():
            net(x)
        for h in hooks:
            h.remove()
        for b in blocks:
            inp, out = seen[b]
            with torch.no_grad():
                skip = inp if b.shortcut is None else b.shortcut(inp)
                torch.testing.assert_close(out, b.post(skip), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label", ["tv-resnet18", "timm-resnet26d-silu", "timm-resnet18-droppath"])
@pytest.mark.parametrize("scheme", ["skipinit", "fixup", "batchnorm"])
def test_converted_real_models_train(built, label, scheme):
    torch.manual_seed(0)
    net = dl.convert(built[label], scheme).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < 0.8 * losses[0], losses


def test_schemes_convert_cannot_apply_are_refused(built):
    with pytest.raises(dl.DepthlabError, match="builds its own weight layers"):
        dl.convert(built["tv-resnet18"], "nf")
    with pytest.raises(dl.DepthlabError, match="example_input"):
        dl.convert(built["tv-resnet18"], "admin")


@pytest.mark.parametrize("name", ["resnetv2_50", "seresnet50", "resnet50_gn"])
def test_unsupported_timm_parts_are_refused_or_converted(name):
    """ResNet-v2 (pre-activation blocks) and squeeze-excitation are refused with a message;
    GroupNorm ResNets convert."""
    model = timm.create_model(name, num_classes=10)
    if name == "resnet50_gn":
        assert residual_blocks(dl.convert(model, "skipinit"))
        return
    with pytest.raises(dl.DepthlabError):
        dl.convert(model, "skipinit")
