"""What the callback needs of Lightning's strategies: weights it can read and write, and one delta for all.

Supported: a single device, DDP, and ``ModelParallelStrategy`` with ``tensor_parallel_size=1`` whose
``configure_model`` shards the model with ``fully_shard`` (FSDP2), each transformer block as a unit of its own.
Under FSDP2 the edit runs on the sharded model as it is (:mod:`lightning_kedit.models.sharding`): keys, target
values and metrics come from its ordinary forward and backward on every process, and only the edit layers'
weights are gathered to be read and written back as shards; nothing runs inside a gather of the whole model.
:func:`check_strategy` refuses, naming them, DeepSpeed (it partitions the weights and optimizer itself), tensor
parallelism (``tensor_parallel_size`` other than 1), ``FSDPStrategy`` (FSDP1: its flat parameters can only be
read by gathering the whole unit, and the edit's forward passes would have to run through the wrapper) and any
other strategy; :func:`check_edit_weights` refuses sharded weights that ``fully_shard`` did not make.

Every process computes the same edit from the same requests; :func:`same_on_every_rank` checks the deltas'
digests agree and otherwise sends rank 0's to all, so the weights stay bit-identical.

Example:
    >>> from lightning.pytorch.strategies import SingleDeviceStrategy
    >>> check_strategy(SingleDeviceStrategy("cpu"))  # supported: returns quietly
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_kedit.models import ModelAdapter
from lightning_kedit.models.sharding import is_sharded, is_sharded_model

from .applied_edits import delta_from_bytes, delta_to_bytes
from .configuration_error import KeditConfigurationError

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta

__all__ = ["check_edit_weights", "check_strategy", "language_model", "module_tokenizer", "same_on_every_rank"]

_USE = ("use a single device, strategy='ddp', or ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) "
        "with fully_shard (FSDP2) on each block and the model in configure_model")


def check_strategy(strategy: Strategy) -> None:
    """Refuse strategies whose weights the edit cannot read and write layer by layer.

    Raises:
        KeditConfigurationError: DeepSpeed, FSDPStrategy (FSDP1), tensor parallelism or another strategy,
            named, with what to use instead.
    """
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise KeditConfigurationError(
            f"KnowledgeEditCallback does not support {name}: DeepSpeed partitions the weights it edits; {_USE}"
        )
    if isinstance(strategy, ModelParallelStrategy):
        size = getattr(strategy, "_tensor_parallel_size", "auto")
        if size != 1:
            raise KeditConfigurationError(
                f"KnowledgeEditCallback does not support {name} with tensor_parallel_size={size!r}: tensor "
                f"parallelism splits each projection across processes; {_USE}"
            )
        return
    if "FSDP" in name:
        raise KeditConfigurationError(
            f"KnowledgeEditCallback does not support {name} (FSDP1): its flat parameters can only be read by "
            f"gathering whole units, and the edit's forward passes would have to run inside that gather; {_USE}"
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise KeditConfigurationError(f"KnowledgeEditCallback does not support {name}; {_USE}")


def check_edit_weights(adapter: ModelAdapter, layers: list[int]) -> None:
    """Refuse edit weights sharded otherwise than by ``fully_shard`` (tensor parallelism set up by the module).

    Raises:
        KeditConfigurationError: an edit layer's weight is a ``DTensor`` of a model that ``fully_shard`` did
            not shard, or of more than one mesh dimension with a shard other than rows.
    """
    for layer in layers:
        weight = adapter.mlp_out(layer).weight
        if not is_sharded(weight):
            continue
        from torch.distributed.tensor import Shard

        placements = list(getattr(weight, "placements", ()))
        column_shards = any(isinstance(p, Shard) and p.dim != 0 for p in placements)
        if not is_sharded_model(adapter.model) or column_shards:
            raise KeditConfigurationError(
                f"KnowledgeEditCallback: the weight of edit layer {layer} is a DTensor placed {placements}, not a "
                f"fully_shard (FSDP2) row shard: tensor parallelism is not supported; {_USE}"
            )


def language_model(pl_module: LightningModule) -> nn.Module:
    """The Hugging Face causal LM of ``pl_module``: its ``model`` attribute, or the module itself.

    Raises:
        KeditConfigurationError: ``pl_module`` holds no model with a ``config``.
    """
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    if hasattr(pl_module, "config"):
        return pl_module
    raise KeditConfigurationError(
        f"KnowledgeEditCallback needs a Hugging Face causal LM: {type(pl_module).__name__} has no `model` "
        "attribute holding one; use KnowledgeEditModule or keep the model in `self.model`"
    )


def module_tokenizer(pl_module: LightningModule, given: Any = None) -> Any:
    """``given``, or the ``tokenizer`` attribute of ``pl_module`` (as :class:`KnowledgeEditModule` has).

    Raises:
        KeditConfigurationError: neither is there.
    """
    tokenizer = given or getattr(pl_module, "tokenizer", None)
    if tokenizer is None:
        raise KeditConfigurationError(
            "KnowledgeEditCallback needs a tokenizer: pass `tokenizer=` or give the LightningModule a "
            "`tokenizer` attribute (KnowledgeEditModule has one)"
        )
    return tokenizer


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
