"""Entry points: ``compute_edit`` (atomic: the model is unchanged) and ``edit`` (compute, then apply).

Example:
    >>> from lightning_kedit import bundled_requests, load_model
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> delta = edit(model, tokenizer, bundled_requests(), method="memit")  # doctest: +SKIP
    >>> delta.revert(model)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.models.model_mode import eval_mode
from lightning_kedit.requests import EditRequest

from .delta import EditDelta
from .edit_inputs import auto_edit_layers, resolve_statistics
from .hparams import EditHyperParams, resolve_hparams
from .memit import memit_updates
from .phase_timer import PhaseTimer
from .rome import rome_updates
from .sharded import check_sharded_edit

if TYPE_CHECKING:
    from torch import Tensor

    from .history import EditHistory
    from .target_cache import TargetCache

__all__ = ["compute_edit", "edit"]


def compute_edit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    method: str = "memit",
    layers: Sequence[int] | str | None = None,
    statistics: Any = None,
    hparams: EditHyperParams | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
    target_cache: TargetCache | None = None,
    history: EditHistory | None = None,
    keys: dict[int, Tensor] | None = None,
    extras: dict[str, Tensor] | None = None,
) -> EditDelta:
    """Compute the weight change that writes ``requests`` into ``model``, without changing the model.

    Args:
        model: a causal LM of a supported architecture.
        tokenizer: its tokenizer.
        requests: the facts to write (all in one edit).
        method: ``"memit"``, ``"rome"``, ``"ft"``, ``"alphaedit"`` or ``"lifelong"`` (for sequences of batches
            see :func:`~lightning_kedit.editing.sequential.edit_sequentially`, or pass ``history`` and
            ``keys``/``extras``).
        layers: edit layers; the method's per-architecture default when None; ``"auto"`` measures them by
            causal tracing (:func:`~.edit_inputs.auto_edit_layers`).
        statistics: key statistics (``KeyStatistics``), a statistics file, or None for the cached statistics
            of the bundled corpus (not used by ``"ft"``).
        hparams: hyper-parameters; :meth:`EditHyperParams.for_model` when None (``layers`` overrides theirs).
        progress: print progress to stderr.
        timings: when given, the seconds of each phase (statistics, keys, targets, solve) are added to it.
        target_cache: a :class:`~lightning_kedit.editing.target_cache.TargetCache` to read and store target
            values in (MEMIT, ROME and AlphaEdit), or None to always optimise them.
        history: AlphaEdit only: the earlier batches whose edits the new one must keep.
        keys: AlphaEdit only: filled with the keys written per layer (for ``history.push(delta, keys)``).
        extras: ``"lifelong"`` only: filled with the batch's running-statistics sums (for
            ``history.push(delta, extras=extras)``); ``history`` gives the earlier batches' sums.

    Returns:
        The :class:`EditDelta`; apply it with ``delta.apply(model)``.

    Raises:
        KeditError: empty request list, layers outside the model, statistics for another model or layers,
            or a non-finite result. The model is unchanged in every case, and on a keyboard interrupt.
    """
    requests = list(requests)
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    for request in requests:
        if not isinstance(request, EditRequest):
            raise KeditError(f"requests must be EditRequest objects, got {type(request).__name__}")
    check_sharded_edit(model, method, target_cache, history)
    if isinstance(layers, str):
        layers = auto_edit_layers(model, tokenizer, requests, method, spec=layers)
    if method == "alphaedit":  # MEMIT's pipeline with a null-space projected solve (editing/alphaedit.py)
        from .alphaedit import compute_alphaedit

        return compute_alphaedit(model, tokenizer, requests, layers=layers, statistics=statistics, hparams=hparams,
                                 progress=progress, timings=timings, target_cache=target_cache, history=history,
                                 keys=keys)
    if method == "lifelong":  # one gradient per fact, running statistics, a ridge solve (editing/lifelong.py)
        from .lifelong import compute_lifelong

        if keys is not None:
            raise KeditError("`keys` is AlphaEdit's; method='lifelong' records `extras` instead")
        with eval_mode(model):
            return compute_lifelong(model, tokenizer, requests, hparams=resolve_hparams(model, method, layers, hparams),
                                    statistics=statistics, history=history, extras=extras, timings=timings)
    if history is not None or keys is not None or extras is not None:
        raise KeditError(f"`history`, `keys` and `extras` are sequential methods'; method={method!r} does not use them")
    hp = resolve_hparams(model, method, layers, hparams)
    timer = PhaseTimer()
    ids = [r.case_id for r in requests]
    with eval_mode(model):
        if method == "ft":
            from .finetune import compute_finetune_delta

            with timer.phase("solve"):
                delta = compute_finetune_delta(
                    model, tokenizer, requests, layer=hp.layers[0], steps=hp.ft_steps, lr=hp.ft_lr,
                    linf_bound=hp.ft_norm_bound, batch_size=hp.batch_size,
                )
        else:
            with timer.phase("statistics"):
                stats = resolve_statistics(model, tokenizer, hp.layers, statistics, progress=progress)
            solve = memit_updates if method == "memit" else rome_updates
            factors, _ = solve(
                model, tokenizer, requests, stats, hp, timer=timer, progress=progress, target_cache=target_cache
            )
            with timer.phase("solve"):
                delta = EditDelta.from_model(
                    model, factors, method=method, hparams=hp.to_dict(), request_ids=ids, tokenizer=tokenizer
                )
    timer.add_to(timings)
    return delta


def edit(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], **kwargs: Any
) -> EditDelta:
    """:func:`compute_edit`, then apply the delta to ``model``; returns it (``delta.revert(model)`` undoes it).

    Example:
        >>> delta = edit(model, tokenizer, requests, method="rome")  # doctest: +SKIP
    """
    timings = kwargs.get("timings")
    timer = PhaseTimer()
    delta = compute_edit(model, tokenizer, requests, **kwargs)
    with timer.phase("apply"):
        delta.apply(model)
    timer.add_to(timings)
    return delta
