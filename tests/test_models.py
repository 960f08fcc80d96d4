"""Every registered model under every registered scheme, plus per-model properties."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.models.linear import fold_
from depthlab.nn.residual import residual_blocks

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration")  # from mkldnn.flags

# model -> (small constructor kwargs, two depths, input batch maker). A model registered without
# an entry here fails test_every_model_has_a_small_config: add one.
SMALL = {
    "mlp": (dict(width=16, in_dim=12, num_classes=5), (2, 5), lambda: torch.randn(4, 12)),
    "resnet": (dict(num_classes=5), (8, 14), lambda: torch.randn(2, 3, 8, 8)),
    "resnet-bottleneck": (
        dict(stem="cifar", base_width=4, num_classes=5),
        (26, 38),
        lambda: torch.randn(2, 3, 4, 4),
    ),
    "linear": (dict(width=8), (2, 5), lambda: torch.randn(4, 8)),
    "transformer-lm": (
        dict(d_model=16, nhead=2, context=8, vocab_size=32),
        (1, 3),
        lambda: torch.randint(0, 32, (2, 8)),
    ),
}


@pytest.fixture(autouse=True)
def _native_conv():
    """Tiny convs: oneDNN's per-call primitive setup costs ~10x the native kernels here."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield


CASES = [
    (model, scheme, depth)
    for model in dl.list_models()
    if model in SMALL
    for scheme in dl.list_schemes()
    for depth in SMALL[model][1]
]


def build(model: str, scheme: str, depth: int | None = None, **extra) -> nn.Module:
    kwargs, depths, _ = SMALL[model]
    return dl.create_model(model, depth=depth or depths[0], scheme=scheme, **{**kwargs, **extra})


def test_every_model_has_a_small_config():
    missing = [m for m in dl.list_models() if m not in SMALL]
    assert not missing, f"add small constructor kwargs and an input for {missing} to SMALL"


@pytest.mark.parametrize(("model", "scheme", "depth"), CASES)
def test_forward_backward_finite(model, scheme, depth):
    net = build(model, scheme, depth).train()
    x = SMALL[model][2]()
    out = net(x)
    assert out.shape[0] == x.shape[0]
    assert torch.isfinite(out).all()
    (out.float() * torch.randn(out.shape)).sum().backward()  # not stationary at zero logits
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads, "backward reached no parameter"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert len(residual_blocks(net)) > 0
    assert net.config["depth"] == depth and net.scheme.name == scheme


IDENTITY_SCHEMES = [s for s in dl.list_schemes() if dl.get_scheme(s).identity_at_init()]


def test_identity_schemes_include_the_papers():
    assert {"skipinit", "rezero", "fixup"} <= set(IDENTITY_SCHEMES)


def _capture(net: nn.Module, x: torch.Tensor, modules: list[nn.Module]):
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, (inp[0], out)))
        for m in modules
    ]
    logits = net(x)
    for h in hooks:
        h.remove()
    return logits, seen


@pytest.mark.parametrize("model", sorted(SMALL))
@pytest.mark.parametrize("scheme", IDENTITY_SCHEMES)
def test_blocks_are_identity_at_init(model, scheme):
    """SkipInit/ReZero/Fixup: every block returns its skip path exactly (x, or shortcut(x))."""
    net = build(model, scheme).train()
    blocks = residual_blocks(net)
    _, seen = _capture(net, SMALL[model][2](), blocks)
    assert len(seen) == len(blocks)
    for blk in blocks:
        x, y = seen[blk]
        with torch.no_grad():
            skip = x if blk.shortcut is None else blk.shortcut(x)
            if blk.post is not None:  # post-activation ResNets: σ after the sum
                skip = blk.post(skip)
        assert torch.equal(y, skip)
        if blk.shortcut is None:
            assert torch.equal(y, x)  # σ(x) = x: the block's input is post-σ already


@pytest.mark.parametrize("model", ["mlp", "resnet", "resnet-bottleneck"])
def test_fixup_branches_and_logits_are_zero_at_init(model):
    net = build(model, "fixup")
    blocks = residual_blocks(net)
    logits, seen = _capture(net, SMALL[model][2](), [b.branch for b in blocks])
    for blk in blocks:
        assert torch.equal(seen[blk.branch][1], torch.zeros_like(seen[blk.branch][1]))
    assert torch.equal(logits, torch.zeros_like(logits))


@pytest.mark.parametrize(
    ("model", "kwargs", "m"),
    [
        ("resnet", dict(depth=14, width=4), 2),  # L = 6 basic blocks
        ("resnet-bottleneck", dict(depth=26, base_width=32, stem="cifar"), 3),  # L = 8
    ],
)
@pytest.mark.parametrize("variant", ["postact", "preact"])
@pytest.mark.parametrize("fan_mode", ["fan_out", "fan_in"])
def test_fixup_init_scales_branch_layers(model, kwargs, m, variant, fan_mode):
    """Fixup rule 2: std of non-final branch layers = He std (from the fan-out, as the reference
    code, or the fan-in) x L^(-1/(2m-2)), within 3%; rule 1: last branch layer and classifier
    zero; rule 3: multipliers 1, scalar biases 0."""
    net = dl.create_model(
        model, scheme="fixup", variant=variant, scheme_options={"fan_mode": fan_mode}, **kwargs
    )
    blocks = residual_blocks(net)
    L = len(blocks)
    factor = L ** (-1 / (2 * m - 2))
    for blk in blocks:
        layers = [mod for mod in blk.branch.modules() if isinstance(mod, nn.Conv2d)]
        assert len(layers) == m
        # each weight divided by its target std (He std x factor): unit std per layer and branch
        dim = 0 if fan_mode == "fan_out" else 1
        normed = [
            layer.weight
            / (math.sqrt(2.0 / (layer.weight.shape[dim] * layer.weight[0, 0].numel())) * factor)
            for layer in layers[:-1]
        ]
        for z in normed:
            if z.numel() >= 8192:  # std estimated to better than 0.8%
                assert abs(z.std().item() - 1) < 0.03
        pooled = torch.cat([z.flatten() for z in normed])
        assert pooled.numel() >= 8192 and abs(pooled.std().item() - 1) < 0.03
        assert torch.equal(layers[-1].weight, torch.zeros_like(layers[-1].weight))
    assert torch.equal(net.classifier.weight, torch.zeros_like(net.classifier.weight))
    assert torch.equal(net.classifier.bias, torch.zeros_like(net.classifier.bias))
    gates = [g for g in net.modules() if isinstance(g, dl.Gate)]
    biases = [b for b in net.modules() if isinstance(b, dl.Bias)]
    assert len(gates) == L and all(g.alpha.item() == 1.0 for g in gates)
    # 2 per weight layer, one before the classifier and, post-activation, one after the stem
    assert len(biases) == L * (2 * m) + 1 + (variant == "postact")
    assert all(b.bias.item() == 0.0 for b in biases)


def test_deepnorm_init_matches_formulas():
    """α = (2N)^(1/4) on the skip, β = (8N)^(-1/4) on Xavier-normal branch weights, with N = L/2
    encoder layers of two residual sublayers each; LayerNorm after every sum."""
    L, width = 8, 256
    net = dl.create_model("mlp", depth=L, width=width, scheme="deepnorm")
    N = L / 2
    alpha, beta = (2 * N) ** 0.25, (8 * N) ** -0.25
    for blk in residual_blocks(net):
        assert blk.skip_mult == pytest.approx(alpha, rel=1e-12)
        assert isinstance(blk.post, nn.LayerNorm)
        w = blk.branch[1].weight
        xavier = math.sqrt(2.0 / (width + width))
        assert abs(w.std().item() / (xavier * beta) - 1) < 0.03


def test_skipinit_alpha_one_over_sqrt_depth():
    net = build("mlp", "skipinit", 9, scheme_options={"alpha_init": "1/sqrt(d)"})
    assert [b.gate.alpha.item() for b in net.blocks] == pytest.approx([1 / 3] * 9)


def test_resnet_structure_and_wide_resnet_size():
    net = dl.create_model("resnet", depth=56, scheme="batchnorm")
    assert len(net.blocks) == 27
    assert [net.blocks[i].branch[2].out_channels for i in (0, 9, 18)] == [16, 32, 64]
    # He et al. 2015 Table 6: ResNet-56 has 0.85M parameters
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(0.85, abs=0.01)


def test_checkpointing_gives_the_same_function():
    net = build("resnet", "skipinit", 14, scheme_options={"alpha_init": 0.5}).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    net(x).sum().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.blocks.checkpoint_segments = 2
    net(x).sum().backward()
    for a, p in zip(ref, net.parameters()):
        torch.testing.assert_close(p.grad, a)


@pytest.mark.parametrize("model", ["mlp", "resnet", "resnet-bottleneck"])
@pytest.mark.parametrize("scheme", ["skipinit", "fixup", "scaled"])
def test_fused_branch_equals_module_by_module(model, scheme, module_by_module):
    """The Branch fusion of scalar gates/biases into weight layers computes the same outputs and
    gradients as calling every module (which a global hook forces)."""
    net = build(model, scheme).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = SMALL[model][2]().double()

    def run():
        net.zero_grad()
        out = net(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None]

    fused, fused_grads = run()
    plain, plain_grads = module_by_module(run)
    torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_branch_hook_sees_the_ungated_branch_output():
    net = build("resnet", "skipinit", scheme_options={"alpha_init": 0.5}).eval()
    blk = net.blocks[0]
    seen = {}
    blk.branch.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = torch.rand(2, 16, 8, 8)
    y = blk(x)
    torch.testing.assert_close(y, x + 0.5 * seen["out"])


# -- linear -------------------------------------------------------------------------------------


def test_linear_orthogonal_init():
    net = dl.create_model("linear", depth=5, width=32, init="orthogonal")
    for w in net.weights():
        torch.testing.assert_close(w @ w.T, torch.eye(32), atol=1e-5, rtol=0)


def test_linear_identity_init_is_the_identity_map():
    net = dl.create_model("linear", depth=4, width=8, init="identity")
    x = torch.randn(3, 8)
    assert torch.equal(net(x), x)


@pytest.mark.parametrize("k", [1, 2])
def test_linear_fold_init(k):
    width = 32
    net = dl.create_model("linear", depth=3, width=width, init=f"fold:{k}")
    for w in net.weights():
        wt = w.T  # the paper's (in, out) layout: its upper and lower halves are equal
        rows = width // 2**k
        for i in range(1, 2**k):
            assert torch.equal(wt[i * rows : (i + 1) * rows], wt[:rows])
        assert torch.linalg.matrix_rank(w).item() == rows
    if k == 1:
        std = dl.create_model("linear", depth=3, width=width, init="standard")
        assert all(torch.linalg.matrix_rank(w).item() == width for w in std.weights())


def test_fold_refuses_too_small_matrices():
    with pytest.raises(dl.DepthlabError, match="fold:3"):
        fold_(torch.zeros(4, 4), 3)


def test_linear_schemes_put_their_slots_around_the_matrix():
    bn = dl.create_model("linear", depth=2, width=8, scheme="batchnorm")
    assert isinstance(bn.blocks[0].branch[0], nn.BatchNorm1d)
    plain = dl.create_model("linear", depth=2, width=8, scheme="plain")
    x = torch.randn(3, 8)
    W1, W2 = plain.weights()
    h = x + x @ W1.T
    torch.testing.assert_close(plain(x), h + h @ W2.T)


# -- construction at depth --------------------------------------------------------------------


def test_large_models_init_in_parallel_reproducibly(monkeypatch):
    """Above PARALLEL_INIT_NUMEL weights, init uses per-layer generators: the same values for the
    same torch seed, whatever the thread count, and still He-normal."""
    import depthlab.models.common as common

    monkeypatch.setattr(common, "PARALLEL_INIT_NUMEL", 1)
    torch.manual_seed(1)
    a = dl.create_model("mlp", depth=6, width=128, scheme="rezero")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(1)
        b = dl.create_model("mlp", depth=6, width=128, scheme="rezero")
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    ws = torch.stack([blk.branch[1].weight for blk in a.blocks])
    assert ws.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.02)
    assert not torch.equal(ws[0], ws[1])


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_model_and_option_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown model 'resnt'.*choose one of: .*mlp.*resnet"):
        dl.create_model("resnt")
    with pytest.raises(dl.DepthlabError, match=r"\['widht'\] for model 'mlp'; valid: .*width"):
        dl.create_model("mlp", widht=8)
    with pytest.raises(dl.DepthlabError, match="unknown activation 'gelu'.*relu"):
        dl.create_model("mlp", activation="gelu")
    with pytest.raises(dl.DepthlabError, match="standard, orthogonal, identity, fold:k"):
        dl.create_model("linear", init="fold:x")
    with pytest.raises(dl.DepthlabError, match="'imagenet' or 'cifar'"):
        dl.create_model("resnet-bottleneck", stem="tiny")


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(dl.DepthlabError, match=r"6n\+2 .*20, 32, 56, 110.*got 54"):
        dl.create_model("resnet", depth=54)
    with pytest.raises(dl.DepthlabError, match="26, 38, 50, 101, 152, got 34"):
        dl.create_model("resnet-bottleneck", depth=34)


@pytest.mark.parametrize("model", sorted(SMALL))
@pytest.mark.parametrize("bad", [0, -2, 2.5])
def test_nonpositive_sizes_are_refused(model, bad):
    with pytest.raises(dl.DepthlabError, match="depth( in model '[a-z-]+')? must be .*integer"):
        dl.create_model(model, depth=bad)
    size = "d_model" if model == "transformer-lm" else "width"
    with pytest.raises(dl.DepthlabError, match=f"{size}( in model '[a-z-]+')? must be"):
        dl.create_model(model, **{size: bad})


def test_wide_resnet_depth_counting():
    # Wide-ResNet n-k counts the projection convs: WRN-28-k has 4 blocks per stage (6·4+4 = 28),
    # the same network as the 6n+2 depth 26.
    wrn = dl.create_model("resnet", depth=28, width=2, in_channels=1)
    same = dl.create_model("resnet", depth=26, width=2, in_channels=1)
    assert len(wrn.blocks) == len(same.blocks) == 12
    assert wrn.blocks[-1].branch[-1].out_channels == 64 * 2


@pytest.mark.parametrize("model", ["mlp", "resnet", "resnet-postact"])
def test_frozen_zero_gate_blocks_are_skipped_with_the_same_function(model):
    """A block with a gate fixed at 0 does not use its branch: the stack skips identity blocks,
    other blocks compute only ``post(c·shortcut(x))`` (the post-activation net's ReLU after the
    sum, its option-A and the pre-activation net's projection shortcuts), so the frozen-gate
    controls cost no more than their stem, shortcuts and head; the output and gradients equal
    those of the full computation (forced by a global hook, which turns the skip off)."""
    import torch.nn.modules.module as module_mod

    torch.manual_seed(0)
    variant = "postact" if "postact" in model else "preact"
    kw = (
        {"depth": 8, "width": 6, "in_dim": 5}
        if model == "mlp"
        else {"depth": 14, "in_channels": 1, "variant": variant}
    )
    model = model.split("-")[0]
    m = dl.create_model(model, scheme="skipinit", scheme_options={"learnable": False}, **kw)
    x = torch.randn(4, 5) if model == "mlp" else torch.randn(4, 1, 8, 8)

    def run():
        m.zero_grad(set_to_none=True)
        out = m(x)
        out.square().sum().backward()
        return out.detach(), {
            n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None
        }

    fast_out, fast_grads = run()
    handle = module_mod.register_module_forward_hook(lambda *a: None)
    try:
        full_out, full_grads = run()
    finally:
        handle.remove()
    torch.testing.assert_close(fast_out, full_out, rtol=1e-6, atol=1e-6)
    for name, g in fast_grads.items():
        torch.testing.assert_close(g, full_grads[name], rtol=1e-5, atol=1e-6)
    # the skipped branches are not computed: NaN weights there leave the output finite
    with torch.no_grad():
        for b in dl.residual_blocks(m):
            if b.branch_unused():
                for p in b.branch.parameters():
                    p.fill_(float("nan"))
    assert torch.isfinite(m(x)).all()
    assert all(b.branch_unused() for b in dl.residual_blocks(m))
    if kw.get("variant") != "postact":
        assert any(b.is_identity() for b in dl.residual_blocks(m))
    torch.testing.assert_close(m(x), fast_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "gate,skip,shortcut,post,hook,expected",
    [
        ((0.0, False), 1.0, False, False, False, True),  # the frozen-gate control: y = x
        ((0.0, True), 1.0, False, False, False, False),  # a learnable gate at 0 may move
        ((0.5, False), 1.0, False, False, False, False),  # a fixed gate that is not 0
        (None, 1.0, False, False, False, False),  # no gate: the branch counts
        ((0.0, False), 0.5, False, False, False, False),  # a skip multiplier
        ((0.0, False), 1.0, True, False, False, False),  # a shortcut module
        ((0.0, False), 1.0, False, True, False, False),  # a post-sum module
        ((0.0, False), 1.0, False, False, True, False),  # a hook inside the branch
    ],
)
def test_block_is_identity_exactly_when_nothing_but_the_skip_reaches_the_output(
    gate, skip, shortcut, post, hook, expected
):
    """``Residual.is_identity`` (a BlockStack then skips the block): only a fixed α = 0 gate with
    an identity skip, no shortcut, no post-sum module and no hook; and then the block is the
    identity."""
    from depthlab.nn.residual import Residual
    from depthlab.nn.scalars import Gate

    branch = nn.Sequential(nn.ReLU(), nn.Linear(4, 4))
    if hook:
        branch[1].register_forward_hook(lambda *a: None)
    block = Residual(
        branch,
        gate=None if gate is None else Gate(gate[0], learnable=gate[1]),
        skip=skip,
        shortcut=nn.Identity() if shortcut else None,
        post=nn.Identity() if post else None,
    )
    assert block.is_identity() is expected
    if expected:
        x = torch.randn(3, 4)
        torch.testing.assert_close(block(x), x, rtol=0, atol=0)
