"""Transformer building blocks: multi-head attention on ``scaled_dot_product_attention`` and
drop-in ReZero layers for ``torch.nn.TransformerEncoder`` / ``TransformerDecoder``.

Dimension legend for the shape comments:

    B  batch                 T  query (target) length     S  key/value (source) length
    C  model width d_model   h  heads                     hd head width C/h

ReZero (Bachlechner et al. 2020, "ReZero is All You Need: Fast Convergence at Large Depth",
arXiv 2003.04887) replaces LayerNorm by one learnable scalar per layer, initialised to 0:
``x ← x + α·Attn(x)``, ``x ← x + α·FF(x)`` with the same α for both sublayers (the official code's
``resweight``), so every layer is the identity at initialisation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from depthlab.nn.fusion.switch import blocked, hooked
from depthlab.nn.scalars import Gate
from depthlab.registry import DepthlabError

#: activations accepted by name, as in ``torch.nn.TransformerEncoderLayer``
ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def check_heads(d_model: int, nhead: int) -> None:
    """Refuse a width that the heads cannot split evenly."""
    for key, value in (("d_model", d_model), ("nhead", nhead)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DepthlabError(f"{key} must be a positive integer, got {value!r}")
    if d_model % nhead != 0:
        divisors = [n for n in range(1, min(d_model, 16) + 1) if d_model % n == 0]
        raise DepthlabError(
            f"d_model={d_model} is not divisible by nhead={nhead}; each head gets d_model/nhead "
            f"features, so choose nhead among {divisors} or change d_model"
        )


def activation_fn(activation: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    if callable(activation):
        return activation
    if activation not in ACTIVATION_FNS:
        raise DepthlabError(
            f"unknown activation {activation!r}; choose one of: {', '.join(ACTIVATION_FNS)} "
            f"(or pass a callable)"
        )
    return ACTIVATION_FNS[activation]


def causal_mask(
    size: int, source_size: int | None = None, device: torch.device | None = None
) -> Tensor:
    """Boolean (T, S) mask in torch's convention: True above the diagonal = *not* attended
    (query t may only attend keys s ≤ t); S = T unless ``source_size`` is given."""
    s = size if source_size is None else source_size
    return torch.ones(size, s, dtype=torch.bool, device=device).triu(1)


#: at most this many keys, attention on a CPU runs as two batched matrix products
#: (:func:`short_attention`); longer, torch's fused kernel
#: (``benchmarks/bench_transformer.py --attention`` measures both)
SHORT_KEYS = 32


def short_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """``softmax(Q Kᵀ/√hd + M) V`` for (B, h, T, hd) queries and (B, h, S, hd) keys/values
    without a mask beyond the causal one (``M`` = −∞ above the diagonal, top-left aligned as in
    ``F.scaled_dot_product_attention(is_causal=True)``) and without dropout, as two batched
    GEMMs and a softmax: the same function as torch's fused CPU kernel, which on a few dozen
    keys costs more in its tiling than the products themselves (forward and backward)."""
    B, h, T, hd = q.shape
    S = k.shape[2]
    qs, ks = q.reshape(B * h, T, hd), k.reshape(B * h, S, hd).transpose(1, 2)
    if causal:
        blocked = torch.full((T, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
        scores = torch.baddbmm(blocked, qs, ks, alpha=hd**-0.5)  # (B·h, T, S)
    else:
        scores = torch.bmm(qs, ks).mul_(hd**-0.5)
    return torch.bmm(torch.softmax(scores, -1), v.reshape(B * h, S, hd)).view(B, h, T, hd)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch's mask conventions -> an additive float mask: bool True = blocked -> -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    if not torch.is_floating_point(mask):
        raise DepthlabError(f"attention masks must be bool or float tensors, got {mask.dtype}")
    return mask.to(dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al. 2017, arXiv 1706.03762):

    ``Attn(x, m) = concat_i softmax(Q_i K_iᵀ/√hd + M) V_i · W_o`` with ``Q = x W_q``,
    ``K = m W_k``, ``V = m W_v`` (m = x for self-attention) and M the additive mask.

    The four projections are separate ``nn.Linear`` layers (``q_proj, k_proj, v_proj,
    out_proj``) so that scheme rules can address them one by one (DeepNorm's β on ``v_proj`` and
    ``out_proj`` only; Fixup counts the attention branch as m = 4 weight layers); the forward pass
    still runs the query/key/value projection as one fused matrix product. ``causal=True`` makes
    every call causal. ``batch_first`` is as in ``torch.nn.MultiheadAttention`` (containers read
    it), and 2-d unbatched inputs ``(T, C)`` are accepted.

    Masks follow torch's conventions: ``attn_mask`` (T, S) or (B·h, T, S), bool (True = blocked)
    or float (added to the scores); ``key_padding_mask`` (B, S), bool (True = padding) or float.
    ``is_causal=True`` applies the causal mask and, as in torch, declares that ``attn_mask`` (if
    given) *is* the causal mask.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        bias: bool = True,
        causal: bool = False,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        linear: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        check_heads(d_model, nhead)
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = d_model, nhead, d_model // nhead
        self.dropout, self.causal, self.batch_first = float(dropout), bool(causal), batch_first
        if linear is None:
            self.q_proj = nn.Linear(d_model, d_model, **kw)
            self.k_proj = nn.Linear(d_model, d_model, **kw)
            self.v_proj = nn.Linear(d_model, d_model, **kw)
            self.out_proj = nn.Linear(d_model, d_model, **kw)
        else:  # a scheme's weight-layer factory: linear(in, out, bias=...)
            self.q_proj = linear(d_model, d_model, bias=bias)
            self.k_proj = linear(d_model, d_model, bias=bias)
            self.v_proj = linear(d_model, d_model, bias=bias)
            self.out_proj = linear(d_model, d_model, bias=bias)

    def value_layers(self) -> list[nn.Module]:
        """The projections on the value path (``v_proj``, ``out_proj``), which DeepNorm scales
        by β; queries and keys keep their init."""
        return [self.v_proj, self.out_proj]

    def _fused(self, layers: tuple[nn.Linear, ...], x: Tensor) -> Tensor:
        """The projections of ``x`` by ``layers``, concatenated on the last dim: one matrix
        product, or each layer called as a module when any has hooks (forward hooks,
        pruning and weight-norm pre-hooks, diagnostics) or is not a plain ``nn.Linear`` (e.g.
        weight-standardized), so that they run as usual."""
        if (
            blocked()
            or any(hooked(layer) for layer in layers)
            or any(type(layer) is not nn.Linear for layer in layers)
        ):
            return torch.cat([layer(x) for layer in layers], dim=-1)
        w = torch.cat([layer.weight for layer in layers])
        b = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        return F.linear(x, w, b)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        unbatched = x.dim() == 2
        if unbatched:  # (T, C) -> (1, T, C)
            x = x.unsqueeze(0)
            memory = None if memory is None else memory.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (T, B, C) -> (B, T, C)
            x = x.transpose(0, 1)
            memory = None if memory is None else memory.transpose(0, 1)
        B, T, C = x.shape
        h, hd = self.num_heads, self.head_dim
        if memory is None:
            S = T
            qkv = self._fused((self.q_proj, self.k_proj, self.v_proj), x)  # (B, T, 3C)
            q, k, v = qkv.view(B, T, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, hd)
        else:
            S = memory.shape[1]
            q = self.q_proj(x).view(B, T, h, hd).transpose(1, 2)  # (B, h, T, hd)
            kv = self._fused((self.k_proj, self.v_proj), memory)  # (B, S, 2C)
            k, v = kv.view(B, S, 2, h, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, S, hd)

        causal = is_causal or self.causal
        if causal:
            attn_mask = causal_mask(T, S, x.device) if key_padding_mask is not None else None
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.view(B, h, T, S) if mask.dim() == 3 else mask  # (T, S) broadcasts
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype).view(B, 1, 1, S)
            mask = pad if mask is None else mask + pad  # (B, h|1, T, S)
        dropout_p = self.dropout if self.training else 0.0
        if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(q):
            # inside torch.func transforms (Jacobian diagnostics): the fused CPU kernels have
            # neither a vmap rule nor a double backward, the composite "math" kernel has both
            with sdpa_kernel(SDPBackend.MATH):
                y = F.scaled_dot_product_attention(
                    q, k, v, mask, dropout_p, is_causal=causal and mask is None
                )
        elif mask is None and dropout_p == 0.0 and S <= SHORT_KEYS and q.device.type == "cpu":
            y = short_attention(q, k, v, causal)  # (B, h, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, mask, dropout_p, is_causal=causal and mask is None
            )  # (B, h, T, hd)
        y = self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
        if unbatched:
            return y.squeeze(0)
        return y if self.batch_first else y.transpose(0, 1)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.embed_dim}, nhead={self.num_heads}, dropout={self.dropout:g}, "
            f"causal={self.causal}, batch_first={self.batch_first}"
        )


class MemoryAttention(MultiHeadAttention):
    """Cross-attention as a one-input module, for residual branches: ``forward(x)`` attends from
    ``x`` (B, T, C) to ``self.memory`` (B, S, C), which the model that owns it sets before each
    call (an encoder–decoder sets its encoder's output). Hooks, masks and shapes are
    :class:`MultiHeadAttention`'s."""

    memory: Tensor | None = None

    def forward(self, x: Tensor, memory: Tensor | None = None, **kwargs) -> Tensor:
        memory = self.memory if memory is None else memory
        if memory is None:
            raise DepthlabError(
                "MemoryAttention has no memory: set module.memory to the encoder output "
                "(B, S, C) before calling it, or pass memory="
            )
        return super().forward(x, memory, **kwargs)


class _ReZeroLayer(nn.Module):
    """Shared parts of the drop-in layers: torch's constructor signature, the feed-forward
    sublayer, the ReZero gate, cross-attention for decoders and one dropout per sublayer."""

    #: residual sublayers: 2 (self-attention, feed-forward) or 3 (+ cross-attention)
    sublayers: int = 2

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        activation: str | Callable[[Tensor], Tensor] = F.relu,
        layer_norm_eps: float = 1e-5,
        batch_first: bool = False,
        norm_first: bool = False,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        alpha_init: float = 0.0,
    ) -> None:
        super().__init__()
        check_heads(d_model, nhead)
        kw = {"device": device, "dtype": dtype}
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout, bias, False, batch_first, **kw)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=bias, **kw)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=bias, **kw)
        self.activation = activation_fn(activation)
        self.resweight = Gate(alpha_init)  # the one α of this layer (official code: resweight)
        self.batch_first = batch_first
        # accepted for constructor compatibility with torch's layers; ReZero has no LayerNorm
        self.norm_first, self.layer_norm_eps = norm_first, layer_norm_eps
        if self.sublayers == 3:  # torch's name for the decoder's cross-attention
            self.multihead_attn = MultiHeadAttention(
                d_model, nhead, dropout, bias, False, batch_first, **kw
            )
        for i in range(1, self.sublayers + 1):
            setattr(self, f"dropout{i}", nn.Dropout(dropout))

    def _ff(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    @classmethod
    def from_torch(cls, layer: nn.Module, alpha_init: float = 0.0):
        """A ReZero layer with the weights of a ``torch.nn.TransformerEncoderLayer`` (for
        :class:`ReZeroEncoderLayer`) or ``TransformerDecoderLayer`` (for
        :class:`ReZeroDecoderLayer`): attention (torch's packed ``in_proj_weight`` split into
        q/k/v), feed-forward and biases copied; ``activation``, ``dropout`` and ``batch_first``
        as the torch layer's. Its LayerNorms are not carried (ReZero has none): their names are
        in the returned layer's ``dropped`` list."""
        mha = layer.self_attn
        ff = layer.linear1
        new = cls(
            mha.embed_dim, mha.num_heads, ff.out_features, float(layer.dropout.p),
            layer.activation, batch_first=bool(mha.batch_first),
            bias=ff.bias is not None, device=ff.weight.device, dtype=ff.weight.dtype,
            alpha_init=alpha_init,
        )  # fmt: skip
        new.dropped = new.load_torch_weights(layer)
        return new

    def load_torch_weights(self, layer: nn.Module) -> list[str]:
        """Copy a torch Transformer layer's weights into this one (see :meth:`from_torch`);
        return the names of the parameters not carried (its norms). Shapes must match."""
        from depthlab.registry import DepthlabError

        pairs = [("self_attn", self.self_attn)]
        if self.sublayers == 3:
            pairs.append(("multihead_attn", self.multihead_attn))
        with torch.no_grad():
            for name, ours in pairs:
                theirs = getattr(layer, name, None)
                if theirs is None or getattr(theirs, "in_proj_weight", None) is None:
                    raise DepthlabError(
                        f"the torch layer has no packed {name}.in_proj_weight to copy (separate "
                        "q/k/v dims are not supported)"
                    )
                if theirs.in_proj_weight.shape != (3 * ours.embed_dim, ours.embed_dim):
                    raise DepthlabError(
                        f"{name}: torch's in_proj_weight is {tuple(theirs.in_proj_weight.shape)}, "
                        f"this layer needs {(3 * ours.embed_dim, ours.embed_dim)}"
                    )
                projs = (ours.q_proj, ours.k_proj, ours.v_proj)
                for proj, w in zip(projs, theirs.in_proj_weight.chunk(3), strict=True):
                    proj.weight.copy_(w)
                if theirs.in_proj_bias is not None and ours.q_proj.bias is not None:
                    for proj, b in zip(projs, theirs.in_proj_bias.chunk(3), strict=True):
                        proj.bias.copy_(b)
                ours.out_proj.load_state_dict(theirs.out_proj.state_dict())
            self.linear1.load_state_dict(layer.linear1.state_dict())
            self.linear2.load_state_dict(layer.linear2.state_dict())
        return [n for n, _ in layer.named_parameters() if n.startswith("norm")]


class ReZeroEncoderLayer(_ReZeroLayer):
    """Drop-in ReZero replacement for ``torch.nn.TransformerEncoderLayer`` (same constructor and
    forward signature), without LayerNorm:

    ``x ← x + dropout(α·SelfAttn(x))``;  ``x ← x + dropout(α·FF(x))``, ``FF = W₂ σ(W₁ x)``,

    one learnable α per layer (init ``alpha_init`` = 0, so the layer is the identity at
    initialisation). Bachlechner et al. 2020, arXiv 2003.04887.

    ``nn.TransformerEncoder(ReZeroEncoderLayer(512, 8), num_layers=6)`` works as is; torch warns
    that its nested-tensor fast path only takes its own layer class (it warns the same for its own
    ``batch_first=False`` layers) — pass ``enable_nested_tensor=False`` to silence it.
    ``layer_norm_eps`` and ``norm_first`` are accepted and have no effect (there is no norm).
    """

    def forward(
        self,
        src: Tensor,
        src_mask: Tensor | None = None,
        src_key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
    ) -> Tensor:
        x = src  # (B, T, C) if batch_first else (T, B, C)
        a = self.self_attn(
            x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask, is_causal=is_causal
        )
        x = x + self.dropout1(self.resweight(a))
        return x + self.dropout2(self.resweight(self._ff(x)))


class ReZeroDecoderLayer(_ReZeroLayer):
    """Drop-in ReZero replacement for ``torch.nn.TransformerDecoderLayer``, without LayerNorm:

    ``x ← x + dropout(α·SelfAttn(x))``; ``x ← x + dropout(α·CrossAttn(x, memory))``;
    ``x ← x + dropout(α·FF(x))``, with one learnable α per layer shared by the three sublayers
    (init ``alpha_init`` = 0). Bachlechner et al. 2020, arXiv 2003.04887.

    Forward-compatible with what ``torch.nn.TransformerDecoder`` passes (masks, key-padding
    masks, ``tgt_is_causal``, ``memory_is_causal``).
    """

    sublayers = 3

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        tgt_mask: Tensor | None = None,
        memory_mask: Tensor | None = None,
        tgt_key_padding_mask: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        tgt_is_causal: bool = False,
        memory_is_causal: bool = False,
    ) -> Tensor:
        x = tgt  # (B, T, C) if batch_first else (T, B, C); memory (B, S, C) / (S, B, C)
        a = self.self_attn(
            x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, is_causal=tgt_is_causal
        )
        x = x + self.dropout1(self.resweight(a))
        a = self.multihead_attn(
            x,
            memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
            is_causal=memory_is_causal,
        )
        x = x + self.dropout2(self.resweight(a))
        return x + self.dropout3(self.resweight(self._ff(x)))
