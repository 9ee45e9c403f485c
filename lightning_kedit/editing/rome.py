"""ROME: a rank-one update of one layer's MLP projection per fact (Meng et al., 2022, eq. 2).

For each request, the key ``k`` is the projection input at the subject's last token averaged over the
context-prefixed prompts, and the wanted output is ``v* = W₀ k + δ`` where ``δ`` is the optimised change of the
layer's output (:mod:`.targets`). The update ``Δ = (v* − W k)(C⁻¹k)ᵀ / (kᵀC⁻¹k)`` uses that same averaged key
in the residual and in the direction ``C⁻¹k``, so that ``(W + Δ) k = v*`` exactly (the original code mixed a
single-prompt key with the averaged one).

Several requests are written one after another, each update computed on the weight that the previous ones
gave (the keys of the edited layer do not depend on its own projection, so they are measured once). All the
arithmetic runs on a float64 copy of the weight: the model is never written.

Example:
    >>> factors, values = rome_updates(model, tokenizer, [request], statistics, hparams)  # doctest: +SKIP
    >>> factors[5].rank  # doctest: +SKIP
    1
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.sharding import full_weight
from lightning_kedit.requests import EditRequest

from .edit_inputs import check_statistics
from .hparams import EditHyperParams, HyperParamError
from .keys import subject_states, template_weights
from .phase_timer import PhaseTimer
from .sharded import edit_templates
from .solvers import LowRankUpdate, rome_factors
from .target_values import TargetValues
from .targets import NonFiniteEditError, compute_target_values

if TYPE_CHECKING:
    from .target_cache import TargetCache

__all__ = ["rome_updates"]


def rome_updates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    statistics: object,
    hparams: EditHyperParams,
    *,
    templates: Sequence[str] | None = None,
    timer: PhaseTimer | None = None,
    progress: bool = False,
    target_cache: TargetCache | None = None,
) -> tuple[dict[int, LowRankUpdate], TargetValues]:
    """The summed rank-one factors (rank = number of requests) for the single layer of ``hparams.layers``."""
    if len(hparams.layers) != 1:
        raise HyperParamError(f"ROME edits exactly one layer, got `layers`={list(hparams.layers)}")
    adapter = ModelAdapter.for_model(model)
    (layer,) = adapter.check_layers(list(hparams.layers))
    check_statistics(statistics, adapter, [layer])
    timer = timer or PhaseTimer()
    with timer.phase("prefixes"):
        templates = list(templates) if templates is not None else edit_templates(
            model, tokenizer, hparams.prefix_lengths, hparams.seed
        )
    with timer.phase("keys"):
        weights = template_weights(templates, hparams.bare_weight)
        keys = subject_states(model, tokenizer, requests, templates, key_layers=[layer], weights=weights).keys[layer]
    with timer.phase("targets"):
        values = compute_target_values(
            model, tokenizer, requests, layer, templates, hparams, progress=progress, target_cache=target_cache
        )
    with timer.phase("solve"):
        second_moment = statistics.second_moment(layer).to(torch.float64)  # type: ignore[attr-defined]
        weight = adapter.from_stored_layout(full_weight(adapter.weight(layer)).detach()).to("cpu", torch.float64)
        wanted = keys @ weight.T + values.delta  # v* = W₀ k + δ, one row per request
        us, vs = [], []
        for j in range(len(requests)):
            step = rome_factors(weight, keys[j], wanted[j], second_moment)
            weight = weight + step.dense()
            us.append(step.u)
            vs.append(step.v)
        update = LowRankUpdate(u=torch.cat(us, dim=1), v=torch.cat(vs, dim=1))
        if not (torch.isfinite(update.u).all() and torch.isfinite(update.v).all()):
            raise NonFiniteEditError(f"the ROME update of layer {layer} is not finite")
    return {layer: update}, values
