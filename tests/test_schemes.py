"""Scheme formulas block by block, scheme options, bad input, the registries."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.registry import Registry
from depthlab.schemes import DeepNorm


def test_catalog():
    assert {
        "noskip", "plain", "scaled", "batchnorm", "layernorm", "prenorm", "postnorm",
        "skipinit", "rezero", "fixup", "deepnorm",
    } <= set(dl.list_schemes())  # fmt: skip


def _block_io(scheme: str, **options):
    """The first block of a small MLP under ``scheme``, with a non-zero gate, and one input."""
    net = dl.create_model("mlp", depth=4, width=8, in_dim=8, scheme=scheme, scheme_options=options)
    return net.blocks[0].eval(), torch.randn(5, 8, dtype=torch.float32)


@pytest.mark.parametrize(
    ("scheme", "options", "formula"),
    [
        ("plain", {}, lambda x, f: x + f),
        ("noskip", {}, lambda x, f: f),
        ("scaled", {}, lambda x, f: (x + f) / math.sqrt(2)),
        ("skipinit", {"alpha_init": 0.3}, lambda x, f: x + 0.3 * f),
        ("rezero", {"alpha_init": -0.7}, lambda x, f: x + -0.7 * f),
        ("deepnorm", {}, lambda x, f: nn.functional.layer_norm(4**0.25 * x + f, (8,))),
        ("postnorm", {}, lambda x, f: nn.functional.layer_norm(x + f, (8,))),
    ],
)
def test_block_formula(scheme, options, formula):
    """``y = post(skip_mult·x + gate·f(x))`` gives each paper's block (deepnorm: α = L^(1/4))."""
    blk, x = _block_io(scheme, **options)
    with torch.no_grad():
        f = blk.branch(x)  # the ungated branch
        torch.testing.assert_close(blk(x), formula(x, f), atol=1e-6, rtol=1e-6)
        assert f.abs().max() > 0.1


def test_batchnorm_and_prenorm_put_the_norm_in_the_branch():
    bn = dl.create_model("mlp", depth=2, width=8, scheme="batchnorm")
    assert isinstance(bn.blocks[0].branch[0], nn.BatchNorm1d) and bn.blocks[0].post is None
    assert isinstance(bn.head[0], nn.BatchNorm1d)  # final BN-ReLU before the classifier
    assert all(m.bias is None for m in bn.blocks.modules() if isinstance(m, nn.Linear))
    pre = dl.create_model("resnet", depth=8, scheme="prenorm")
    assert isinstance(pre.blocks[0].branch[0], nn.GroupNorm) and pre.blocks[0].post is None
    post = dl.create_model("mlp", depth=2, width=8, scheme="postnorm")
    assert isinstance(post.blocks[0].post, nn.LayerNorm)
    assert not any(isinstance(m, nn.LayerNorm) for m in post.blocks[0].branch.modules())


def test_skipinit_and_plain_layers_have_biases():
    for scheme in ("skipinit", "plain", "rezero"):
        net = dl.create_model("resnet", depth=8, scheme=scheme)
        convs = [m for m in net.blocks.modules() if isinstance(m, nn.Conv2d)]
        branch_convs = [c for b in net.blocks for c in b.branch.modules() if c in convs]
        assert branch_convs and all(c.bias is not None for c in branch_convs)


@pytest.mark.parametrize("N", [1, 6, 18, 100])
def test_deepnorm_constants(N):
    """Encoder-only DeepNet (arXiv 2203.00555): α = (2N)^(1/4), β = (8N)^(-1/4), N layers
    = L/2 residual sublayers."""
    L = 2 * N
    assert DeepNorm.alpha(L) == pytest.approx((2 * N) ** 0.25, rel=1e-12)
    assert DeepNorm.beta(L) == pytest.approx((8 * N) ** -0.25, rel=1e-12)


def test_get_scheme_resolves_and_replaces_options():
    s = dl.get_scheme("skipinit", alpha_init="1/sqrt(d)", learnable=False)
    assert s.name == "skipinit" and s.options == {"alpha_init": "1/sqrt(d)", "learnable": False}
    gate = s.gate(16)
    assert gate.alpha.item() == pytest.approx(0.25) and not list(gate.parameters())
    t = dl.get_scheme(s, alpha_init=0.5)
    assert t.alpha_init == 0.5 and s.alpha_init == "1/sqrt(d)"
    assert dl.get_scheme(s) is s
    assert str(dl.get_scheme("plain")) == "plain"


# -- bad input ----------------------------------------------------------------------------------


def test_unknown_scheme_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown scheme 'fixpu' \(did you mean 'fixup'\?\)"):
        dl.get_scheme("fixpu")
    with pytest.raises(dl.DepthlabError, match="choose one of: .*rezero.*skipinit"):
        dl.create_model("mlp", scheme="skip-init")


def test_unknown_scheme_option_names_the_valid_ones():
    with pytest.raises(dl.DepthlabError, match=r"\['alpah_init'\].*valid: alpha_init, learnable"):
        dl.get_scheme("skipinit", alpah_init=0.0)
    with pytest.raises(dl.DepthlabError, match="takes no options"):
        dl.get_scheme("plain", alpha_init=0.0)
    with pytest.raises(dl.DepthlabError, match="valid: alpha_init"):
        dl.get_scheme(dl.get_scheme("rezero"), alpha=1.0)


@pytest.mark.parametrize("bad", ["abc", "1/sqrt(x)", None, True, [0.0], float("nan"), "inf"])
def test_skipinit_alpha_init_garbage_is_refused(bad):
    with pytest.raises(dl.DepthlabError, match=r"alpha_init must be a finite number or '1/sqrt"):
        dl.get_scheme("skipinit", alpha_init=bad)


def test_layernorm_placement_is_checked():
    with pytest.raises(dl.DepthlabError, match="'pre' or 'post'"):
        dl.get_scheme("layernorm", placement="middle")
    with pytest.raises(dl.DepthlabError, match="use scheme 'prenorm'"):
        dl.get_scheme("postnorm", placement="pre")  # a Pre-LN model must not be labelled Post-LN
    with pytest.raises(dl.DepthlabError, match="use scheme 'postnorm'"):
        dl.get_scheme("prenorm", placement="post")
    assert dl.get_scheme("postnorm").placement == "post"


def test_registry_refuses_duplicates_and_names_choices():
    reg: Registry[object] = Registry("widget")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(int)
    with pytest.raises(ValueError, match="unknown widget 'b'; choose one of: a"):
        reg.get("b")
    with pytest.raises(ValueError, match="scheme 'plain' is already registered"):

        @dl.SCHEMES.register()
        class Plain2(dl.Scheme):
            name = "plain"

    with pytest.raises(ValueError, match="model 'mlp' is already registered"):
        dl.MODELS.register("mlp")(nn.Linear)
    assert dl.MODELS.get("mlp").__name__ == "MLP"


def test_fixup_rules_are_options_for_ablations():
    """Each Fixup rule can be switched off alone: zero_init (rule 1), rescale (rule 2), the scalar
    multipliers and biases (rule 3)."""
    import math

    from depthlab.nn import Bias, Gate
    from depthlab.nn.residual import residual_blocks, weight_layers

    def build(**opts):
        torch.manual_seed(0)
        return dl.create_model("resnet", depth=56, scheme="fixup", scheme_options=opts or None)

    full = build()
    blocks = residual_blocks(full)
    first, last = weight_layers(blocks[5].branch)
    fan_in = first.weight[0].numel()
    he = math.sqrt(2.0 / fan_in)
    assert first.weight.std().item() == pytest.approx(he * len(blocks) ** -0.5, rel=0.05)
    assert last.weight.abs().max().item() == 0.0 and full.classifier.weight.abs().max() == 0
    no_rescale = weight_layers(residual_blocks(build(rescale=False))[5].branch)[0]
    assert no_rescale.weight.std().item() == pytest.approx(he, rel=0.05)  # plain He init
    no_zero = build(zero_init=False)
    assert weight_layers(residual_blocks(no_zero)[5].branch)[1].weight.abs().max() > 0
    assert no_zero.classifier.weight.abs().max() > 0
    x = torch.randn(4, 3, 32, 32)
    assert torch.all(full(x) == 0) and not torch.all(no_zero(x) == 0)
    assert not dl.get_scheme("fixup", zero_init=False).identity_at_init()
    count = lambda m, t: sum(isinstance(mod, t) for mod in m.modules())  # noqa: E731
    assert count(full, Gate) == len(blocks) and count(build(multiplier=False), Gate) == 0
    assert count(full, Bias) > 0 and count(build(biases=False), Bias) == 0
    with pytest.raises(dl.DepthlabError, match="rescale in scheme 'fixup' must be true or false"):
        dl.get_scheme("fixup", rescale="maybe")


def _fixup(variant: str = "postact", **opts):
    """A Fixup ResNet-20 (width 2) with the given rule options, from seed 0: the model, its
    inner branch layers, the last layer of each branch and its stem conv."""
    from depthlab.nn.residual import residual_blocks, weight_layers

    torch.manual_seed(0)
    net = dl.create_model(
        "resnet", depth=20, scheme="fixup", width=2, variant=variant, scheme_options=opts or None
    )
    blocks = residual_blocks(net)
    inner = [w for b in blocks for w in weight_layers(b.branch)[:-1]]
    last = [weight_layers(b.branch)[-1] for b in blocks]
    return net, inner, last, weight_layers(net.stem)[0]


def _same(a, b) -> bool:
    return all(torch.equal(x.weight, y.weight) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("variant", ["postact", "preact"])
def test_fixup_rescale_off_changes_only_the_inner_branch_layers_by_the_factor(variant):
    full, inner, last, stem = _fixup(variant)
    off, inner_off, last_off, stem_off = _fixup(variant, rescale=False)
    L = len(last)
    for a, b in zip(inner, inner_off, strict=True):  # the same draws, L^(1/2) larger (m = 2)
        torch.testing.assert_close(b.weight, a.weight * L**0.5, rtol=1e-6, atol=0)
    assert _same(last, last_off) and _same([stem], [stem_off])
    assert torch.equal(full.classifier.weight, off.classifier.weight)


@pytest.mark.parametrize("variant", ["postact", "preact"])
def test_fixup_zero_init_off_changes_only_the_last_layers_and_the_classifier(variant):
    import math

    full, inner, last, stem = _fixup(variant)
    off, inner_off, last_off, stem_off = _fixup(variant, zero_init=False)
    assert _same(inner, inner_off) and _same([stem], [stem_off])
    assert all(not x.weight.any() for x in last) and not full.classifier.weight.any()
    assert all(x.weight.any() for x in last_off) and off.classifier.weight.any()
    # the last layers He-initialised from the fan-out (3×3 convs: fan = 9·c_out), no rescale
    z = torch.cat([x.weight.flatten() * math.sqrt(9 * x.weight.shape[0] / 2) for x in last_off])
    assert abs(z.std().item() - 1) < 0.03


@pytest.mark.parametrize("rule", ["multiplier", "biases"])
def test_fixup_scalars_off_drop_only_their_scalars(rule):
    from depthlab.nn import Bias, Gate

    full, inner, last, stem = _fixup()
    off, inner_off, last_off, stem_off = _fixup(**{rule: False})
    assert _same(inner, inner_off) and _same(last, last_off) and _same([stem], [stem_off])
    kind = Gate if rule == "multiplier" else Bias
    other = Bias if rule == "multiplier" else Gate
    count = lambda m, t: sum(isinstance(mod, t) for mod in m.modules())  # noqa: E731
    assert count(full, kind) > 0 and count(off, kind) == 0
    assert count(off, other) == count(full, other)
