"""The result of the target-value optimisation: :class:`TargetValues` (δ per request and how it ended)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TargetValues"]


@dataclass
class TargetValues:
    """Optimised δ per request (float64, ``(n, value_size)``) and how the optimisation ended."""

    delta: torch.Tensor
    prob: torch.Tensor
    steps: torch.Tensor
    layer: int
