"""What the callback needs of Lightning's strategies: whole weights on every process, and one delta for all.

The edited projections must be whole on every process: a single device, DDP, or FSDP (v1), under which an
edit runs inside :func:`full_parameters` (``summon_full_params`` with write-back). DeepSpeed, FSDP2 and tensor
or model parallelism are refused by :func:`check_strategy`. Under DDP every process computes the same edit
from the same requests; :func:`same_on_every_rank` checks the deltas' digests agree and otherwise sends rank
0's to all, so the weights stay bit-identical.

Example:
    >>> from lightning.pytorch.strategies import SingleDeviceStrategy
    >>> check_strategy(SingleDeviceStrategy("cpu"))  # supported: returns quietly
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, cast

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_kedit.models import ModelAdapter

from .applied_edits import delta_from_bytes, delta_to_bytes

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta

__all__ = ["check_strategy", "check_whole_weights", "full_parameters", "language_model", "same_on_every_rank"]


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies that split the edited weights across processes.

    Raises:
        MisconfigurationException: DeepSpeed, FSDP2, tensor or model parallelism (named, with what to use).
    """
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise MisconfigurationException(
            f"KnowledgeEditCallback does not support {name}: DeepSpeed partitions the weights it edits; "
            "use strategy='ddp' or strategy='fsdp'"
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, FSDPStrategy)):
        raise MisconfigurationException(
            f"KnowledgeEditCallback does not support {name} (FSDP2, tensor or model parallelism): the edited "
            "weights must be whole on every process; use a single device, strategy='ddp' or strategy='fsdp'"
        )


def check_whole_weights(adapter: ModelAdapter) -> None:
    """Refuse edit weights that are sharded tensors (FSDP2 or tensor parallelism set up by the module itself).

    Raises:
        MisconfigurationException: a projection weight is a ``DTensor``.
    """
    if any(type(adapter.weight(i)).__name__ == "DTensor" for i in range(adapter.num_layers)):
        raise MisconfigurationException(
            "KnowledgeEditCallback does not support FSDP2 / tensor-parallel (DTensor) weights; "
            "use DDP or FSDP (v1, strategy='fsdp')"
        )


def language_model(pl_module: LightningModule) -> nn.Module:
    """The Hugging Face causal LM of ``pl_module``: its ``model`` attribute, or the module itself.

    Raises:
        MisconfigurationException: ``pl_module`` holds no model with a ``config``.
    """
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    if hasattr(pl_module, "config"):
        return pl_module
    raise MisconfigurationException(
        f"KnowledgeEditCallback needs a Hugging Face causal LM: {type(pl_module).__name__} has no `model` "
        "attribute holding one; use KnowledgeEditModule or keep the model in `self.model`"
    )


@contextmanager
def full_parameters(strategy: Strategy) -> Iterator[None]:
    """Under FSDP (v1): every process holds all parameters, and writes changes back to its shard on exit."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = cast(nn.Module, strategy.model)
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True, with_grads=False):
            yield
    else:
        with nullcontext():
            yield


def same_on_every_rank(trainer: Trainer, delta: EditDelta) -> EditDelta:
    """``delta`` if every process computed the same one (by digest), else rank 0's, sent to all."""
    if trainer.world_size == 1:
        return delta
    strategy = trainer.strategy
    digest = delta.digest()
    differs = strategy.reduce_boolean_decision(strategy.broadcast(digest, src=0) != digest, all=False)
    if not differs:
        return delta
    rank_zero_warn(
        "KnowledgeEditCallback: processes computed different deltas (non-deterministic kernels?); "
        "using rank 0's on every process"
    )
    # Sent as the bytes of its file: a delta object holds weak references, which do not pickle.
    return delta_from_bytes(strategy.broadcast(delta_to_bytes(delta), src=0))
