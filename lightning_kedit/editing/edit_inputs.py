"""What an edit is computed with when the caller leaves it open: the key statistics and the edit layers.

:func:`resolve_statistics` turns given statistics, a statistics file or None (the cached statistics of the
bundled corpus) into ``KeyStatistics``, and :func:`check_statistics` refuses statistics that do not fit the
model; :func:`auto_edit_layers` chooses edit layers by causal tracing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError, StatisticsMismatchError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

from .hparams import EditHyperParams

__all__ = ["auto_edit_layers", "check_statistics", "resolve_statistics"]


def resolve_statistics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    layers: Sequence[int],
    statistics: Any = None,
    *,
    progress: bool = False,
) -> Any:
    """Key statistics for ``layers``: given ones, a file (checked against the model), or the cached default.

    ``None`` loads or collects statistics over the bundled corpus (cached by model fingerprint).
    """
    from lightning_kedit.statistics import KeyStatistics, load_or_collect_statistics

    if statistics is None:
        return load_or_collect_statistics(model, tokenizer, list(layers), progress=progress)
    if isinstance(statistics, (str, os.PathLike)):
        return KeyStatistics.load(statistics, model=model, tokenizer=tokenizer, layers=list(layers))
    return statistics


def auto_edit_layers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest] | None, method: str,
    spec: str = "auto",
) -> list[int]:
    """Edit layers chosen by causal tracing: as many as the method's default uses, where the MLPs carry the facts.

    Example:
        >>> auto_edit_layers(model, tokenizer, requests, "memit")  # doctest: +SKIP
        [4, 5, 6, 7, 8]
    """
    if spec != "auto":
        raise KeditError(f"`layers`={spec!r} is neither a list of layer indices nor 'auto'")
    from lightning_kedit.tracing import choose_edit_layers

    size = len(EditHyperParams.for_model(model, method).layers)
    return choose_edit_layers(model, tokenizer, requests, window=size)


def check_statistics(statistics: object, adapter: ModelAdapter, layers: Sequence[int]) -> None:
    """Refuse statistics that lack a layer or whose key size differs from the model's."""
    held = list(getattr(statistics, "layers", []))
    missing = [layer for layer in layers if layer not in held]
    if missing:
        raise StatisticsMismatchError(
            f"the key statistics hold layers {held} but the edit needs {missing}; collect statistics for layers "
            f"{list(layers)} (kedit stats --layers {','.join(map(str, layers))})"
        )
    size = statistics.second_moment(layers[0]).shape[0]  # type: ignore[attr-defined]
    if size != adapter.key_size:
        raise StatisticsMismatchError(
            f"the key statistics have key size {size} but {adapter.model_type} has {adapter.key_size}: "
            "they were collected on another model"
        )
