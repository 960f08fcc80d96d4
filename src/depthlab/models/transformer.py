"""Deep Transformers under every scheme: the block, and a byte-level language model.

Dimension legend for the shape comments:

    B  batch     T  sequence length (≤ context)     C  model width d_model     V  vocabulary (256)

A Transformer layer is two residual sublayers, each a :class:`~depthlab.nn.Residual` whose
branch the scheme dresses (norm, scalar bias, gate, scale, post-sum norm):

    attention     x ← post(s·x + g·[scale ∘ Attn ∘ bias ∘ norm](x))
    feed-forward  x ← post(s·x + g·[scale ∘ W₂ ∘ bias ∘ σ ∘ W₁ ∘ bias ∘ norm](x))

which gives Post-LN (Vaswani et al. 2017, arXiv 1706.03762), Pre-LN (Xiong et al. 2020,
arXiv 2002.04745), ReZero (Bachlechner et al. 2020, arXiv 2003.04887; one α per layer shared by
both sublayers unless ``per_sublayer=True``), SkipInit (De & Smith 2020, arXiv 2002.10444),
Fixup (Zhang et al. 2019, arXiv 1901.09321; no LayerNorm, a scalar shift before and a scalar
multiplier after each sublayer; with L residual sublayers the attention branch counts m = 4
weight layers — query, key, value He-initialised × L^(-1/(2·4-2)) = L^(-1/6), output projection
zero — and the feed-forward branch m = 2 — W₁ × L^(-1/2), W₂ zero) and DeepNorm (Wang et al.
2022, arXiv 2203.00555; ``LN(α·x + f(x))``, α = (2N)^(1/4), Xavier β = (8N)^(-1/4) on W₁, W₂,
v_proj, out_proj; in :class:`TransformerSeq2Seq` the encoder–decoder α and β of each stack).
Every other registered scheme builds and runs through the same hooks.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.models.common import BlockStack, check_positive, default_init, materialize, seq
from depthlab.nn.transformer import MemoryAttention, MultiHeadAttention, check_heads
from depthlab.registry import DepthlabError, unknown_choice
from depthlab.schemes import BlockInfo, Scheme, Stack, get_scheme

#: feed-forward activations and their He gains (Fixup's W₁ init)
FF_ACTIVATIONS = {"relu": (nn.ReLU, math.sqrt(2.0)), "gelu": (nn.GELU, math.sqrt(2.0))}
#: the ReZero authors' embedding init (PyTorch's word_language_model example): U(-0.1, 0.1)
EMBED_INIT_RANGE = 0.1


class TransformerBlock(BlockStack):
    """One Transformer layer, batch-first ``(B, T, C) -> (B, T, C)``: an attention
    :class:`~depthlab.nn.Residual` (``self.attn``) then a feed-forward one (``self.ff``).

    ``num_blocks`` is the number of residual sublayers in the whole stack (2 × layers), the L
    that scheme rules depend on (DeepNorm's α, SkipInit's ``1/sqrt(d)``). A standalone block is
    initialised as a stack of one layer (L = 2); :class:`TransformerLM` re-initialises its whole
    stack with the true L.

    Weight layers are LeCun-normal (``std = 1/√fan_in``) with zero biases before the scheme's
    rules apply. Each sublayer tells the scheme its place (:class:`~depthlab.schemes.BlockInfo`,
    with Fixup's He gain: 1 for the attention projections, √2 for the ReLU/GELU feed-forward);
    the attention's ``value_layers()`` are v_proj and out_proj (DeepNorm leaves queries and keys
    alone). Every weight layer comes from the scheme's factory (``scheme.linear``).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        scheme: str | Scheme = "prenorm",
        causal: bool = False,
        *,
        activation: str = "relu",
        num_blocks: int = 2,
        scheme_options: dict | None = None,
        cross_attention: bool = False,
        stack: Stack | None = None,
        first_index: int | None = None,
    ) -> None:
        check_heads(d_model, nhead)
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        check_positive(dim_feedforward=ff, num_blocks=num_blocks)
        if not 0.0 <= dropout < 1.0:
            raise DepthlabError(f"dropout must be in [0, 1), got {dropout!r}")
        if activation not in FF_ACTIVATIONS:
            raise unknown_choice("activation", activation, sorted(FF_ACTIVATIONS))
        s = get_scheme(scheme, **(scheme_options or {}))
        act, act_gain = FF_ACTIVATIONS[activation]
        tokens = "tokens"

        def drop() -> nn.Module | None:
            return nn.Dropout(dropout) if dropout > 0 else None

        def info(k: int, gain: float) -> BlockInfo:
            index = None if first_index is None else first_index + k
            return BlockInfo(index=index, num_blocks=num_blocks, stack=stack, gain=gain)

        attn = MultiHeadAttention(
            d_model, nhead, dropout, bias=s.layer_bias, causal=causal, linear=s.linear
        )
        attn_res = s.residual(
            seq(s.norm(d_model, tokens), s.bias(), attn, drop(), s.scale()),
            d_model,
            tokens,
            num_blocks,
            info=info(0, 1.0),
        )
        cross_res = None
        if cross_attention:
            cross = MemoryAttention(d_model, nhead, dropout, bias=s.layer_bias, linear=s.linear)
            cross_res = s.residual(
                seq(s.norm(d_model, tokens), s.bias(), cross, drop(), s.scale()),
                d_model,
                tokens,
                num_blocks,
                info=info(1, 1.0),
            )
        ff_res = s.residual(
            seq(
                s.norm(d_model, tokens),
                s.bias(),
                s.linear(d_model, ff),
                act(),
                drop(),
                s.bias(),
                s.linear(ff, d_model, act=activation),
                drop(),
                s.scale(),
            ),
            d_model,
            tokens,
            num_blocks,
            info=info(2 if cross_attention else 1, act_gain),
        )
        others = [r for r in (cross_res, ff_res) if r is not None]
        if s.shares_layer_gate() and attn_res.gate is not None:
            # one α per layer: the gates hold the same Parameter (one Gate module per sublayer,
            # so hooks on each sublayer's gate still see only that sublayer)
            for res in (r for r in others if r.gate is not None):
                for name, p in attn_res.gate.named_parameters(recurse=False):
                    setattr(res.gate, name, p)
        subs = [("attn", attn_res)] + ([("cross", cross_res)] if cross_res is not None else [])
        super().__init__(OrderedDict([*subs, ("ff", ff_res)]))
        self.scheme = s
        self.init_gain = 1.0
        self.d_model, self.nhead, self.causal = d_model, nhead, causal
        self.reset_parameters()

    def reset_parameters(self) -> None:
        default_init(self, 1.0)
        self.scheme.initialize(self)

    def example_input(self, batch_size: int = 4) -> torch.Tensor:
        """A fixed batch of standard-normal sequences ``(batch_size, 16, d_model)`` (its own
        generator, seed 0): what a scheme profiles the block on at init (Admin)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, 16, self.d_model, generator=g)
        return x.to(next(self.parameters()).device)


class _TokenModel(nn.Module):
    """What the token models share: token plus position embeddings, and their initialisation
    (embeddings ``U(-0.1, 0.1)``, LeCun-normal weight layers, then the scheme's rules)."""

    label: str = "a token model"
    scheme: Scheme
    context: int
    init_gain: float

    def reset_parameters(self) -> None:
        default_init(self, self.init_gain)
        with torch.no_grad():
            for emb in (self.token_embedding, self.pos_embedding):
                emb.weight.uniform_(-EMBED_INIT_RANGE, EMBED_INIT_RANGE)
        self.scheme.initialize(self)

    def example_tokens(self, batch_size: int = 4) -> torch.Tensor:
        """A fixed batch of random token ids ``(batch_size, min(context, 32))`` (its own
        generator, seed 0)."""
        g = torch.Generator().manual_seed(0)
        vocab = self.token_embedding.num_embeddings
        x = torch.randint(0, vocab, (batch_size, min(self.context, 32)), generator=g)
        return x.to(self.token_embedding.weight.device)

    def example_input(self, batch_size: int = 4) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """What a scheme profiles the model on at init (Admin): :meth:`example_tokens`
        (an encoder–decoder: the same batch as source and target)."""
        x = self.example_tokens(batch_size)
        return (x, x) if hasattr(self, "encoder") else x

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: ``(B, T)`` int -> ``(B, T, C)``."""
        _check_tokens(tokens, self.context, self.label)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens.long()) + self.pos_embedding(pos)  # (B, T, C)
        return self.dropout(x)


class TransformerLM(_TokenModel):
    """Byte-level (or any small-vocabulary) causal Transformer language model:

    ``tokens (B, T) -> embed = E[tokens] + P[:T] -> depth × TransformerBlock -> final norm
    -> logits (B, T, V)``,

    logits ``h Eᵀ`` with ``tied=True`` or ``h Wᵀ`` with a separate head ``classifier``
    (untied, the default). ``model.blocks`` is the flat stack of the 2·depth residual sublayers
    (attention, feed-forward, attention, …), a map ``(B, T, C) -> (B, T, C)`` on the embedded
    sequence ``model.embed(tokens)``; ``model.final_norm`` is the scheme's norm before the head.

    Initialisation: token and position embeddings ``U(-0.1, 0.1)`` for every scheme (the small
    uniform init the ReZero authors use — large embeddings would swamp identity-initialised
    blocks of unnormalized schemes, and normalized ones are insensitive to it), LeCun-normal
    weight layers, then the scheme's model-level rules. Fixup zeroes the untied head; with
    ``tied=True`` there is no separate head to zero (zeroing it would zero the embedding).
    """

    label = "transformer-lm"

    def __init__(
        self,
        depth: int = 6,
        scheme: str | Scheme = "prenorm",
        d_model: int = 128,
        nhead: int = 4,
        context: int = 128,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        tied: bool = False,
        activation: str = "relu",
        vocab_size: int = 256,
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(depth=depth, context=context, vocab_size=vocab_size)
        check_heads(d_model, nhead)
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        self.config = dict(
            depth=depth,
            d_model=d_model,
            nhead=nhead,
            context=context,
            dim_feedforward=ff,
            dropout=dropout,
            tied=tied,
            activation=activation,
            vocab_size=vocab_size,
        )  # constructor arguments but the scheme
        self.scheme = s = get_scheme(scheme, **(scheme_options or {}))
        self.depth, self.d_model, self.context, self.tied = depth, d_model, context, bool(tied)
        self.init_gain = 1.0
        num_blocks = 2 * depth
        with torch.device("meta"):
            self.token_embedding = nn.Embedding(vocab_size, d_model)
            self.pos_embedding = nn.Embedding(context, d_model)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            layers = [
                TransformerBlock(
                    d_model,
                    nhead,
                    ff,
                    dropout,
                    s,
                    causal=True,
                    activation=activation,
                    num_blocks=num_blocks,
                    first_index=2 * i,
                )
                for i in range(depth)
            ]
            self.blocks = BlockStack(*[sub for layer in layers for sub in layer])
            self.final_norm = seq(s.final_norm(d_model, "tokens"))
            self.classifier = None if tied else nn.Linear(d_model, vocab_size, bias=False)
        materialize(self)
        self.reset_parameters()

    # -- growing (depthlab.models.grow): one unit is a layer (attention + feed-forward) -----
    def grow_units(self) -> list[list[nn.Module]]:
        blocks = list(self.blocks)
        return [blocks[i : i + 2] for i in range(0, len(blocks), 2)]

    def grow_features(self, index: int, units: list[list[nn.Module]]) -> int:
        return self.d_model

    def grow_block(self, features: int, num_blocks: int) -> list[nn.Module]:
        c = self.config
        layer = TransformerBlock(
            c["d_model"], c["nhead"], c["dim_feedforward"], c["dropout"], self.scheme,
            causal=True, activation=c["activation"], num_blocks=num_blocks,
        )  # fmt: skip
        return list(layer)

    def grow_commit(self, n: int) -> None:
        self.depth += n

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The head on the residual stream: final norm, then ``(B, T, C) -> (B, T, V)``."""
        h = self.final_norm(h)
        if self.classifier is None:
            return F.linear(h, self.token_embedding.weight)
        return self.classifier(h)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(self.blocks(self.embed(tokens)))  # (B, T, V)


class TransformerSeq2Seq(_TokenModel):
    """Encoder–decoder Transformer (Vaswani et al. 2017, arXiv 1706.03762) under every scheme:

    ``src (B, S), tgt (B, T) -> logits (B, T, V)``, with ``N = encoder_layers`` layers of
    (self-attention, feed-forward) sublayers and a final norm on the encoder side, and
    ``M = decoder_layers`` layers of (causal self-attention, cross-attention to the encoder's
    output, feed-forward) sublayers, a final norm and an untied head on the decoder side. Source
    and target share the token and position embeddings (``U(-0.1, 0.1)``, as
    :class:`TransformerLM`).

    Every residual block carries a :class:`~depthlab.schemes.Stack` (``block.stack``: its role
    and N, M), which is what DeepNorm's encoder–decoder rules read (Wang et al. 2022,
    arXiv 2203.00555: encoder α = 0.81(N⁴M)^(1/16), β = 0.87(N⁴M)^(-1/16); decoder
    α = (3M)^(1/4), β = (12M)^(-1/4)). Rules that count blocks (Fixup's L, SkipInit's
    ``1/sqrt(d)``) see all ``2N + 3M`` of them. ``model.encoder`` and ``model.decoder`` are the
    flat stacks of residual sublayers.
    """

    label = "transformer-seq2seq"

    def __init__(
        self,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        scheme: str | Scheme = "postnorm",
        d_model: int = 128,
        nhead: int = 4,
        context: int = 128,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        activation: str = "relu",
        vocab_size: int = 256,
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            context=context,
            vocab_size=vocab_size,
        )
        check_heads(d_model, nhead)
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        self.config = dict(
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            d_model=d_model,
            nhead=nhead,
            context=context,
            dim_feedforward=ff,
            dropout=dropout,
            activation=activation,
            vocab_size=vocab_size,
        )
        self.scheme = s = get_scheme(scheme, **(scheme_options or {}))
        self.d_model, self.context = d_model, context
        self.init_gain = 1.0
        n, m = encoder_layers, decoder_layers
        num_blocks = 2 * n + 3 * m

        def layers(role: str, count: int) -> BlockStack:
            stack = Stack(role, n, m)
            built = [
                TransformerBlock(
                    d_model,
                    nhead,
                    ff,
                    dropout,
                    s,
                    causal=role == "decoder",
                    activation=activation,
                    num_blocks=num_blocks,
                    cross_attention=role == "decoder",
                    stack=stack,
                    first_index=(2 * n + 3 * i) if role == "decoder" else 2 * i,
                )
                for i in range(count)
            ]
            return BlockStack(*[sub for layer in built for sub in layer])

        with torch.device("meta"):
            self.token_embedding = nn.Embedding(vocab_size, d_model)
            self.pos_embedding = nn.Embedding(context, d_model)
            self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.encoder = layers("encoder", n)
            self.encoder_norm = seq(s.final_norm(d_model, "tokens"))
            self.decoder = layers("decoder", m)
            self.final_norm = seq(s.final_norm(d_model, "tokens"))
            self.classifier = nn.Linear(d_model, vocab_size, bias=False)
        materialize(self)
        self.reset_parameters()

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """The encoder's output, ``(B, S)`` tokens -> ``(B, S, C)``."""
        return self.encoder_norm(self.encoder(self.embed(src)))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self.encode(src)  # (B, S, C)
        cross = [mod for mod in self.decoder.modules() if isinstance(mod, MemoryAttention)]
        for mod in cross:
            mod.memory = memory
        try:
            h = self.decoder(self.embed(tgt))  # (B, T, C)
        finally:
            for mod in cross:
                mod.memory = None
        return self.classifier(self.final_norm(h))  # (B, T, V)


def _check_tokens(tokens: torch.Tensor, context: int, model: str) -> None:
    if tokens.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise DepthlabError(
            f"{model} takes integer token ids of shape (B, T), got dtype {tokens.dtype}"
        )
    if tokens.dim() != 2:
        raise DepthlabError(
            f"{model} takes token ids of shape (B, T), got shape {tuple(tokens.shape)}"
        )
    if tokens.shape[1] > context:
        raise DepthlabError(
            f"sequence length {tokens.shape[1]} exceeds the model's context {context}; "
            f"build the model with context >= {tokens.shape[1]} or feed shorter windows"
        )
