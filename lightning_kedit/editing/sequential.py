"""Sequential editing: batches of requests written one after another, each on the model the previous ones left.

This is how a knowledge base is maintained in practice (a batch of corrections this week, another next week),
and where methods differ most: ROME and MEMIT compute each update against the statistics of ordinary text
only, so later batches overwrite earlier ones and the model drifts; AlphaEdit (:mod:`.alphaedit`) also keeps
the keys of every earlier batch, recorded in the :class:`~.history.EditHistory`.

:func:`edit_sequentially` applies the batches, records each delta (and the keys it wrote) in the history,
calls ``callback`` after each batch (to evaluate the model as it is), and can save the history after every
batch so that a long run can be inspected or reverted (``history.revert(model, k)``). Key statistics are
resolved once, on the weights before the first batch: they describe the text the model must keep handling,
not the edited model.

With ``chain=True`` the requests of one chain (same ``chain_id``, e.g. the hops of an MQuAKE record) are
never split across batches, so that all hops are written together; their ``consistency`` prompts (the
multi-hop questions) then measure whether the implied answers follow (:func:`chain_report`).

Example:
    >>> history = edit_sequentially(model, tokenizer, requests, method="alphaedit", batch_size=100,
    ...                             callback=lambda step: print(step.edits))  # doctest: +SKIP
    >>> history.revert(model, 2)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.requests import EditRequest

from .alphaedit import DEFAULT_ALPHA, DEFAULT_THRESHOLD, compute_alphaedit, null_space_bases
from .delta import EditDelta
from .edit_inputs import resolve_statistics
from .editor import compute_edit
from .history import EditHistory
from .hparams import DEFAULT_NULLSPACE_RULE, METHODS, EditHyperParams

__all__ = ["SEQUENTIAL_METHODS", "SequentialStep", "chain_batches", "chain_report", "edit_sequentially"]

#: Methods :func:`edit_sequentially` accepts.
SEQUENTIAL_METHODS = METHODS


@dataclass(frozen=True)
class SequentialStep:
    """What the callback of :func:`edit_sequentially` receives after each batch.

    Attributes:
        batch: 1-based index of the batch just applied (within this call).
        edits: requests written so far by the whole history (earlier calls included).
        requests: the requests of this batch.
        delta: its delta (applied).
        seconds: wall-clock seconds of computing and applying it.
        model: the model, as it is now.
        history: the history, this batch included.
    """

    batch: int
    edits: int
    requests: tuple[EditRequest, ...]
    delta: EditDelta
    seconds: float
    model: nn.Module
    history: EditHistory


def chain_batches(requests: Sequence[EditRequest], batch_size: int, *, chain: bool = False) -> list[list[EditRequest]]:
    """Split ``requests`` into batches of ``batch_size`` in order; with ``chain``, never split a chain.

    With ``chain``, requests sharing a ``chain_id`` are gathered (at the position of the first) and a batch
    is closed before a chain that would overflow it, so a batch holds more than ``batch_size`` requests only
    when one chain alone is longer.

    Example:
        >>> from lightning_kedit.requests import EditRequest
        >>> reqs = [EditRequest(case_id=str(i), prompt="{} is", subject="x", target_new="y",
        ...                     chain_id="a" if i < 3 else None) for i in range(5)]
        >>> [[r.case_id for r in b] for b in chain_batches(reqs, 2, chain=True)]
        [['0', '1', '2'], ['3', '4']]
    """
    if batch_size < 1:
        raise KeditError(f"`batch_size` must be >= 1, got {batch_size}")
    if not chain:
        return [list(requests[i : i + batch_size]) for i in range(0, len(requests), batch_size)]
    groups: dict[str, list[EditRequest]] = {}
    for index, request in enumerate(requests):
        key = request.chain_id if request.chain_id else f"\0{index}"
        groups.setdefault(key, []).append(request)
    batches: list[list[EditRequest]] = []
    current: list[EditRequest] = []
    for group in groups.values():
        if current and len(current) + len(group) > batch_size:
            batches.append(current)
            current = []
        current.extend(group)
    if current:
        batches.append(current)
    return batches


def edit_sequentially(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    method: str = "alphaedit",
    batch_size: int = 100,
    layers: Sequence[int] | None = None,
    statistics: Any = None,
    hparams: EditHyperParams | None = None,
    history: EditHistory | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    chain: bool = False,
    callback: Callable[[SequentialStep], None] | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> EditHistory:
    """Write ``requests`` in batches, each computed on and applied to the model as the previous ones left it.

    Args:
        model: the model to edit in place.
        tokenizer: its tokenizer.
        requests: the facts, in the order they are written.
        method: ``"alphaedit"``, ``"lifelong"``, ``"memit"``, ``"rome"`` or ``"ft"``.
        batch_size: requests per batch (ROME writes a batch as consecutive rank-one updates).
        layers: edit layers (the method's defaults when None).
        statistics: key statistics of the model *before* the sequence, a file, or None for the cached ones
            (a continued ``history``'s first weights are put back while they are found or collected).
        hparams: hyper-parameters (``EditHyperParams.for_model`` when None; MEMIT's for alphaedit).
        history: a history to continue (its batches must be applied to ``model``); a new one when None.
        threshold: AlphaEdit's null-space threshold (read by ``hp.extra["nullspace_rule"]``, "energy" by default).
        alpha: AlphaEdit's relative weight of ``‖Δ‖²``.
        chain: keep requests of one ``chain_id`` in one batch (:func:`chain_batches`).
        callback: called after each batch with a :class:`SequentialStep` (e.g. to evaluate the model).
        save_dir: save the history there after every batch (:meth:`EditHistory.save`).
        progress: print one line per batch to stderr.

    Returns:
        The history: every batch's delta and keys, in order; ``history.revert(model, k)`` undoes the last ``k``.

    Raises:
        KeditError: an unknown method, an empty request list, ``batch_size < 1``, or an error of a batch
            (the batches before it stay applied and recorded; the failing one changes nothing).
    """
    if method not in SEQUENTIAL_METHODS:
        raise KeditError(f"`method`={method!r} is not one of {', '.join(SEQUENTIAL_METHODS)}")
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    batches = chain_batches(requests, batch_size, chain=chain)
    history = history if history is not None else EditHistory()
    changed = history.changed_layers(model)
    if changed:
        raise KeditError(
            f"the model's weights at layer(s) {changed} are not those the given history's {len(history)} batches "
            "left; pass the model the history was recorded on (or revert the edits made since)"
        )
    hp = hparams if hparams is not None else EditHyperParams.for_model(model, method)
    if layers is not None:
        hp = hp.replace(layers=tuple(layers))
    threshold = float(threshold if threshold is not None else hp.extra.get("nullspace_threshold", DEFAULT_THRESHOLD))
    alpha = float(alpha if alpha is not None else hp.extra.get("alpha", DEFAULT_ALPHA))
    stats, bases = None, None
    if hp.uses_key_statistics(method):  # once, on the weights before the sequence (also when resuming one)
        with history.weights_before(model):
            stats = resolve_statistics(model, tokenizer, hp.layers, statistics, progress=progress)
    if method == "alphaedit":
        rule = str(hp.extra.get("nullspace_rule", DEFAULT_NULLSPACE_RULE))
        bases = null_space_bases(stats, hp.layers, threshold, rule)
    for number, batch in enumerate(batches, start=1):
        start = time.perf_counter()
        extras: dict[str, Any] = {}
        if method == "alphaedit":
            keys: dict[int, Any] = {}
            delta = compute_alphaedit(model, tokenizer, batch, statistics=stats, hparams=hp, history=history,
                                      bases=bases, keys=keys, threshold=threshold, alpha=alpha)
        elif method == "lifelong":
            keys = {}
            delta = compute_edit(model, tokenizer, batch, method=method, statistics=stats, hparams=hp,
                                 history=history, extras=extras)
        else:
            keys = {}
            delta = compute_edit(model, tokenizer, batch, method=method, statistics=stats, hparams=hp)
        delta.apply(model)
        try:
            history.push(delta, keys, extras=extras)
        except BaseException:
            delta.revert(model)
            raise
        seconds = time.perf_counter() - start
        if save_dir is not None:
            history.save(save_dir)
        if progress:
            print(f"  batch {number}/{len(batches)}: {len(batch)} edits in {seconds:.1f} s "
                  f"({history.num_edits} in all)", file=sys.stderr, flush=True)
        if callback is not None:
            callback(SequentialStep(number, history.num_edits, tuple(batch), delta, seconds, model, history))
    return history


def chain_report(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    method: str = "memit",
    batch_size: int = 100,
    eval_batch_size: int = 32,
    **kwargs: Any,
) -> dict[str, Any]:
    """Edit chains (all hops of a record together) and report multi-hop accuracy before and after.

    The multi-hop accuracy is the consistency rate of ``evaluation.request_evaluation.evaluate_requests``: the
    token accuracy of each request's ``consistency`` answers (the answers implied by the edited hops). The
    model is left edited; the returned ``history`` reverts it.

    Returns:
        ``{"before": metrics, "after": metrics, "history": EditHistory}`` with the metrics dicts of
        ``evaluate_requests`` (``consistency`` is the multi-hop accuracy).

    Raises:
        KeditError: no request carries a consistency prompt (there is nothing to measure).
    """
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests

    if not any(r.consistency for r in requests):
        raise KeditError("no request has consistency prompts (multi-hop questions); chain_report needs them")
    before = evaluate_requests(model, tokenizer, requests, batch_size=eval_batch_size)
    history = edit_sequentially(model, tokenizer, requests, method=method, batch_size=batch_size, chain=True,
                                **kwargs)
    after = evaluate_requests(model, tokenizer, requests, batch_size=eval_batch_size)
    return {"before": before, "after": after, "history": history}
