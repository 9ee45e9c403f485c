"""MEMIT: many facts written at once over several layers (Meng et al., 2023, Algorithm 1).

For the last edit layer ``L`` the target hidden states ``z = h + δ`` come from :mod:`.targets`. Then, for
each edit layer ``l`` in order:

1. keys ``K`` (the projection input at the subject's last token, prefix-averaged) and the current hidden
   states ``h`` at ``L`` are measured with the updates of the earlier layers in place;
2. the residual ``R = (z − h) / (layers left)`` is spread over the layers still to update;
3. ``Δ_l = R Kᵀ (λ C + K Kᵀ)⁻¹`` (eq. 14) is solved in float64 by :func:`~.solvers.memit_factors`.

The earlier layers' updates are written into the model only inside a ``try/finally`` that restores the exact
original weights, whatever happens (an exception, a keyboard interrupt): the caller gets factors and the
model as it was.

Example:
    >>> factors = memit_updates(model, tokenizer, requests, statistics, hparams)  # doctest: +SKIP
    >>> sorted(factors)  # doctest: +SKIP
    [4, 5, 6, 7, 8]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

from .edit_inputs import check_statistics
from .hparams import EditHyperParams
from .keys import subject_states, template_weights
from .phase_timer import PhaseTimer
from .prefixes import context_templates  # noqa: F401 - callers read memit.context_templates
from .sharded import edit_templates
from .solvers import LowRankUpdate, memit_factors, spread_residuals
from .target_values import TargetValues
from .targets import NonFiniteEditError, compute_target_values
from .weight_edits import add_to_weight, temporary_updates

if TYPE_CHECKING:
    from .target_cache import TargetCache

__all__ = ["memit_updates", "scaled_second_moment"]


def scaled_second_moment(statistics: object, layer: int, relative: bool) -> torch.Tensor:
    """``C`` of ``layer`` in float64; divided by its mean diagonal when ``relative`` (λ then has no units)."""
    c = statistics.second_moment(layer).to(torch.float64)  # type: ignore[attr-defined]
    return c / c.diagonal().mean().clamp_min(1e-30) if relative else c


def memit_updates(
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
    """The MEMIT factors ``U Vᵀ`` per edit layer, and the target values they were fitted to.

    The model is unchanged when this returns or raises.
    """
    adapter = ModelAdapter.for_model(model)
    layers = adapter.check_layers(list(hparams.layers))
    check_statistics(statistics, adapter, layers)
    timer = timer or PhaseTimer()
    last = layers[-1]
    with timer.phase("prefixes"):
        templates = list(templates) if templates is not None else edit_templates(
            model, tokenizer, hparams.prefix_lengths, hparams.seed
        )
    weights = template_weights(templates, hparams.bare_weight)
    with timer.phase("keys"):
        states = subject_states(model, tokenizer, requests, templates, key_layers=[layers[0]], out_layer=last,
                                weights=weights)
    with timer.phase("targets"):
        values = compute_target_values(
            model, tokenizer, requests, last, templates, hparams, progress=progress, target_cache=target_cache
        )
    assert states.outputs is not None
    z = states.outputs + values.delta
    factors: dict[int, LowRankUpdate] = {}
    with temporary_updates(adapter, layers):
        for i, layer in enumerate(layers):
            if i > 0:
                with timer.phase("keys"):
                    states = subject_states(
                        model, tokenizer, requests, templates, key_layers=[layer], out_layer=last, weights=weights
                    )
            assert states.outputs is not None
            with timer.phase("solve"):
                residuals = spread_residuals(z, states.outputs, len(layers) - i)
                c = scaled_second_moment(statistics, layer, hparams.lambda_relative)
                update = memit_factors(states.keys[layer], residuals, c, hparams.mom2_weight)
                if not (torch.isfinite(update.u).all() and torch.isfinite(update.v).all()):
                    raise NonFiniteEditError(f"the MEMIT update of layer {layer} is not finite")
                factors[layer] = update
            if i + 1 < len(layers):
                add_to_weight(adapter, layer, update.dense())
    return factors, values
