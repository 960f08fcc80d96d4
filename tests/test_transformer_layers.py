"""Attention and the drop-in ReZero layers inside torch's Transformer containers."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthlab.models import TransformerBlock
from depthlab.models.common import BlockStack
from depthlab.nn import MultiHeadAttention, ReZeroDecoderLayer, ReZeroEncoderLayer
from depthlab.nn.transformer import causal_mask

D, H, FF, T, S, B = 16, 4, 32, 7, 5, 3


def torch_mha(ours: MultiHeadAttention, batch_first: bool) -> nn.MultiheadAttention:
    """``nn.MultiheadAttention`` holding the same weights as ``ours``."""
    ref = nn.MultiheadAttention(ours.embed_dim, ours.num_heads, batch_first=batch_first)
    with torch.no_grad():
        ref.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref


def randomize_alphas(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (ReZeroEncoderLayer, ReZeroDecoderLayer)):
                layer.resweight.alpha.fill_(0.5 + torch.rand((), generator=g).item())


def padding_mask() -> torch.Tensor:
    """(B, T) bool, True = padding at the end of the shorter sequences (left aligned)."""
    lengths = torch.tensor([T, T - 2, 3])
    return torch.arange(T)[None, :] >= lengths[:, None]


def test_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    for batch_first in (True, False):
        ours = MultiHeadAttention(D, H, batch_first=batch_first)
        ref = torch_mha(ours, batch_first)
        shape = (B, T, D) if batch_first else (T, B, D)
        x = torch.randn(shape)
        mem = torch.randn((B, S, D) if batch_first else (S, B, D))
        kpm, causal = padding_mask(), causal_mask(T)
        cases = [
            (ours(x), ref(x, x, x, need_weights=False)[0]),
            (ours(x, attn_mask=causal), ref(x, x, x, attn_mask=causal, need_weights=False)[0]),
            (ours(x, is_causal=True), ref(x, x, x, attn_mask=causal, need_weights=False)[0]),
            (
                ours(x, key_padding_mask=kpm, is_causal=True),
                ref(x, x, x, attn_mask=causal, key_padding_mask=kpm, need_weights=False)[0],
            ),
            (ours(x, mem), ref(x, mem, mem, need_weights=False)[0]),
            (
                ours(x, mem, key_padding_mask=kpm[:, :S]),
                ref(x, mem, mem, key_padding_mask=kpm[:, :S], need_weights=False)[0],
            ),
        ]
        for got, want in cases:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # unbatched (T, C) input and a float additive mask
    x = torch.randn(T, D)
    fmask = torch.randn(T, T)
    want = ref(x, x, x, attn_mask=fmask, need_weights=False)[0]
    torch.testing.assert_close(ours(x, attn_mask=fmask), want, rtol=1e-5, atol=1e-5)


def test_constructor_compatible_with_torch_layers():
    for ours, theirs in (
        (ReZeroEncoderLayer, nn.TransformerEncoderLayer),
        (ReZeroDecoderLayer, nn.TransformerDecoderLayer),
    ):
        mine = inspect.signature(ours.__init__).parameters
        for name, p in inspect.signature(theirs.__init__).parameters.items():
            assert name in mine, f"{ours.__name__} lacks {name}"
            if p.default is not inspect.Parameter.empty and name != "activation":
                assert mine[name].default == p.default, name
        fwd = inspect.signature(ours.forward).parameters
        for name in inspect.signature(theirs.forward).parameters:
            assert name in fwd, f"{ours.__name__}.forward lacks {name}"
    # positional use as in torch's docs, activation by name or callable
    layer = ReZeroEncoderLayer(D, H, FF, 0.0, "gelu", 1e-5, True)
    assert layer.activation is F.gelu and layer.self_attn.batch_first
    assert ReZeroDecoderLayer(D, H, activation=torch.tanh).activation is torch.tanh


def test_default_encoder_just_works():
    """nn.TransformerEncoder(ReZeroEncoderLayer(512, 8), num_layers=6): builds, runs, is the
    identity at init; torch's only complaint is its nested-tensor notice."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = nn.TransformerEncoder(ReZeroEncoderLayer(512, 8), num_layers=6)
    assert all("enable_nested_tensor" in str(w.message) for w in caught)
    x = torch.randn(10, 2, 512)  # (T, B, C): batch_first=False like torch's default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = enc(x, mask=nn.Transformer.generate_square_subsequent_mask(10), is_causal=True)
        assert torch.equal(out, x)
        enc(x).sum().backward()
        nn.TransformerEncoder(ReZeroEncoderLayer(32, 4), 2, enable_nested_tensor=False)
    grads = [layer.resweight.alpha.grad for layer in enc.layers]
    assert all(g is not None and g.abs() > 0 for g in grads)


def our_stack(enc: nn.TransformerEncoder) -> BlockStack:
    """Our causal rezero TransformerBlocks holding the encoder's weights."""
    blocks = []
    for layer in enc.layers:
        blk = TransformerBlock(D, H, FF, 0.0, "rezero", causal=True)
        with torch.no_grad():
            attn = blk.attn.branch[0]
            for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
                getattr(attn, name).load_state_dict(getattr(layer.self_attn, name).state_dict())
            blk.ff.branch[0].load_state_dict(layer.linear1.state_dict())
            blk.ff.branch[2].load_state_dict(layer.linear2.state_dict())
            blk.attn.gate.alpha.copy_(layer.resweight.alpha)
        assert blk.ff.gate.alpha is blk.attn.gate.alpha
        blocks.append(blk)
    return BlockStack(*blocks)


def reference_encoder(enc: nn.TransformerEncoder, x, mask, kpm, batch_first: bool):
    """ReZero encoder written with torch's nn.MultiheadAttention on the same weights."""
    for layer in enc.layers:
        mha, a = torch_mha(layer.self_attn, batch_first), layer.resweight.alpha
        x = x + a * mha(x, x, x, attn_mask=mask, key_padding_mask=kpm, need_weights=False)[0]
        x = x + a * layer.linear2(F.relu(layer.linear1(x)))
    return x


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_masks_equal_our_stack_and_torch_reference(batch_first):
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = ReZeroEncoderLayer(D, H, FF, dropout=0.0, batch_first=batch_first)
        enc = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
        randomize_alphas(enc)
        stack = our_stack(enc)
        xb = torch.randn(B, T, D, requires_grad=True)  # (B, T, C)
        x = xb if batch_first else xb.transpose(0, 1)
        fmask = nn.Transformer.generate_square_subsequent_mask(T)
        bmask, kpm = causal_mask(T), padding_mask()

        def bf(y: torch.Tensor) -> torch.Tensor:
            return y if batch_first else y.transpose(0, 1)

        want = stack(xb)
        for out in (
            enc(x, mask=fmask, is_causal=True),
            enc(x, is_causal=True),
            enc(x, mask=fmask),  # torch detects the causal mask
            enc(x, mask=bmask),
        ):
            torch.testing.assert_close(bf(out), want, rtol=1e-5, atol=1e-5)
        out = enc(x, mask=bmask, src_key_padding_mask=kpm, is_causal=True)
        ref = reference_encoder(enc, x, bmask, kpm, batch_first)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # causal attention with padding at the end: real positions never see the padding, the
        # padded positions do see fewer keys
        torch.testing.assert_close(bf(out)[2, :3], want[2, :3], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(bf(out)[2, 3:], want[2, 3:])
        out.pow(2).mean().backward()
    assert torch.isfinite(xb.grad).all() and xb.grad.abs().sum() > 0
    for layer in enc.layers:
        assert torch.isfinite(layer.resweight.alpha.grad) and layer.resweight.alpha.grad != 0


def reference_decoder(dec, x, mem, tgt_mask, tgt_kpm, mem_kpm, batch_first: bool):
    for layer in dec.layers:
        sa = torch_mha(layer.self_attn, batch_first)
        ca = torch_mha(layer.multihead_attn, batch_first)
        a = layer.resweight.alpha
        x = x + a * sa(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_kpm, need_weights=False)[0]
        x = x + a * ca(x, mem, mem, key_padding_mask=mem_kpm, need_weights=False)[0]
        x = x + a * layer.linear2(F.relu(layer.linear1(x)))
    return x


@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_masks_equal_torch_reference(batch_first):
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec = nn.TransformerDecoder(
            ReZeroDecoderLayer(D, H, FF, dropout=0.0, batch_first=batch_first), num_layers=4
        )
        randomize_alphas(dec)
        x = torch.randn((B, T, D) if batch_first else (T, B, D), requires_grad=True)
        mem = torch.randn((B, S, D) if batch_first else (S, B, D), requires_grad=True)
        bmask, tgt_kpm = causal_mask(T), padding_mask()
        mem_kpm = torch.tensor([[False] * S, [False] * (S - 1) + [True], [False] * 2 + [True] * 3])
        out = dec(
            x,
            mem,
            tgt_mask=bmask,
            tgt_key_padding_mask=tgt_kpm,
            memory_key_padding_mask=mem_kpm,
            tgt_is_causal=True,
        )
        ref = reference_decoder(dec, x, mem, bmask, tgt_kpm, mem_kpm, batch_first)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out_causal_flag = dec(
            x,
            mem,
            tgt_key_padding_mask=tgt_kpm,
            memory_key_padding_mask=mem_kpm,
            tgt_is_causal=True,
        )
        torch.testing.assert_close(out_causal_flag, ref, rtol=1e-5, atol=1e-5)
        out.sum().backward()
    assert torch.isfinite(mem.grad).all() and mem.grad.abs().sum() > 0
    assert all(layer.resweight.alpha.grad != 0 for layer in dec.layers)


def test_decoder_without_cross_attention_equals_our_stack():
    """With the cross-attention output projections zeroed a decoder is our causal rezero stack."""
    torch.manual_seed(3)
    enc = nn.TransformerEncoder(
        ReZeroEncoderLayer(D, H, FF, 0.0, batch_first=True), 3, enable_nested_tensor=False
    )
    randomize_alphas(enc)
    dec = nn.TransformerDecoder(ReZeroDecoderLayer(D, H, FF, 0.0, batch_first=True), 3)
    with torch.no_grad():
        for e, d in zip(enc.layers, dec.layers):
            d.load_state_dict(e.state_dict(), strict=False)
            d.multihead_attn.out_proj.weight.zero_()
            d.multihead_attn.out_proj.bias.zero_()
    x, mem = torch.randn(B, T, D), torch.randn(B, S, D)
    want = our_stack(enc)(x)
    torch.testing.assert_close(dec(x, mem, tgt_is_causal=True), want, rtol=1e-5, atol=1e-5)


def test_rezero_layers_identity_at_init_and_dropout_in_train_mode():
    x = torch.randn(T, B, D)
    layer = ReZeroEncoderLayer(D, H, FF)  # dropout 0.1, α = 0
    assert torch.equal(layer(x), x)
    dec = ReZeroDecoderLayer(D, H, FF)
    assert torch.equal(dec(x, torch.randn(S, B, D)), x)
    with torch.no_grad():
        layer.resweight.alpha.fill_(1.0)
    layer.train()
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # dropout active
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


def test_hooks_on_attention_projections_run():
    """A forward hook on q_proj fires (the fused q/k/v product falls back to module calls), and
    a pruning pre-hook on v_proj changes the output as it would on a plain Linear."""
    import torch.nn.utils.prune

    import depthlab as dl

    torch.manual_seed(0)
    model = dl.create_model(
        "transformer-lm", depth=2, scheme="prenorm", d_model=16, nhead=2, context=8, vocab_size=32
    )
    tokens = torch.randint(0, 32, (2, 8))
    ref = model(tokens)
    seen = []
    attn = model.blocks[0].branch[1]
    handle = attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = model(tokens)
    handle.remove()
    assert seen == [torch.Size([2, 8, 16])]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # the same function
    torch.nn.utils.prune.l1_unstructured(attn.v_proj, "weight", amount=0.5)
    pruned = model(tokens)
    assert not torch.allclose(pruned, ref)
    torch.nn.utils.prune.remove(attn.v_proj, "weight")
    torch.testing.assert_close(model(tokens), pruned)  # the pruned weight, now plain


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(7, 7), (7, 5), (5, 9)])
def test_short_attention_equals_sdpa_with_gradients(causal, t, s):
    """The short-sequence path (two batched GEMMs) is torch's scaled_dot_product_attention —
    values and gradients in float64, causal top-left aligned also when T ≠ S."""
    from depthlab.nn.transformer import short_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, t, 4, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, s, 4, dtype=torch.float64, generator=g, requires_grad=True)
            for _ in range(2))  # fmt: skip
    w = torch.randn(2, 3, t, 4, dtype=torch.float64, generator=g)
    ours = short_attention(q, k, v, causal)
    got = torch.autograd.grad((ours * w).sum(), (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_attention_takes_the_short_path_up_to_short_keys(monkeypatch):
    """Self-attention without a mask or dropout runs :func:`short_attention` up to
    ``SHORT_KEYS`` keys on a CPU and torch's kernel beyond; a padding mask always takes torch's."""
    import depthlab.nn.transformer as tr

    calls = []
    real = tr.short_attention
    monkeypatch.setattr(tr, "short_attention", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    attn = MultiHeadAttention(D, H, batch_first=True, causal=True)
    for length in (tr.SHORT_KEYS, tr.SHORT_KEYS + 1):
        attn(torch.randn(2, length, D))
    attn(torch.randn(B, T, D), key_padding_mask=padding_mask())
    assert calls == [tr.SHORT_KEYS]
