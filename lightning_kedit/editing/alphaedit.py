"""AlphaEdit: MEMIT's multi-layer edit with every update projected onto the null space of preserved keys.

AlphaEdit (Fang et al., 2025) keeps MEMIT's pipeline: the same target hidden states ``z = h + δ`` at the last
edit layer (:mod:`.targets`), the same keys, the same spreading of the residual ``(z − h) / (layers left)``
over the edit layers. Only the solve differs (:mod:`.nullspace`): each layer's update is restricted to the
directions that the keys of ordinary text never take (the eigenvectors of ``C`` holding the smallest
``threshold`` of the keys' energy), so that the outputs for those keys do not move, and it also keeps the
outputs of the keys of every earlier AlphaEdit batch recorded in an :class:`~.history.EditHistory`. That is
what lets edits accumulate: MEMIT's ``λ C`` term only discourages changes on ordinary keys, and sequential
MEMIT updates disturb earlier ones.

Three knobs, besides MEMIT's hyper-parameters (``hparams.extra``, filled by ``EditHyperParams.for_model``):

- ``threshold`` (default ``0.5``): the share of the preserved keys' energy the null space may hold
  (``nullspace_rule="energy"``; ``"eigenvalue"`` reads it relative to the largest eigenvalue, as the paper's
  code does). Smaller keeps fewer directions, but on a small model whose keys fill their space that forces
  large updates through directions the edit keys barely use (docs/editing-that-lasts.md).
- ``preserve_weight`` (default: MEMIT's ``mom2_weight``, on the same ``C``, relative when ``lambda_relative``):
  ``λ₀`` of a ``λ₀ C`` term inside the null space, so that the directions ordinary keys still use a little are
  weighted by how much they use them, as in MEMIT. ``0`` is the paper's solve.
- ``alpha`` (default ``1.0``): the weight of ``‖Δ‖²``, relative to the mean diagonal of ``C``, which makes one
  value transfer across layers whose key scales differ. Larger gives smaller, less exact updates.

Example:
    >>> delta = compute_alphaedit(model, tokenizer, requests, history=history)  # doctest: +SKIP
    >>> delta.method  # doctest: +SKIP
    'alphaedit'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.model_mode import eval_mode
from lightning_kedit.requests import EditRequest

from .delta import EditDelta
from .edit_inputs import check_statistics, resolve_statistics
from .history import EditHistory
from .hparams import (
    DEFAULT_ALPHA,
    DEFAULT_NULLSPACE_RULE,
    DEFAULT_NULLSPACE_THRESHOLD,
    EditHyperParams,
    HyperParamError,
    resolve_hparams,
)
from .keys import subject_states, template_weights
from .memit import scaled_second_moment
from .nullspace import NULL_SPACE_RULES, alphaedit_factors, null_space_basis
from .phase_timer import PhaseTimer
from .sharded import edit_templates
from .solvers import LowRankUpdate, spread_residuals
from .target_values import TargetValues
from .targets import NonFiniteEditError, compute_target_values
from .weight_edits import add_to_weight, temporary_updates

if TYPE_CHECKING:
    from .target_cache import TargetCache

__all__ = ["DEFAULT_ALPHA", "DEFAULT_THRESHOLD", "alphaedit_updates", "compute_alphaedit", "null_space_bases"]

#: The null space's share of the preserved keys' energy (``rule="energy"``); the default of
#: ``EditHyperParams.for_model(model, "alphaedit").extra["nullspace_threshold"]``.
DEFAULT_THRESHOLD = DEFAULT_NULLSPACE_THRESHOLD


def null_space_bases(
    statistics: Any, layers: Sequence[int], threshold: float = DEFAULT_THRESHOLD, rule: str = DEFAULT_NULLSPACE_RULE
) -> dict[int, Tensor]:
    """The null-space basis ``Û`` of each layer's preserved-key second moment (see :func:`null_space_basis`).

    Computing them once and passing them to every batch of a sequence saves one eigendecomposition per layer
    and batch.
    """
    return {
        layer: null_space_basis(statistics.second_moment(layer).to(torch.float64), threshold=threshold, rule=rule)
        for layer in layers
    }


def _check_options(
    threshold: float, alpha: float, rule: str = DEFAULT_NULLSPACE_RULE, preserve_weight: float = 0.0
) -> None:
    if not preserve_weight >= 0:
        raise HyperParamError(f"`preserve_weight` must be >= 0, got {preserve_weight}")
    if rule not in NULL_SPACE_RULES:
        raise HyperParamError(f"`nullspace_rule`={rule!r} is not one of {', '.join(NULL_SPACE_RULES)}")
    if not 0 < threshold <= 1:
        raise HyperParamError(f"`threshold` must lie in (0, 1] (a share of the {rule}), got {threshold}")
    if not alpha > 0:
        raise HyperParamError(f"`alpha` must be > 0, got {alpha}")


def alphaedit_updates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    statistics: Any,
    hparams: EditHyperParams,
    *,
    history: EditHistory | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    alpha: float = DEFAULT_ALPHA,
    bases: Mapping[int, Tensor] | None = None,
    timer: PhaseTimer | None = None,
    rule: str = DEFAULT_NULLSPACE_RULE,
    preserve_weight: float = 0.0,
    progress: bool = False,
    target_cache: TargetCache | None = None,
) -> tuple[dict[int, LowRankUpdate], dict[int, Tensor], TargetValues]:
    """The AlphaEdit factors per edit layer, the keys written at each layer, and the target values.

    Args:
        model: the model, as the previous batches left it (unchanged when this returns or raises).
        tokenizer: its tokenizer.
        requests: the facts of this batch.
        statistics: key statistics of the *unedited* model for ``hparams.layers`` (they define ``P``).
        hparams: MEMIT's hyper-parameters (layers, target optimisation); ``mom2_weight`` is not used.
        history: earlier batches whose keys' outputs must be kept (``K_p``); None for none.
        threshold: the null space's threshold, read by ``rule`` (:func:`~.nullspace.null_space_basis`).
        alpha: weight of ``‖Δ‖²`` relative to ``mean(diag C)``.
        bases: precomputed null-space bases per layer (:func:`null_space_bases` with the same threshold).
        timer: accumulates seconds per phase.
        rule: how ``threshold`` is read: "energy" or "eigenvalue".
        preserve_weight: ``λ₀ ≥ 0``; adds MEMIT's ``λ₀ ‖Δ K₀‖²`` (``λ₀ C``) inside the null space, so that the
            directions ordinary keys still use a little are also weighted by how much they use them. 0 is the
            paper's AlphaEdit.
        progress: print the target optimisation's progress.
        target_cache: where target values are looked up and stored (none when None).
    """
    _check_options(threshold, alpha, rule, preserve_weight)
    adapter = ModelAdapter.for_model(model)
    layers = adapter.check_layers(list(hparams.layers))
    check_statistics(statistics, adapter, layers)
    timer = timer or PhaseTimer()
    last = layers[-1]
    with timer.phase("prefixes"):
        templates = edit_templates(model, tokenizer, hparams.prefix_lengths, hparams.seed)
    weights = template_weights(templates, hparams.bare_weight)
    with timer.phase("keys"):
        states = subject_states(model, tokenizer, requests, templates, key_layers=[layers[0]], out_layer=last,
                                weights=weights)
    with timer.phase("targets"):
        values = compute_target_values(model, tokenizer, requests, last, templates, hparams, progress=progress,
                                       target_cache=target_cache)
    with timer.phase("nullspace"):
        missing = [layer for layer in layers if bases is None or layer not in bases]
        found = dict(bases or {})
        found.update(null_space_bases(statistics, missing, threshold, rule))
    assert states.outputs is not None
    z = states.outputs + values.delta
    factors: dict[int, LowRankUpdate] = {}
    keys: dict[int, Tensor] = {}
    with temporary_updates(adapter, layers):
        for i, layer in enumerate(layers):
            if i > 0:
                with timer.phase("keys"):
                    states = subject_states(model, tokenizer, requests, templates, key_layers=[layer], out_layer=last,
                                            weights=weights)
            assert states.outputs is not None
            with timer.phase("solve"):
                residuals = spread_residuals(z, states.outputs, len(layers) - i)
                scale = float(statistics.second_moment(layer).to(torch.float64).diagonal().mean())
                previous = history.gram(layer) if history is not None else None
                if preserve_weight > 0:
                    # min ‖ΔK₁ − R‖² + ‖ΔK_p‖² + λ₀ n ‖ΔK₀/√n‖² + α‖Δ‖² with Δ = ΓÛᵀ: C joins K_pK_pᵀ (eq. 10).
                    weighted = preserve_weight * scaled_second_moment(statistics, layer, hparams.lambda_relative)
                    previous = weighted if previous is None else previous + weighted
                update = alphaedit_factors(
                    states.keys[layer], residuals, found[layer], alpha=alpha * scale, previous_gram=previous
                )
                if not (torch.isfinite(update.u).all() and torch.isfinite(update.v).all()):
                    raise NonFiniteEditError(f"the AlphaEdit update of layer {layer} is not finite")
                factors[layer] = update
                keys[layer] = states.keys[layer]
            if i + 1 < len(layers):
                add_to_weight(adapter, layer, update.dense())
    return factors, keys, values


def compute_alphaedit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    layers: Sequence[int] | None = None,
    statistics: Any = None,
    hparams: EditHyperParams | None = None,
    history: EditHistory | None = None,
    threshold: float | None = None,
    alpha: float | None = None,
    bases: Mapping[int, Tensor] | None = None,
    keys: dict[int, Tensor] | None = None,
    progress: bool = False,
    timings: dict[str, float] | None = None,
    target_cache: TargetCache | None = None,
) -> EditDelta:
    """Compute the AlphaEdit delta of ``requests`` without changing ``model`` (``compute_edit(method="alphaedit")``).

    Args:
        model: the model, as the previous batches of ``history`` left it.
        tokenizer: its tokenizer.
        requests: the facts to write.
        layers: edit layers (MEMIT's defaults when None).
        statistics: key statistics of the unedited model, a statistics file, or None for the cached ones.
        hparams: MEMIT's hyper-parameters (``EditHyperParams.for_model(model, "alphaedit")`` when None);
            ``hparams.extra`` may hold ``nullspace_threshold``, ``nullspace_rule``, ``alpha`` and
            ``preserve_weight`` (:func:`alphaedit_updates`).
        history: earlier AlphaEdit batches whose edits must be kept.
        threshold: the null space's threshold (:data:`DEFAULT_THRESHOLD` when None; read by ``hparams.extra``'s
            ``nullspace_rule``, "energy" by default).
        alpha: relative weight of ``‖Δ‖²`` (:data:`DEFAULT_ALPHA` when None).
        bases: precomputed null-space bases (:func:`null_space_bases`).
        keys: when given, filled with the keys written per layer (for ``history.push(delta, keys)``).
        progress: print progress to stderr.
        timings: when given, filled with seconds per phase.
        target_cache: a :class:`~.target_cache.TargetCache` for the target values, or None.

    Returns:
        The :class:`EditDelta` (method ``"alphaedit"``; threshold and alpha recorded in its hyper-parameters).

    Example:
        >>> found: dict = {}
        >>> delta = compute_alphaedit(model, tokenizer, requests, history=history, keys=found)  # doctest: +SKIP
        >>> delta.apply(model); history.push(delta, found)  # doctest: +SKIP
    """
    requests = list(requests)
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    if not all(isinstance(r, EditRequest) for r in requests):
        raise KeditError("requests must be EditRequest objects")
    hp = resolve_hparams(model, "alphaedit", layers, hparams)
    threshold = float(threshold if threshold is not None else hp.extra.get("nullspace_threshold", DEFAULT_THRESHOLD))
    alpha = float(alpha if alpha is not None else hp.extra.get("alpha", DEFAULT_ALPHA))
    rule = str(hp.extra.get("nullspace_rule", DEFAULT_NULLSPACE_RULE))
    preserve_weight = float(hp.extra.get("preserve_weight", hp.mom2_weight))
    _check_options(threshold, alpha, rule, preserve_weight)
    timer = PhaseTimer()
    with eval_mode(model):
        with timer.phase("statistics"):
            stats = resolve_statistics(model, tokenizer, hp.layers, statistics, progress=progress)
        factors, written, _ = alphaedit_updates(
            model, tokenizer, requests, stats, hp, history=history, threshold=threshold, alpha=alpha, rule=rule,
            preserve_weight=preserve_weight, bases=bases, timer=timer, progress=progress, target_cache=target_cache,
        )
        with timer.phase("solve"):
            delta = EditDelta.from_model(
                model, factors, method="alphaedit",
                hparams={**hp.to_dict(), "nullspace_threshold": threshold, "nullspace_rule": rule, "alpha": alpha,
                         "preserve_weight": preserve_weight,
                         "previous_edits": history.num_edits if history is not None else 0},
                request_ids=[r.case_id for r in requests], tokenizer=tokenizer,
            )
    if keys is not None:
        keys.update(written)
    timer.add_to(timings)
    return delta
