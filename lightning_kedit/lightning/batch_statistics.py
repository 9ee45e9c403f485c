"""Where the callback's key statistics come from, and how they are collected from the batches that flow.

MEMIT needs the second moment of each edit layer's MLP keys. The callback takes it from the batches of
``"train"``, ``"validation"`` or ``"predict"`` (:class:`BatchKeyCollector` hooks the model while a batch of that
source runs, and :func:`gather_statistics` sums every process's statistics when an edit needs them), or opens
it once at set-up (:func:`open_statistics`): a ``.safetensors`` statistics file, a ``KeyStatistics``, text
file(s) to collect from, or the cached statistics of the bundled corpus.

Example:
    >>> batch_source("train"), batch_source("stats.safetensors")
    ('train', None)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.models import ModelAdapter
from lightning_kedit.statistics import KeyStatistics, KeyTracker, track_keys

from .configuration_error import KeditConfigurationError

__all__ = [
    "BATCH_SOURCES",
    "BatchKeyCollector",
    "batch_source",
    "check_statistics_source",
    "gather_statistics",
    "open_statistics",
]

#: The batches key statistics can be collected from.
BATCH_SOURCES: tuple[str, ...] = ("train", "validation", "predict")

# Not os.PathLike: in a LightningCLI signature it makes jsonargparse pass a file's contents instead of its path.
PathLike = str | Path


def batch_source(statistics: Any) -> str | None:
    """``"train"``, ``"validation"`` or ``"predict"`` when ``statistics`` names batches, else None."""
    return statistics if isinstance(statistics, str) and statistics in BATCH_SOURCES else None


def _is_path_list(value: Any) -> bool:
    """Whether ``value`` is a non-empty list of paths (not one string)."""
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(v, (str, os.PathLike)) for v in value)
    )


def check_statistics_source(statistics: Any, moments: Sequence[str]) -> None:
    """Refuse a ``statistics`` argument that cannot serve the edits at ``moments``.

    Raises:
        KeditError: prediction batches for an edit at predict start (none has run yet), or missing files.
    """
    if batch_source(statistics) is not None:
        if statistics == "predict" and "predict_start" in moments:
            raise KeditConfigurationError(
                "`statistics`='predict' with edit_at='predict_start': no prediction batch has run at "
                "predict start; take the statistics from a file, a text source or training batches"
            )
    elif isinstance(statistics, (str, os.PathLike)) or _is_path_list(statistics):
        paths = [statistics] if isinstance(statistics, (str, os.PathLike)) else list(statistics)
        missing = [str(p) for p in paths if not Path(p).expanduser().is_file()]
        if missing:
            raise KeditConfigurationError(
                f"`statistics` file(s) {missing} not found; give {BATCH_SOURCES}, a statistics "
                ".safetensors file, text file(s), a KeyStatistics or None"
            )


def _not_distributed() -> bool:
    return False


def open_statistics(
    trainer: Trainer,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    statistics: Any,
    layers: list[int],
    max_tokens: int,
) -> KeyStatistics:
    """The statistics an edit of ``layers`` starts from: empty for batches, else loaded or collected now.

    Args:
        trainer: the trainer (text sources are collected by rank 0 first, so a cache file is written once).
        model: the language model.
        tokenizer: its tokenizer.
        statistics: the callback's ``statistics`` argument.
        layers: the edit layers.
        max_tokens: tokens read from a text source.
    """
    from lightning_kedit import statistics as stats

    adapter = ModelAdapter.for_model(model)
    if batch_source(statistics) is not None:
        # Local sums only: they are all-reduced explicitly, once, when an edit needs them.
        collected = KeyStatistics(layers, adapter.key_size, distributed_available_fn=_not_distributed)
        collected.persistent(True)
        return collected
    if isinstance(statistics, KeyStatistics):
        return statistics
    if isinstance(statistics, (str, os.PathLike)) and str(statistics).endswith(".safetensors"):
        return KeyStatistics.load(statistics, model=model, tokenizer=tokenizer, layers=layers)
    # A text source or the bundled corpus: rank 0 first, so that a cache file is written once.
    if trainer.global_rank != 0:
        trainer.strategy.barrier("kedit_statistics")
    if statistics is None:
        result = stats.load_or_collect_statistics(model, tokenizer, layers)
    else:
        listed = [statistics] if isinstance(statistics, (str, os.PathLike)) else cast(Sequence[PathLike], statistics)
        paths = [str(p) for p in listed]
        result = stats.collect_key_statistics(model, tokenizer, layers, paths, max_tokens=max_tokens)
    if trainer.global_rank == 0:
        trainer.strategy.barrier("kedit_statistics")
    return result


def gather_statistics(trainer: Trainer, statistics: KeyStatistics, source: str) -> KeyStatistics:
    """The sum of every process's statistics collected from ``source`` batches (a collective call).

    Raises:
        KeditError: no key was collected yet (no batch of ``source`` ran before the edit).
    """
    # Σ k kᵀ and the counts are sums, so summing every process's states gives the statistics of all
    # batches. A copy is reduced, so that collection goes on locally; like the original it never syncs
    # by itself (distributed_available_fn), so it is not reduced a second time.
    reduced = copy.deepcopy(statistics)
    if trainer.world_size > 1:
        for name, value in reduced.metric_state.items():
            if not isinstance(value, torch.Tensor):
                raise MisconfigurationException(f"KeyStatistics state {name!r} is not a tensor")
            setattr(reduced, name, trainer.strategy.reduce(value.clone(), reduce_op="sum"))
    counts = {layer: reduced.count(layer) for layer in reduced.layers}
    if min(counts.values()) == 0:
        raise KeditError(
            f"no key statistics were collected from {source!r} batches before the edit "
            f"(token counts per layer: {counts}); edit later, or give `statistics=` a file or text source"
        )
    if min(counts.values()) < reduced.key_size:
        rank_zero_warn(
            f"KnowledgeEditCallback: the key statistics hold {min(counts.values())} tokens for keys of size "
            f"{reduced.key_size}, so C is rank-deficient; edit later or raise `mom2_weight` if the solve fails"
        )
    return reduced


class BatchKeyCollector:
    """Adds the keys of the batches that run between :meth:`batch_start` and :meth:`batch_end` to statistics.

    The model is hooked from :meth:`start` to :meth:`stop`; padding positions are dropped through each batch's
    attention mask.
    """

    def __init__(self) -> None:
        self._hooks: ExitStack | None = None
        self._tracker: KeyTracker | None = None

    @property
    def active(self) -> bool:
        """Whether the model is hooked."""
        return self._hooks is not None

    def start(self, model: nn.Module, statistics: KeyStatistics) -> None:
        """Hook ``model`` so that its keys are added to ``statistics`` during batches."""
        self._hooks = ExitStack()
        self._tracker = self._hooks.enter_context(track_keys(model, statistics))
        self._tracker.enabled = False

    def batch_start(self, batch: Any) -> None:
        """Collect the keys of ``batch`` (a mapping's ``attention_mask`` drops padding)."""
        if self._tracker is not None:
            # Padding positions are not keys: the batch's attention mask drops them.
            self._tracker.mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            self._tracker.enabled = True

    def batch_end(self) -> None:
        """Stop collecting until the next :meth:`batch_start`."""
        if self._tracker is not None:
            self._tracker.enabled = False
            self._tracker.mask = None

    def stop(self) -> None:
        """Remove the hooks (does nothing when none are set)."""
        if self._hooks is not None:
            self._hooks.close()
        self._hooks = None
        self._tracker = None
