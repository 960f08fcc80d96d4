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
Everything is ordinary autograd (``index_select``, ``addmm``): gradients, double backward and
``torch.func`` transforms work as for any op.
"""

from __future__ import annotations

import torch
from torch import nn

from depthlab.nn.fusion.switch import enabled

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


def conv3x3_2x2(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """``F.conv2d(x, weight, bias, padding=1)`` for ``x`` of shape (N, C_in, 2, 2) and a 3×3
    ``weight`` (C_out, C_in, 3, 3), as one matrix product (see the module docstring). Equal to
    ``F.conv2d`` up to floating-point rounding, in the input's memory format."""
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    if x.shape[2:] != (2, 2) or weight.shape != (c_out, c_in, 3, 3):
        raise ValueError(
            f"conv3x3_2x2 takes (N, C, 2, 2) inputs and (C_out, C, 3, 3) weights, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}; use F.conv2d for other shapes"
        )
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # rows (c_out, o), columns (i, c_in): a view of the gathered (C_out, 16, C_in) taps
        taps = weight.permute(0, 2, 3, 1).reshape(c_out, 9, c_in)
        m = taps.index_select(1, _taps(True, x.device)).view(c_out * 4, 4 * c_in)
        rows = x.permute(0, 2, 3, 1).reshape(n, 4 * c_in)
        if bias is None:
            y = rows @ m.t()
        else:
            y = torch.addmm(bias.repeat_interleave(4), rows, m.t())
        return y.view(n, c_out, 2, 2).contiguous(memory_format=torch.channels_last)
    # rows (c_in, i), columns (o, c_out): a view of the gathered (C_in, 16, C_out) taps
    taps = weight.reshape(c_out, c_in, 9).permute(1, 2, 0)
    m = taps.index_select(1, _taps(False, x.device)).view(c_in * 4, 4 * c_out)
    rows = x.reshape(n, c_in * 4)
    y = rows @ m if bias is None else torch.addmm(bias.repeat(4), rows, m)
    return y.view(n, 2, 2, c_out).permute(0, 3, 1, 2).contiguous()


def _compiling() -> bool:
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(compiling is not None and compiling())


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
            and not _compiling()
        )

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self._small_map(input, weight):
            return conv3x3_2x2(input, weight, bias)
        return super()._conv_forward(input, weight, bias)
