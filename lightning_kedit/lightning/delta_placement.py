"""Where the callback puts an edit: into the edit layers' weights, or as a new LoRA adapter of a ``PeftModel``.

``edit_as="weights"`` adds the delta to the projections' weights (:meth:`EditDelta.apply`; reverting subtracts
it). ``edit_as="adapter"`` adds it to a ``peft.PeftModel`` as a new frozen LoRA adapter named after the edit's
moment (:func:`adapter_name`), active together with the adapters being fine-tuned: the base weights and the
trained LoRA factors stay as they are, and reverting deletes the adapter. It is the way to edit a model whose
base weights are frozen or quantised.

Example:
    >>> adapter_name("step:200")
    'kedit_step_200'
    >>> check_edit_as("adapter")
    'adapter'
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from torch import nn

from lightning_kedit.models.sharding import is_sharded_model

from .configuration_error import KeditConfigurationError

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta

__all__ = ["EDIT_AS", "adapter_name", "check_edit_as", "check_model_for", "put_delta", "take_delta"]

#: Where the callback can put an edit.
EDIT_AS = ("weights", "adapter")


def check_edit_as(edit_as: str) -> str:
    """``edit_as`` if it is one of :data:`EDIT_AS`, else a :class:`KeditError` naming the choices."""
    if edit_as not in EDIT_AS:
        raise KeditConfigurationError(f"`edit_as` must be one of {EDIT_AS}, got {edit_as!r}")
    return edit_as


def check_model_for(edit_as: str, model: nn.Module) -> None:
    """Refuse a model that cannot take edits as ``edit_as`` (called at set-up, before any statistics).

    Raises:
        KeditError: ``"adapter"`` for a model that is not a ``peft.PeftModel``, or whose weights are sharded.
    """
    if edit_as != "adapter":
        return
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise KeditConfigurationError(
            f"edit_as='adapter' needs a peft.PeftModel, got {type(model).__name__}; wrap it with "
            "peft.get_peft_model, or use edit_as='weights' to write the edit into the weights"
        )
    if is_sharded_model(model):
        raise KeditConfigurationError(
            "edit_as='adapter' is not supported on a sharded (fully_shard) model; use edit_as='weights'"
        )


def adapter_name(key: str) -> str:
    """The name of the adapter that holds the edit made at moment ``key`` (letters, digits and ``_`` only)."""
    return "kedit_" + re.sub(r"[^A-Za-z0-9_]+", "_", key)


def put_delta(model: nn.Module, delta: EditDelta, edit_as: str, key: str) -> None:
    """Put ``delta`` into ``model`` as ``edit_as`` says."""
    if edit_as == "adapter":
        from lightning_kedit.editing.peft_adapter import add_delta_adapter

        add_delta_adapter(model, delta, adapter_name(key))
    else:
        delta.apply(model)


def take_delta(model: nn.Module, delta: EditDelta, edit_as: str, key: str) -> None:
    """Take ``delta`` (put there at moment ``key``) out of ``model`` again."""
    if edit_as == "adapter":
        model.delete_adapter(adapter_name(key))  # type: ignore[operator]  # a peft.PeftModel's method
    else:
        delta.revert(model)
