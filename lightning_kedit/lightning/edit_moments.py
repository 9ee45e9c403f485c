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

import inspect
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

from lightning.pytorch import Trainer

from .configuration_error import KeditConfigurationError

__all__ = ["EDIT_MOMENTS", "REVERT_MOMENTS", "Moment", "check_moments", "moment_key", "takes_moment"]

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
        KeditConfigurationError: an unknown moment, ``"step"`` without ``every_n_steps`` (or the reverse), ``epochs``
            without ``"epoch_end"``, or an unknown ``revert_at``.
    """
    moments = [edit_at] if isinstance(edit_at, str) else list(edit_at)
    unknown = [m for m in moments if m not in EDIT_MOMENTS]
    if unknown:
        raise KeditConfigurationError(
            f"`edit_at`={edit_at!r} has unknown moments {unknown}; choose from {EDIT_MOMENTS}"
        )
    if ("step" in moments) != (every_n_steps is not None):
        raise KeditConfigurationError(
            f"`every_n_steps`={every_n_steps} and `edit_at`={edit_at!r} disagree: give edit_at='step' "
            "together with every_n_steps=N"
        )
    if every_n_steps is not None and every_n_steps < 1:
        raise KeditConfigurationError(f"`every_n_steps` must be >= 1, got {every_n_steps}")
    if epochs is not None and "epoch_end" not in moments:
        raise KeditConfigurationError(f"`epochs`={list(epochs)} needs edit_at='epoch_end', got edit_at={edit_at!r}")
    if revert_at is not None and revert_at not in REVERT_MOMENTS:
        raise KeditConfigurationError(f"`revert_at` must be one of {REVERT_MOMENTS} or None, got {revert_at!r}")
    return tuple(moments)


def moment_key(trainer: Trainer, moment: Moment) -> str:
    """The key of ``moment`` now: ``"step:<global step>"``, ``"epoch:<epoch>"``, or the moment itself."""
    if moment == "step":
        return f"step:{trainer.global_step}"
    if moment == "epoch_end":
        return f"epoch:{trainer.current_epoch}"
    return moment


def takes_moment(should_edit: Callable[..., bool]) -> bool:
    """Whether a bound ``should_edit`` takes the moment as its third argument (``trainer, pl_module, moment``).

    An override with the old signature ``should_edit(trainer, pl_module)``, which reads ``self.moment``, gets a
    ``DeprecationWarning``.

    Example:
        >>> takes_moment(lambda trainer, pl_module, moment=None: True)
        True
    """
    parameters = list(inspect.signature(should_edit).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters) or "moment" in {
        p.name for p in parameters
    }:
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3:
        return True
    warnings.warn(
        f"{getattr(should_edit, '__qualname__', 'should_edit')}(trainer, pl_module) reads `self.moment`, which is "
        "deprecated: override should_edit(self, trainer, pl_module, moment) and use its `moment` argument",
        DeprecationWarning,
        stacklevel=3,
    )
    return False
