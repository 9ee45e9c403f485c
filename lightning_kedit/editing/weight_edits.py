"""Updates written into a model's edit weights while an edit is solved, and restored bit-exactly afterwards.

:func:`add_to_weight` adds an ``out x in`` update to a layer's weight (float64, gathered when sharded);
:func:`temporary_updates` restores the weights of its layers on exit, whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.sharding import full_weight, write_weight

__all__ = ["add_to_weight", "temporary_updates"]


@contextmanager
def temporary_updates(adapter: ModelAdapter, layers: Sequence[int]) -> Iterator[None]:
    """Inside the block, weights of ``layers`` may be changed (:func:`add_to_weight`); on exit, whatever
    happens (an exception, a keyboard interrupt), they are restored bit-exactly from copies."""
    originals = {layer: adapter.weight(layer).detach().clone() for layer in layers}
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, weight in originals.items():
                adapter.weight(layer).copy_(weight)


def current_weight(adapter: ModelAdapter, layer: int) -> torch.Tensor:
    """The ``out x in`` weight of ``layer`` as float64 on the CPU (gathered whole when sharded)."""
    return adapter.from_stored_layout(full_weight(adapter.weight(layer))).detach().to("cpu", torch.float64)


def add_to_weight(adapter: ModelAdapter, layer: int, delta: torch.Tensor) -> None:
    """``W_l += delta`` (``out x in``, any dtype), computed in float64 and cast to the weight's dtype.

    A sharded (FSDP2) weight is gathered, updated whole and written back as this process's shard.
    """
    param = adapter.weight(layer)
    weight = full_weight(param)
    with torch.no_grad():
        current = adapter.from_stored_layout(weight).to(torch.float64)
        updated = (current + delta.to(device=weight.device, dtype=torch.float64)).to(weight.dtype)
        write_weight(param, adapter.to_stored_layout(updated))
