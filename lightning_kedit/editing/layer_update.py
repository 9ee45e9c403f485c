"""One layer's part of an edit: the update of its MLP output projection, dense or as exact low-rank factors.

A :class:`LayerUpdate` stores the update in ``out x in`` layout, either as factors ``U Vᵀ`` (when
``(dv + dk) r < dv dk``, :func:`compact_update`) or as a dense matrix, together with the name of the weight,
the hashes of the weight it was computed on and of the weight it produces, and whether the weight is stored
transposed (GPT-2's ``Conv1D``). Adding it to a weight is computed in float64 and cast back to the weight's
dtype.

Example:
    >>> import torch
    >>> update = LayerUpdate(0, "mlp.down_proj.weight", "base", **compact_update(torch.ones(2, 3), (2, 3), 0))
    >>> update.shape, update.rank, update.applied_to(torch.zeros(2, 3)).sum().item()
    ((2, 3), None, 6.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from lightning_kedit.editing.solvers import LowRankUpdate
from lightning_kedit.errors import DeltaError

__all__ = ["LayerUpdate", "compact_update"]


@dataclasses.dataclass(frozen=True, eq=False)
class LayerUpdate:
    """The update of one layer's projection weight, in ``out x in`` layout.

    Args:
        layer: block index.
        weight_name: the fully qualified parameter name (``ModelAdapter.weight_name``).
        base_hash: hash of the stored weight the update was computed on.
        result_hash: hash of the stored weight the update produces from that base, when known.
        transposed: the weight is stored ``in x out`` (GPT-2's ``Conv1D``).
        factors: the update as ``u @ v.T`` (exclusive with ``matrix``).
        matrix: the dense ``(dv, dk)`` update (exclusive with ``factors``).
    """

    layer: int
    weight_name: str
    base_hash: str
    result_hash: str | None = None
    transposed: bool = False
    factors: LowRankUpdate | None = None
    matrix: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.factors is None) == (self.matrix is None):
            raise ValueError(f"layer {self.layer}: give exactly one of `factors` and `matrix`")
        tensors = self.factors if self.factors is not None else (self.matrix,)
        if not all(torch.isfinite(t).all() for t in tensors if t is not None):
            raise DeltaError(f"layer {self.layer}: the update holds nan or inf values; the edit diverged")

    @property
    def shape(self) -> tuple[int, int]:
        """``(dv, dk)``."""
        if self.factors is not None:
            return self.factors.shape
        assert self.matrix is not None
        return int(self.matrix.shape[0]), int(self.matrix.shape[1])

    @property
    def rank(self) -> int | None:
        """The number of factor columns, or None for a dense update."""
        return None if self.factors is None else self.factors.rank

    def dense(self) -> Tensor:
        """The update as a dense ``(dv, dk)`` matrix."""
        if self.factors is not None:
            return self.factors.dense()
        assert self.matrix is not None
        return self.matrix

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors, by name (``u``/``v`` or ``delta``)."""
        if self.factors is not None:
            return {"u": self.factors.u, "v": self.factors.v}
        assert self.matrix is not None
        return {"delta": self.matrix}

    def record(self) -> dict[str, Any]:
        return {"layer": self.layer, "weight_name": self.weight_name, "base_hash": self.base_hash,
                "result_hash": self.result_hash, "transposed": self.transposed}

    def applied_to(self, weight: Tensor, *, sign: float = 1.0) -> Tensor:
        """``weight ± update`` in the weight's stored layout and dtype (see :func:`_updated`)."""
        return _updated(weight, sign * self.dense(), self.transposed)


def compact_update(update: Tensor | LowRankUpdate, shape: tuple[int, int], layer: int) -> dict[str, Any]:
    """The ``LayerUpdate`` keyword of ``update``: ``factors=`` when ``(dv + dk) r < dv dk``, else ``matrix=``.

    The tensors are float64, on the CPU.

    Raises:
        ValueError: the update does not have the weight's ``(out, in)`` shape ``shape``.
    """
    if isinstance(update, LowRankUpdate):
        u, v = (t.detach().to("cpu", torch.float64) for t in update)
        factors = LowRankUpdate(u, v)
        if factors.shape != shape or factors.u.shape[1] != factors.v.shape[1]:
            raise ValueError(f"update of layer {layer}: factors give {factors.shape}, the weight is {shape}")
        if (shape[0] + shape[1]) * factors.rank < shape[0] * shape[1]:
            return {"factors": factors}
        return {"matrix": factors.dense()}
    if not isinstance(update, Tensor) or tuple(update.shape) != shape:
        got = tuple(update.shape) if isinstance(update, Tensor) else type(update).__name__
        raise ValueError(f"update of layer {layer} must be an out x in tensor of shape {shape}, got {got}")
    return {"matrix": update.detach().to("cpu", torch.float64).contiguous()}


def _updated(weight: Tensor, delta: Tensor, transposed: bool) -> Tensor:
    """``weight + delta`` computed in float64 (float32 on MPS) and cast back to the weight's dtype."""
    compute = torch.float32 if weight.device.type == "mps" else torch.float64
    step = delta.T if transposed else delta
    return (weight.detach().to(compute) + step.to(weight.device, compute)).to(weight.dtype)
