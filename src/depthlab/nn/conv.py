"""A 3×3 convolution on 2×2 feature maps as one matrix product, and the ``nn.Conv2d`` that uses it.

On a 2×2 map a 3×3 convolution with zero padding 1 connects every input position to every
output position: output position ``o = (oi, oj)`` reads input position ``i = (ii, ij)`` through
the tap ``(ii − oi + 1, ij − oj + 1)``, which is always inside the kernel. The convolution is
therefore exactly the dense linear map

    y[b, co, o] = Σ_{ci, i} x[b, ci, i] · w[co, ci, ii − oi + 1, ij − oj + 1]  (+ bias[co])

whose (4·C_in) × (4·C_out) matrix is a gather of the kernel's taps (16 of the 9 taps, each
(C_out, C_in) block copied once or more). As one GEMM it does 16 multiply-adds per (ci, co)
pair where an im2col/direct kernel does 36 (9 taps × 4 positions, 20 of them on padding), and
on a CPU it runs at GEMM speed, where oneDNN's convolution kernels run far below it on so small a
map: the last stage of a CIFAR-style ResNet on 8×8 (digits-sized) inputs. ``benchmarks/
bench_small_conv.py`` measures it against ``F.conv2d``.

The weight gather is an ``index_select`` along the tap axis, ordered so that the gathered matrix
is a view with no further copy: for a channels-last input the rows are (c_out, o) and the
columns (i, c_in), and the product comes out NCHW-contiguous; for an NCHW input the rows are
(c_in, i) and the columns (o, c_out), and the product comes out channels-last. The output is
then copied into the input's memory format (one activation-sized copy): in a deep ResNet step
the norms, activations and adds after the convolution ran slower on alternating layouts than
that copy costs (``benchmarks/bench_small_conv.py``).
The backward is written out (one autograd node, :class:`_Conv2x2`): it keeps the input and the
weight and gathers the weight's taps again for the input's gradient, rather than keeping the
gathered matrix from the forward pass (16/9 of the weight, 256 KB for 64 channels), which a
10,004-layer ResNet on 8×8 inputs would hold 3,334 of until its backward pass; the weight's
gradient is the matrix product's, its 16 blocks summed back onto the 9 taps (``index_add``).
The gathered matrix and the product behind the weight's gradient (each used once, right
away) go to buffers each thread reuses from call to call where nothing can keep them (grad mode
off, as in the autograd node): in a deep net's step a fresh allocation is memory the cache has
not seen (``benchmarks/bench_versions.py`` measures the step with and without the buffers).
Every gradient is computed by the same
kernels, on the same operands and in the same order as autograd's backward of those ops, so the
two agree to the bit (tested). The backward is itself made of differentiable ops, so double
backward works; inside ``torch.func`` transforms, ``torch.compile`` tracing, forward-mode AD and
autocast the same product runs as ordinary autograd ops (``index_select``, ``addmm``) instead.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from depthlab.nn.fusion.switch import autocasting, compiling, enabled, forward_ad, transformed

_TAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def _taps(out_major: bool, device: torch.device) -> torch.Tensor:
    """The 16 kernel taps (flat index ``3·ky + kx``) of the (output, input) position pairs,
    output-major (rows (o, i)) or input-major (rows (i, o))."""
    key = (out_major, device)
    if key not in _TAPS:
        taps = []
        for a in range(4):
            for c in range(4):
                o, i = (a, c) if out_major else (c, a)
                taps.append((i // 2 - o // 2 + 1) * 3 + (i % 2 - o % 2 + 1))
        _TAPS[key] = torch.tensor(taps, device=device)
    return _TAPS[key]


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """A buffer of ``shape`` this thread reuses from call to call for ``name`` — it stays in
    the cache, where a fresh allocation of a deep net's step is memory the cache has not seen —
    or None when grad mode is on (double backward, the ops outside the autograd node), where
    autograd may keep the result."""
    if torch.is_grad_enabled():
        return None
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    key = (name, shape, like.dtype, like.device)
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return buf


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _gather(weight: torch.Tensor, last: bool) -> torch.Tensor:
    """The (4·C_out) × (4·C_in) matrix of ``weight``'s taps (see the module docstring): rows
    (c_out, o) and columns (i, c_in) for a channels-last input (``last``), else rows (c_in, i)
    and columns (o, c_out)."""
    c_out, c_in = weight.shape[:2]
    if last:
        taps, rows, cols = weight.permute(0, 2, 3, 1).reshape(c_out, 9, c_in), c_out, c_in
    else:
        taps, rows, cols = weight.reshape(c_out, c_in, 9).permute(1, 2, 0), c_in, c_out
    index = _taps(last, weight.device)
    out = _scratch("gather", (rows, 16, cols), weight)
    m = taps.index_select(1, index) if out is None else torch.index_select(taps, 1, index, out=out)
    return m.view(rows * 4, 4 * cols)


def _product(x: torch.Tensor, m: torch.Tensor, bias: torch.Tensor | None, last: bool):
    """The convolution's output from the gathered matrix ``m``, in the input's memory format."""
    n, c_in = x.shape[:2]
    if last:
        c_out = m.shape[0] // 4
        rows = x.permute(0, 2, 3, 1).reshape(n, 4 * c_in)
        y = rows @ m.t() if bias is None else torch.addmm(bias.repeat_interleave(4), rows, m.t())
        return y.view(n, c_out, 2, 2).contiguous(memory_format=torch.channels_last)
    c_out = m.shape[1] // 4
    rows = x.reshape(n, c_in * 4)
    y = rows @ m if bias is None else torch.addmm(bias.repeat(4), rows, m)
    return y.view(n, 2, 2, c_out).permute(0, 3, 1, 2).contiguous()


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (the weight's gradient before its taps are summed), into a reused buffer where
    :func:`_scratch` gives one."""
    out = _scratch("mm", (a.shape[0], b.shape[1]), a)
    return a @ b if out is None else torch.mm(a, b, out=out)


class _Conv2x2(torch.autograd.Function):
    """:func:`conv3x3_2x2` as one autograd node that keeps only its input and weight (see the
    module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        last = _channels_last(x)
        ctx.save_for_backward(x, weight)
        ctx.last, ctx.has_bias = last, bias is not None
        return _product(x, _gather(weight, last), bias, last)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        n, c_in = x.shape[:2]
        c_out = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad
        gx = gw = gb = None
        if ctx.last:  # rows (c_out, o) × columns (i, c_in)
            g_rows = g.reshape(n, c_out * 4)
            if need_x:
                gx = (g_rows @ _gather(weight, True)).view(n, 2, 2, c_in).permute(0, 3, 1, 2)
            if need_w:
                rows = x.permute(0, 2, 3, 1).reshape(n, 4 * c_in)
                gm = _mm(g_rows.t(), rows).view(c_out, 16, c_in)
                gt = gm.new_zeros(c_out, 9, c_in).index_add_(1, _taps(True, x.device), gm)
                gw = gt.view(c_out, 3, 3, c_in).permute(0, 3, 1, 2)
            if need_b and ctx.has_bias:
                gb = g_rows.sum(0).view(c_out, 4).sum(1)  # autograd's order: same bits
            return gx, gw, gb
        g_rows = g.permute(0, 2, 3, 1).reshape(n, 4 * c_out)  # rows (c_in, i) × columns (o, c_out)
        if need_x:
            gx = (g_rows @ _gather(weight, False).t()).view(n, c_in, 2, 2)
        if need_w:
            gm = _mm(x.reshape(n, c_in * 4).t(), g_rows).view(c_in, 16, c_out)
            gt = gm.new_zeros(c_in, 9, c_out).index_add_(1, _taps(False, x.device), gm)
            gw = gt.permute(2, 0, 1).view(c_out, c_in, 3, 3)
        if need_b and ctx.has_bias:
            gb = g_rows.sum(0).view(4, c_out).sum(0)
        return gx, gw, gb


def conv3x3_2x2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.conv2d(x, weight, bias, padding=1)`` for ``x`` of shape (N, C_in, 2, 2) and a 3×3
    ``weight`` (C_out, C_in, 3, 3), as one matrix product (see the module docstring). Equal to
    ``F.conv2d`` up to floating-point rounding, in the input's memory format."""
    c_out, c_in = weight.shape[0], x.shape[1]
    if x.shape[2:] != (2, 2) or weight.shape != (c_out, c_in, 3, 3):
        raise ValueError(
            f"conv3x3_2x2 takes (N, C, 2, 2) inputs and (C_out, C, 3, 3) weights, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}; use F.conv2d for other shapes"
        )
    if transformed() or forward_ad() or autocasting():  # no vmap or forward rule; per-op dtypes
        last = _channels_last(x)
        return _product(x, _gather(weight, last), bias, last)
    return _Conv2x2.apply(x, weight, bias)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state-dict keys and function) whose CPU forward on 2×2
    feature maps — a 3×3 kernel, stride 1, zero padding 1, no dilation, one group — runs as one
    matrix product (:func:`conv3x3_2x2`), about 0.5–0.75× the time of ``F.conv2d`` forward and
    backward there. Every other call, and every call with ``depthlab.nn.fusion(False)`` or under
    ``torch.compile``, is ``nn.Conv2d``'s. The layers depthlab's schemes build are of this type."""

    def _small_map(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return (
            x.dim() == 4
            and x.shape[2] == 2
            and x.shape[3] == 2
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and weight.dtype == x.dtype
            and self.kernel_size == (3, 3)
            and self.stride == (1, 1)
            and self.padding in ((1, 1), "same")
            and self.dilation == (1, 1)
            and self.groups == 1
            and self.padding_mode == "zeros"
            and enabled()
            and not compiling()
        )

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self._small_map(input, weight):
            return conv3x3_2x2(input, weight, bias)
        return super()._conv_forward(input, weight, bias)
