"""Transformer blocks under every scheme and the byte-level language model ``transformer-lm``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.data import create_dataset
from depthlab.models import TransformerBlock, TransformerLM
from depthlab.nn import Bias, Gate, MultiHeadAttention, Residual
from depthlab.schemes import DeepNorm


def lm(scheme: str = "prenorm", depth: int = 2, **kw) -> TransformerLM:
    opts = dict(d_model=16, nhead=2, context=8, dim_feedforward=32)
    opts.update(kw)
    return dl.create_model("transformer-lm", depth=depth, scheme=scheme, **opts)


def tokens(batch: int = 3, length: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (zero gates and zero layers included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("scheme", dl.list_schemes())
def test_every_scheme_builds_runs_and_backpropagates(scheme):
    torch.manual_seed(0)
    model = lm(scheme)
    assert len(dl.residual_blocks(model)) == 4 and len(model.blocks) == 4
    assert all(isinstance(b, Residual) for b in model.blocks)
    logits = model(tokens())
    assert logits.shape == (3, 8, 256) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits.flatten(0, 1), tokens(seed=1).flatten()).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    h = model.embed(tokens())
    if model.scheme.identity_at_init():  # rezero, skipinit, fixup: the stack is the identity
        assert torch.equal(model.blocks(h), h)
    else:
        assert not torch.allclose(model.blocks(h), h)


@pytest.mark.parametrize("scheme", ["rezero", "skipinit"])
def test_gated_blocks_are_identity_at_init(scheme):
    block = TransformerBlock(32, 4, 64, dropout=0.1, scheme=scheme, causal=True)
    block.train()  # dropout active: α = 0 still makes each sublayer exactly zero
    x = torch.randn(2, 6, 32)
    assert torch.equal(block(x), x)
    assert block.attn.gate is not None and block.attn.gate.alpha.item() == 0.0


def test_rezero_shares_one_alpha_per_layer_unless_per_sublayer():
    shared = lm("rezero", depth=3)
    alphas = [p for p in shared.parameters() if p.dim() == 0]
    assert len(alphas) == 3
    for attn, ff in zip(shared.blocks[0::2], shared.blocks[1::2]):
        assert attn.gate is not ff.gate and attn.gate.alpha is ff.gate.alpha
    separate = lm("rezero", depth=3, scheme_options={"per_sublayer": True})
    assert sum(p.dim() == 0 for p in separate.parameters()) == 6
    # the shared α collects the gradient of both sublayers
    torch.manual_seed(0)
    model = perturb_(lm("rezero", depth=1))
    x = tokens()
    model(x).square().mean().backward()
    g_shared = model.blocks[0].gate.alpha.grad.clone()
    split = lm("rezero", depth=1, scheme_options={"per_sublayer": True})
    split.load_state_dict(model.state_dict())
    split(x).square().mean().backward()
    total = split.blocks[0].gate.alpha.grad + split.blocks[1].gate.alpha.grad
    torch.testing.assert_close(g_shared, total, rtol=1e-4, atol=1e-6)
    # "ReZero α=1": the paper's ablation row
    one = lm("rezero", scheme_options={"alpha_init": 1})
    assert all(b.gate.alpha.item() == 1.0 for b in one.blocks)


def test_fixup_transformer_rules():
    depth, d, ff = 4, 64, 128
    model = lm("fixup", depth=depth, d_model=d, nhead=4, dim_feedforward=ff)
    L = 2 * depth  # residual sublayers
    assert not any(
        isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) for m in model.modules()
    )
    x = torch.randn(2, 8, d)
    q, k, v, fc1 = [], [], [], []
    for blk in model.blocks:
        branch = blk.branch
        assert isinstance(branch[0], Bias) and isinstance(
            branch[-1], Gate
        )  # shift before, scale after
        assert torch.equal(branch(x), torch.zeros_like(x))  # every sublayer outputs zero at init
        attn = branch[1]
        if isinstance(attn, MultiHeadAttention):
            assert not attn.out_proj.weight.any()
            q.append(attn.q_proj.weight), k.append(attn.k_proj.weight), v.append(attn.v_proj.weight)
        else:
            fc1.append(branch[1].weight)
            assert not branch[-2].weight.any()  # second feed-forward layer zero
    assert not model.classifier.weight.any()
    for ws in (q, k, v):  # He (gain 1) × L^(-1/6)
        std = torch.cat([w.flatten() for w in ws]).std().item()
        assert std == pytest.approx(d**-0.5 * L ** (-1 / 6), rel=0.03)
    std = torch.cat([w.flatten() for w in fc1]).std().item()  # He (ReLU gain √2) × L^(-1/2)
    assert std == pytest.approx(math.sqrt(2 / d) * L**-0.5, rel=0.03)
    assert torch.equal(model(tokens()), torch.zeros(3, 8, 256))  # zero head


def test_deepnorm_transformer_rules():
    depth, d, ff = 4, 64, 128
    model = lm("deepnorm", depth=depth, d_model=d, nhead=4, dim_feedforward=ff)
    alpha, beta = (2 * depth) ** 0.25, (8 * depth) ** -0.25  # encoder-only DeepNet, N layers
    assert DeepNorm.alpha(2 * depth) == pytest.approx(alpha)
    assert DeepNorm.beta(2 * depth) == pytest.approx(beta)
    groups: dict[str, list[torch.Tensor]] = {"qk": [], "vo": [], "fc": []}
    for blk in model.blocks:
        assert blk.skip_mult == pytest.approx(alpha) and isinstance(blk.post, nn.LayerNorm)
        attn = blk.branch[0]
        if isinstance(attn, MultiHeadAttention):
            groups["qk"] += [attn.q_proj.weight, attn.k_proj.weight]
            groups["vo"] += [attn.v_proj.weight, attn.out_proj.weight]
        else:
            groups["fc"] += [blk.branch[0].weight, blk.branch[2].weight]
    expect = {
        "qk": d**-0.5,  # untouched: LeCun normal = Xavier normal (gain 1) for square matrices
        "vo": beta * math.sqrt(2 / (d + d)),  # Xavier normal with gain β
        "fc": beta * math.sqrt(2 / (d + ff)),
    }
    for key, ws in groups.items():
        std = torch.cat([w.flatten() for w in ws]).std().item()
        assert std == pytest.approx(expect[key], rel=0.03), key


def test_postnorm_output_has_per_token_unit_variance():
    torch.manual_seed(0)
    block = TransformerBlock(64, 4, 128, scheme="postnorm", causal=True)
    out = block(3.0 * torch.randn(4, 10, 64) + 1.0)
    torch.testing.assert_close(out.mean(-1), torch.zeros(4, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(4, 10), atol=1e-3, rtol=0)


@pytest.mark.parametrize("scheme", dl.list_schemes())
def test_causality(scheme):
    torch.manual_seed(0)
    model = perturb_(lm(scheme)).eval()  # eval: BatchNorm uses running statistics
    x1, x2 = tokens(), tokens()
    t = 4
    x2[:, t + 1 :] = (x2[:, t + 1 :] + 1) % 256  # change only the tokens after position t
    y1, y2 = model(x1), model(x2)
    torch.testing.assert_close(y1[:, : t + 1], y2[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y1[:, t + 1 :], y2[:, t + 1 :])


def test_non_causal_block_sees_the_future():
    """The causality test above can fail: without the mask, later tokens change earlier outputs."""
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, 32, scheme="prenorm", causal=False)
    x1 = torch.randn(1, 8, 16)
    x2 = x1.clone()
    x2[:, 5:] += torch.randn(1, 3, 16)
    assert not torch.allclose(block(x1)[:, :5], block(x2)[:, :5])


def test_embedding_init_and_tied_head():
    torch.manual_seed(0)
    model = lm("rezero", d_model=64, nhead=4)
    e = model.token_embedding.weight
    assert e.abs().max() <= 0.1 and e.std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.05)
    tied = lm("prenorm", tied=True)
    assert tied.classifier is None
    x = tokens()
    h = tied.final_norm(tied.blocks(tied.embed(x)))
    torch.testing.assert_close(tied(x), h @ tied.token_embedding.weight.T)
    fixup_tied = lm("fixup", tied=True)  # Fixup's zero head must not zero a tied embedding
    assert fixup_tied.token_embedding.weight.abs().min() >= 0 and fixup_tied(x).abs().max() > 0


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = perturb_(lm("rezero", depth=3))
    x = tokens()
    model(x).square().mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.blocks.checkpoint_segments = 2
    model(x).square().mean().backward()
    for g, w in zip([p.grad for p in model.parameters()], want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_bad_input_errors():
    with pytest.raises(dl.DepthlabError, match="not divisible by nhead"):
        lm(d_model=30, nhead=4)
    with pytest.raises(dl.DepthlabError, match="not divisible by nhead"):
        TransformerBlock(30, 4)
    with pytest.raises(dl.DepthlabError, match="exceeds the model's context 8"):
        lm()(tokens(length=9))
    with pytest.raises(dl.DepthlabError, match="did you mean 'fixup'"):
        lm("fixpu")
    with pytest.raises(dl.DepthlabError, match="integer token ids"):
        lm()(torch.randn(2, 8))
    with pytest.raises(dl.DepthlabError, match="unknown activation"):
        lm(activation="swishy")
    with pytest.raises(dl.DepthlabError, match="depth must be a positive integer"):
        lm(depth=0)


def test_diagnostics_on_the_transformer_stack():
    torch.manual_seed(0)
    model = lm("rezero", depth=2)
    x = tokens()
    df = dl.signal_propagation(model, x)
    assert len(df) == 4  # one row per residual sublayer
    assert (df["gated_var"] == 0).all() and (df["branch_var"] > 0).all()  # α = 0 at init
    torch.testing.assert_close(
        torch.tensor(df["out_var"].to_numpy()), torch.tensor(df["skip_var"].to_numpy())
    )
    with torch.no_grad():
        model.blocks[0].gate.alpha.fill_(0.5)  # shared by the layer's two sublayers
    df = dl.signal_propagation(model, x)
    assert df["gated_var"][0] > 0 and df["gated_var"][1] > 0
    assert df["gated_var"][0] != df["gated_var"][1]  # each sublayer's gate hooked separately
    # gradient norms: identity blocks pass ∂L/∂h unchanged, only the α's get a gradient at init
    fresh = lm("rezero", depth=2)
    g = dl.gradient_norms(fresh, x, tokens(seed=1))
    act = g[g.kind == "activation"]["norm"].to_numpy()
    assert len(act) == 4 and act.min() > 0 and act.max() == pytest.approx(act.min(), rel=1e-6)
    alphas = g[g.name.str.endswith("gate.alpha")]
    assert len(alphas) == 2 and (alphas["norm"] > 0).all()  # one shared α per layer
    assert (g[g.name.str.endswith("q_proj.weight")]["norm"] == 0).all()
    # input-output Jacobian of the stack on the embedded sequence (T·C = 128 dims per example):
    # the identity for ReZero at init, far from it for Post-LN
    h = fresh.embed(x[:2]).detach()
    sv = dl.jacobian_spectrum(fresh.blocks, h, method="dense")["singular_value"]
    assert len(sv) == 2 * 8 * 16
    torch.testing.assert_close(
        torch.tensor(sv.to_numpy()), torch.ones(len(sv), dtype=torch.float64)
    )
    post = lm("postnorm", depth=2)
    hp = post.embed(x[:2]).detach()
    sv = dl.jacobian_spectrum(post.blocks, hp, method="dense")["singular_value"]
    assert sv.max() / sv.min() > 10
    # matrix-free Lanczos (double VJP through attention) agrees with the dense spectrum
    with torch.no_grad():
        for blk in fresh.blocks:
            blk.gate.alpha.fill_(0.3)
    dense = dl.jacobian_spectrum(fresh.blocks, h[:1], method="dense", k=3)
    lanczos = dl.jacobian_spectrum(fresh.blocks, h[:1], method="lanczos", k=3)
    torch.testing.assert_close(
        torch.tensor(lanczos["singular_value"].to_numpy()),
        torch.tensor(dense["singular_value"].to_numpy()),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.fixture
def one_thread():
    """Width-32 matrices gain nothing from intra-op threads, and on a shared, busy CPU OpenMP
    threads spinning against other processes make this run 10-50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_deep_rezero_lm_trains_where_postnorm_does_not(one_thread):
    """64 layers, no warm-up, Adam: ReZero's test bits per byte fall well below the unigram
    entropy of the stdlib corpus (it uses the context); Post-LN stays near it (ReZero paper,
    arXiv 2003.04887, Table 3: deep Post-LN Transformers fail without warm-up)."""
    data = create_dataset("bytes", context=32, max_bytes=300_000, max_eval_windows=128)
    counts = torch.bincount(data.train_data.long(), minlength=256).double() + 1
    test_bytes = torch.cat([xb.flatten() for xb, _ in data.test_batches(512)])
    unigram_bpb = -(counts / counts.sum())[test_bytes].log2().mean().item()  # ≈ 4.9
    cfg = dl.TrainConfig(
        steps=60, batch_size=16, lr=5e-3, optimizer="adam", seed=0, divergence_factor=None
    )
    bpb = {}
    for scheme in ("rezero", "postnorm"):
        torch.manual_seed(0)
        model = lm(scheme, depth=64, d_model=32, context=32, dim_feedforward=64)
        bpb[scheme] = dl.train(model, data, cfg).summary["test_bpb"]
    assert bpb["rezero"] < unigram_bpb - 0.25, (bpb, unigram_bpb)
    assert bpb["rezero"] < bpb["postnorm"] - 0.25, (bpb, unigram_bpb)


@pytest.mark.parametrize("decoder", [False, True])
def test_rezero_layer_from_torch_carries_every_weight(decoder):
    """``ReZeroEncoderLayer.from_torch`` (and the decoder's): torch's packed in_proj split into
    q/k/v, out_proj and FF copied, so each sublayer computes what torch's does; the norms are
    named as dropped."""
    from depthlab.nn import ReZeroDecoderLayer, ReZeroEncoderLayer

    torch.manual_seed(0)
    kind = nn.TransformerDecoderLayer if decoder else nn.TransformerEncoderLayer
    theirs = kind(16, 4, 32, dropout=0.0, batch_first=True)
    ours = (ReZeroDecoderLayer if decoder else ReZeroEncoderLayer).from_torch(theirs, 1.0)
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    torch.testing.assert_close(ours.self_attn(x), theirs.self_attn(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(ours._ff(x), theirs.linear2(torch.relu(theirs.linear1(x))))
    if decoder:
        got = ours.multihead_attn(x, mem)
        torch.testing.assert_close(got, theirs.multihead_attn(x, mem, mem, need_weights=False)[0])
    assert ours.dropped and all(n.startswith("norm") for n in ours.dropped)
    assert float(ours.resweight.alpha.detach()) == 1.0 and ours.batch_first
