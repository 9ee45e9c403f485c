"""Sharded (FSDP2) weights: read the whole of an edited weight, write the whole of it back, on every process.

A model sharded with ``torch.distributed.fsdp.fully_shard`` stores each parameter as a ``DTensor``: every process
holds one shard, and each sharded module gathers its shards only for its own forward and backward (then frees
them). The editing code touches the weights of the edit layers' MLP output projections only:

- :func:`full_weight` gathers one of them (``DTensor.full_tensor()``, a collective call: every process calls it,
  in the same order, as every process runs the same edit);
- :func:`write_weight` writes a whole new value by keeping this process's shard of it (no communication: every
  process holds the same value);
- :func:`stored_weight` is the parameter as stored: for a sharded block it first frees a gathered copy that a
  forward may have left (``FSDPModule.reshard()``, which does not communicate), so reads and writes reach the
  shards, which are the weights.

Everything else (keys, target values, evaluation) runs the sharded model's own forward and backward, on every
process, outside any gather. Each block holding an edit layer must be sharded as a unit of its own
(``fully_shard(block)`` before ``fully_shard(model)``), as the usual recipes do: :func:`sharded_owner` refuses a
layer whose weights only the root holds, since the root keeps its parameters gathered between forward and
backward.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.zeros(2, 2))
    >>> full_weight(w) is w, is_sharded(w)
    (True, False)
    >>> write_weight(w, torch.ones(2, 2)); float(w.detach().sum())
    4.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError

__all__ = [
    "full_weight",
    "gather_for_direct_call",
    "is_sharded",
    "is_sharded_model",
    "sharded_owner",
    "stored_weight",
    "write_weight",
]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def _fsdp_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FSDPModule


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (sharded or replicated over a device mesh)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_sharded_model(model: nn.Module) -> bool:
    """Whether ``model`` (or one of its modules) was sharded with ``fully_shard`` (FSDP2)."""
    fsdp = _fsdp_type()
    return fsdp is not None and any(isinstance(module, fsdp) for module in model.modules())


def full_weight(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``: gathered from every process when it is a ``DTensor`` (collective), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]


def write_weight(param: Tensor, value: Tensor) -> None:
    """Copy the whole ``value`` into ``param`` in place; a ``DTensor`` keeps this process's shard of it."""
    with torch.no_grad():
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            local = value.detach().to(device=param.device, dtype=param.dtype)
            # src_data_rank=None: each process cuts its own shard from its (identical) copy, without sending.
            param.copy_(distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None))  # type: ignore[attr-defined]
        else:
            param.copy_(value)


def sharded_owner(model: nn.Module, block: nn.Module, path: Sequence[nn.Module] = ()) -> nn.Module | None:
    """The ``fully_shard`` module that holds ``block``'s parameters: ``block`` itself or an ancestor below the root.

    Args:
        model: the model (the root).
        block: the transformer block.
        path: the modules from ``model`` down to the edited projection, when known (then only they are looked
            at, instead of every module of the model).

    Returns None when ``model`` is not sharded.

    Raises:
        KeditError: ``model`` is sharded but ``block`` is not a sharded unit of its own (only the root holds it).
    """
    fsdp = _fsdp_type()
    if fsdp is None:
        return None
    if path:
        units = [m for m in path if isinstance(m, fsdp)]
        if not units:
            return None
        owner = units[-1] if units[-1] is not model else None
    else:
        if not is_sharded_model(model):
            return None
        owner = None
        for module in model.modules():
            if isinstance(module, fsdp) and module is not model and any(m is block for m in module.modules()):
                owner = module  # modules() is pre-order: the last match is the innermost
    if owner is None:
        raise KeditError(
            f"the model is sharded (fully_shard) but its block {type(block).__name__} is not a sharded unit of "
            "its own; call fully_shard on each transformer block before the model, so that an edit layer's "
            "weights can be read and written by themselves"
        )
    return owner


def gather_for_direct_call(model: nn.Module, module: nn.Module) -> None:
    """Gather the parameters of the sharded unit holding ``module``, which is called outside that unit's forward.

    The target-value optimisation runs the final norm and the LM head by themselves on every step. They belong to
    the root unit, which FSDP2 itself keeps gathered from a forward to its backward; this gathers them the same
    way (``FSDPModule.unshard()``, a collective call, nothing when they are gathered already), and the next
    backward frees them as it frees the root's. Does nothing when ``model`` is not sharded.
    """
    fsdp = _fsdp_type()
    if fsdp is None:
        return
    owner = None
    for candidate in model.modules():
        if isinstance(candidate, fsdp) and any(m is module for m in candidate.modules()):
            owner = candidate
    if owner is not None:
        owner.unshard()  # type: ignore[operator]


def stored_weight(
    model: nn.Module, block: nn.Module, weight: nn.Module, path: Sequence[nn.Module] = ()
) -> nn.Parameter:
    """``weight.weight`` as stored: for a sharded ``block``, its shards (a gathered copy left by a forward is freed).

    Args:
        model: the model.
        block: the transformer block that holds ``weight``.
        weight: the module whose ``weight`` parameter is wanted (the MLP output projection).
        path: the modules from ``model`` down to ``weight`` (see :func:`sharded_owner`).
    """
    owner = sharded_owner(model, block, path)
    if owner is not None:
        owner.reshard()  # type: ignore[operator]
    return weight.weight  # type: ignore[return-value]
