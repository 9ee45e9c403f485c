"""The callback's damage guard: measure each edit before it enters the weights, and what to do when it fails.

Every process measures the same delta on the same weights; rank 0's report is sent to all so that they decide
alike. ``on_damage`` says what a rejected edit does: ``"skip"`` (warn, leave the weights as they are),
``"raise"`` (a ``MisconfigurationException`` with the guard's message) or ``"apply"`` (warn, apply it anyway).

Example:
    >>> check_on_damage("skip")
    'skip'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_kedit.editing.damage_guard import DamageGuard, DamageReport
from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.requests import EditRequest

from .configuration_error import KeditConfigurationError

__all__ = ["ON_DAMAGE", "check_on_damage", "guard_delta", "handle_rejection", "resolve_guard"]

#: What a rejected edit does in the callback.
ON_DAMAGE = ("skip", "raise", "apply")


def check_on_damage(on_damage: str) -> str:
    """``on_damage`` if it is one of :data:`ON_DAMAGE`, else a :class:`KeditError` naming the choices."""
    if on_damage not in ON_DAMAGE:
        raise KeditConfigurationError(f"`on_damage` must be one of {ON_DAMAGE}, got {on_damage!r}")
    return on_damage


def resolve_guard(damage_guard: DamageGuard | bool) -> DamageGuard | None:
    """The guard to use: True gives the default :class:`DamageGuard`, False none."""
    if isinstance(damage_guard, DamageGuard):
        return damage_guard
    if isinstance(damage_guard, bool):
        return DamageGuard() if damage_guard else None
    raise KeditConfigurationError(
        f"`damage_guard` must be a DamageGuard, True or False, got {type(damage_guard).__name__}"
    )


def guard_delta(
    trainer: Trainer, guard: DamageGuard | None, model: nn.Module, tokenizer: Any, delta: EditDelta,
    requests: Sequence[EditRequest],
) -> DamageReport | None:
    """The guard's report on ``delta`` (not yet applied), rank 0's on every process; None without a guard."""
    if guard is None:
        return None
    report = guard.measure(model, tokenizer, delta, requests)
    if trainer.world_size > 1:
        report = trainer.strategy.broadcast(report, src=0)
    return report


def handle_rejection(on_damage: str, report: DamageReport) -> bool:
    """Raise (``"raise"``) or warn; True when the rejected edit is to be applied anyway (``"apply"``)."""
    if on_damage == "raise":
        raise MisconfigurationException(f"KnowledgeEditCallback: {report.message}")
    action = "applied anyway (on_damage='apply')" if on_damage == "apply" else "not applied"
    rank_zero_warn(f"KnowledgeEditCallback: {report.message}; the edit is {action}")
    return on_damage == "apply"
