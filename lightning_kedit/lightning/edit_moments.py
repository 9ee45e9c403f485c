"""When the callback edits and reverts: the moments, their checks, and the key that makes each edit happen once.

An edit can happen after optimizer steps (``"step"``, every ``every_n_steps``), at the end of training epochs
(``"epoch_end"``, optionally only some), at the end of ``fit`` (``"fit_end"``) or at the start of ``predict``
(``"predict_start"``). Each moment has a key (``"step:200"``, ``"epoch:3"``, ``"fit_end"``, ...) under which at
most one edit is made, also across a resume from a checkpoint. Edits can be undone at ``"fit_end"``,
``"predict_end"`` or ``"teardown"``.

Example:
    >>> check_moments("step", every_n_steps=100, epochs=None, revert_at=None)
    ('step',)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from lightning.pytorch import Trainer

from lightning_kedit.errors import KeditError

__all__ = ["EDIT_MOMENTS", "REVERT_MOMENTS", "Moment", "check_moments", "moment_key"]

Moment = Literal["step", "epoch_end", "fit_end", "predict_start"]
#: The moments at which the callback can edit.
EDIT_MOMENTS: tuple[str, ...] = ("step", "epoch_end", "fit_end", "predict_start")
#: The moments at which the callback can undo its edits.
REVERT_MOMENTS: tuple[str, ...] = ("fit_end", "predict_end", "teardown")


def check_moments(
    edit_at: str | Sequence[str], every_n_steps: int | None, epochs: Sequence[int] | None, revert_at: str | None
) -> tuple[str, ...]:
    """The moments of ``edit_at``, checked together with the settings that go with them.

    Raises:
        KeditError: an unknown moment, ``"step"`` without ``every_n_steps`` (or the reverse), ``epochs``
            without ``"epoch_end"``, or an unknown ``revert_at``.
    """
    moments = [edit_at] if isinstance(edit_at, str) else list(edit_at)
    unknown = [m for m in moments if m not in EDIT_MOMENTS]
    if unknown:
        raise KeditError(f"`edit_at`={edit_at!r} has unknown moments {unknown}; choose from {EDIT_MOMENTS}")
    if ("step" in moments) != (every_n_steps is not None):
        raise KeditError(
            f"`every_n_steps`={every_n_steps} and `edit_at`={edit_at!r} disagree: give edit_at='step' "
            "together with every_n_steps=N"
        )
    if every_n_steps is not None and every_n_steps < 1:
        raise KeditError(f"`every_n_steps` must be >= 1, got {every_n_steps}")
    if epochs is not None and "epoch_end" not in moments:
        raise KeditError(f"`epochs`={list(epochs)} needs edit_at='epoch_end', got edit_at={edit_at!r}")
    if revert_at is not None and revert_at not in REVERT_MOMENTS:
        raise KeditError(f"`revert_at` must be one of {REVERT_MOMENTS} or None, got {revert_at!r}")
    return tuple(moments)


def moment_key(trainer: Trainer, moment: Moment) -> str:
    """The key of ``moment`` now: ``"step:<global step>"``, ``"epoch:<epoch>"``, or the moment itself."""
    if moment == "step":
        return f"step:{trainer.global_step}"
    if moment == "epoch_end":
        return f"epoch:{trainer.current_epoch}"
    return moment
