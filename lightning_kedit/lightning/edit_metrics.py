"""The metrics the callback reports after each edit: measured before and after, logged, and summarised.

The edit metrics are those of ``evaluation.request_evaluation.evaluate_requests`` on the edited requests
(efficacy, paraphrase, neighbourhood, consistency, score) and, with a text, its perplexity. After an edit they
are reported with the number of facts and the seconds it took, as ``edit/<name>`` (the value after the edit)
and ``edit/<name>_before``, through ``LightningModule.log`` inside hooks where logging is allowed, and
straight to the trainer's loggers elsewhere.

Example:
    >>> edit_metric_values(2, {"efficacy": 0.0}, {"efficacy": 1.0}, 1.5, ["efficacy"])
    {'n': 2.0, 'seconds': 1.5, 'efficacy': 1.0, 'efficacy_before': 0.0}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.requests import EditRequest

from .configuration_error import KeditConfigurationError

__all__ = ["EDIT_METRICS", "announce_edit", "edit_metric_values", "evaluate_edit", "log_edit_metrics", "metric_names"]

#: The metrics an edit can report.
EDIT_METRICS: tuple[str, ...] = ("efficacy", "paraphrase", "neighborhood", "consistency", "score", "perplexity")
_PROGRESS_BAR_METRICS = ("edit/efficacy", "edit/neighborhood")


def metric_names(metrics: bool | Sequence[str]) -> tuple[str, ...]:
    """The metrics to report: True for all of :data:`EDIT_METRICS`, False for none, or the names given.

    Raises:
        KeditError: a name outside :data:`EDIT_METRICS`.
    """
    names = list(EDIT_METRICS) if metrics is True else [] if metrics is False else list(metrics)
    bad = [m for m in names if m not in EDIT_METRICS]
    if bad:
        raise KeditConfigurationError(f"`metrics` has unknown names {bad}; choose from {EDIT_METRICS}")
    return tuple(names)


def evaluate_edit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    metrics: Sequence[str],
    ppl_text: str | os.PathLike[str] | Path | None,
    ppl_tokens: int,
) -> dict[str, Any]:
    """The current values of ``metrics`` on ``requests`` (``{}`` when none is asked for)."""
    if not metrics:
        return {}
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests

    text = ppl_text if "perplexity" in metrics else None
    return evaluate_requests(model, tokenizer, list(requests), ppl_text=text, ppl_tokens=ppl_tokens)


def edit_metric_values(
    n: int, before: Mapping[str, Any], after: Mapping[str, Any], seconds: float, metrics: Sequence[str]
) -> dict[str, float]:
    """What an edit of ``n`` facts reports: ``n``, ``seconds``, the metrics after and before, the perplexity shift."""
    values: dict[str, float] = {"n": float(n), "seconds": seconds}
    for name in metrics:
        if after.get(name) is not None:
            values[name] = float(after[name])
        if before.get(name) is not None:
            values[f"{name}_before"] = float(before[name])
    if "perplexity" in values and "perplexity_before" in values:
        values["perplexity_shift"] = values["perplexity"] - values["perplexity_before"]
    return values


def log_edit_metrics(
    trainer: Trainer, pl_module: LightningModule, values: Mapping[str, float], can_log: bool
) -> None:
    """Log ``values`` as ``edit/<name>``: with ``LightningModule.log`` when ``can_log``, else to the loggers."""
    logged = {f"edit/{name}": value for name, value in values.items()}
    if can_log:
        # Every process holds the same values (same edit, same requests): no reduction needed.
        shown = {k: v for k, v in logged.items() if k in _PROGRESS_BAR_METRICS}
        pl_module.log_dict(shown, prog_bar=True, sync_dist=False)
        pl_module.log_dict({k: v for k, v in logged.items() if k not in shown}, sync_dist=False)
    else:
        for logger in trainer.loggers:
            logger.log_metrics(logged, step=trainer.global_step)


def announce_edit(key: str, method: str, values: Mapping[str, float]) -> None:
    """One line on rank 0: how many facts were edited where, with which method, how fast, and the metrics."""
    seconds = values["seconds"]
    summary = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k not in ("n", "seconds"))
    rank_zero_info(
        f"KnowledgeEditCallback: edited {int(values['n'])} fact(s) at {key} with "
        f"{method} in {seconds:.1f}s" + (f": {summary}" if summary else "")
    )
