"""DeepNorm (Wang et al. 2022, arXiv 2203.00555): the encoder–decoder α and β, both init modes,
and the encoder–decoder model that carries them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.nn.transformer import MemoryAttention


def _seq2seq(scheme="deepnorm", n=3, m=2, d=64, **options):
    return dl.TransformerSeq2Seq(
        n, m, scheme=scheme, d_model=d, nhead=4, context=16, vocab_size=32,
        scheme_options=options or None,
    )  # fmt: skip


@pytest.mark.parametrize(("n", "m"), [(1, 1), (6, 6), (12, 3), (100, 100)])
def test_encoder_decoder_constants_are_the_papers(n, m):
    c = dl.get_scheme("deepnorm").encoder_decoder(n, m)
    assert c["encoder_alpha"] == pytest.approx(0.81 * (n**4 * m) ** 0.0625, rel=1e-12)
    assert c["encoder_beta"] == pytest.approx(0.87 * (n**4 * m) ** -0.0625, rel=1e-12)
    assert c["decoder_alpha"] == pytest.approx((3 * m) ** 0.25, rel=1e-12)
    assert c["decoder_beta"] == pytest.approx((12 * m) ** -0.25, rel=1e-12)
    if n == m == 1:  # by hand
        assert (c["encoder_alpha"], c["encoder_beta"]) == pytest.approx((0.81, 0.87))
        assert c["decoder_alpha"] == pytest.approx(1.31607, abs=1e-5)
        assert c["decoder_beta"] == pytest.approx(0.537285, abs=1e-6)


def test_seq2seq_blocks_get_their_stacks_alpha_and_post_layernorm():
    net = _seq2seq(n=3, m=2)
    c = dl.get_scheme("deepnorm").encoder_decoder(3, 2)
    enc, dec = dl.residual_blocks(net.encoder), dl.residual_blocks(net.decoder)
    assert len(enc) == 2 * 3 and len(dec) == 3 * 2  # (attn, ff) and (attn, cross, ff) per layer
    assert all(b.stack.role == "encoder" and b.skip_mult == c["encoder_alpha"] for b in enc)
    assert all(b.stack.role == "decoder" and b.skip_mult == c["decoder_alpha"] for b in dec)
    assert all(isinstance(b.post, nn.LayerNorm) for b in enc + dec)
    # the encoder-only rule elsewhere: α = (2N)^(1/4) with L = 2N blocks
    lm = dl.create_model("transformer-lm", depth=3, scheme="deepnorm", d_model=16, nhead=2)
    assert all(b.skip_mult == pytest.approx(6**0.25) for b in dl.residual_blocks(lm))


def _beta_layers(block):
    """v_proj and out_proj of an attention sublayer (its ``value_layers``), else the linears."""
    attn = [m for m in block.branch if isinstance(m, dl.nn.MultiHeadAttention)]
    if attn:
        return attn[0].value_layers()
    return [m for m in block.branch if isinstance(m, nn.Linear)]


def test_xavier_normal_init_uses_each_stacks_beta_on_v_out_and_ff_only():
    torch.manual_seed(0)
    net = _seq2seq(n=3, m=2, d=64)
    c = dl.get_scheme("deepnorm").encoder_decoder(3, 2)
    for role, stack in (("encoder", net.encoder), ("decoder", net.decoder)):
        beta = c[f"{role}_beta"]
        normed, qk = [], []
        for blk in dl.residual_blocks(stack):
            for layer in _beta_layers(blk):
                fan_in, fan_out = layer.weight.shape[1], layer.weight.shape[0]
                normed.append(layer.weight.flatten() / (beta * math.sqrt(2 / (fan_in + fan_out))))
                assert layer.bias is None or not layer.bias.any()
            for mod in blk.branch:
                if isinstance(mod, dl.nn.MultiHeadAttention):
                    qk += [mod.q_proj.weight.flatten(), mod.k_proj.weight.flatten()]
        z = torch.cat(normed)
        assert z.numel() > 50_000 and abs(z.std().item() - 1) < 0.02
        # queries and keys keep the LeCun-normal default, std 1/√d
        assert abs(torch.cat(qk).std().item() * math.sqrt(64) - 1) < 0.03


def test_scale_default_init_is_pytorchs_default_times_beta_weights_and_biases():
    torch.manual_seed(0)
    net = _seq2seq(n=2, m=2, d=64, init="scale_default")
    c = dl.get_scheme("deepnorm").encoder_decoder(2, 2)
    for role, stack in (("encoder", net.encoder), ("decoder", net.decoder)):
        beta = c[f"{role}_beta"]
        for blk in dl.residual_blocks(stack):
            for layer in _beta_layers(blk):
                bound = beta / math.sqrt(layer.weight.shape[1])  # U(±1/√fan_in) × β
                w = layer.weight
                assert w.abs().max().item() <= bound * (1 + 1e-6)
                assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
                assert layer.bias is not None and layer.bias.any()  # biases scaled, not zeroed
                assert layer.bias.abs().max().item() <= bound * (1 + 1e-6)


def test_deepnorm_init_option_is_validated():
    with pytest.raises(dl.DepthlabError, match="init in scheme 'deepnorm'"):
        dl.get_scheme("deepnorm", init="xavier_uniform")


@pytest.mark.parametrize("scheme", dl.list_schemes())
def test_seq2seq_runs_under_every_scheme(scheme):
    net = _seq2seq(scheme, n=2, m=2, d=16)
    src, tgt = torch.randint(0, 32, (2, 9)), torch.randint(0, 32, (2, 7))
    out = net(src, tgt)
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    (out * torch.randn(out.shape)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # the cross-attention memory is not kept after the call
    assert all(m.memory is None for m in net.modules() if isinstance(m, MemoryAttention))


def test_seq2seq_decoder_is_causal_and_reads_the_source():
    torch.manual_seed(0)
    net = _seq2seq("prenorm", n=1, m=1, d=16).eval()
    src, tgt = torch.randint(0, 32, (1, 6)), torch.randint(0, 32, (1, 5))
    out = net(src, tgt)
    later = tgt.clone()
    later[0, 4] = (later[0, 4] + 1) % 32
    assert torch.equal(net(src, later)[0, :4], out[0, :4])  # position 4 does not reach 0..3
    other = src.clone()
    other[0, 0] = (other[0, 0] + 1) % 32
    assert not torch.allclose(net(other, tgt), out)  # every target position sees the source


def test_seq2seq_deepnorm_learns_to_copy():
    """120 Adam steps on copying 6-token sequences through the cross-attention: the loss falls
    to a tenth of its start (chance level, log 32 ≈ 3.5, is the most an unused source allows)."""
    torch.manual_seed(0)
    net = _seq2seq("deepnorm", n=2, m=2, d=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(120):
        src = torch.randint(1, 32, (32, 6))
        tgt_in = torch.cat([torch.zeros(32, 1, dtype=torch.long), src[:, :-1]], 1)
        loss = nn.functional.cross_entropy(net(src, tgt_in).reshape(-1, 32), src.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
