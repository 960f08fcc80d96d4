"""Initialisation helpers shared by models and schemes."""

from __future__ import annotations

import torch

from depthlab.registry import DepthlabError


def fan(weight: torch.Tensor, mode: str = "fan_in") -> int:
    """A conv/linear weight's fan-in (input channels × kernel size) or fan-out (output channels ×
    kernel size), as in ``torch.nn.init.kaiming_normal_(mode=...)``."""
    receptive = weight[0][0].numel() if weight.dim() > 2 else 1
    if mode == "fan_in":
        return weight.shape[1] * receptive
    if mode == "fan_out":
        return weight.shape[0] * receptive
    raise DepthlabError(f"fan mode must be 'fan_in' or 'fan_out', got {mode!r}")
