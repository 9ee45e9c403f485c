"""On every supported architecture, an edit moves the hidden state at its insertion layer to the target value.

MEMIT and ROME solve for a change of the MLP projection's output and assume it is the change of the residual
stream (the block's output). Each test below computes the update on a tiny model of one architecture and checks,
with the update applied, the hidden state the method aimed at: MEMIT's target ``z = h + δ`` (one layer, λ → 0,
fewer keys than the key size: reached exactly) and ROME's ``(W + Δ) k = v*`` plus the same hidden state. An
architecture whose layout breaks that assumption (a norm between the MLP and the residual) must be refused with
an error naming its model type instead.
"""

from __future__ import annotations

import pytest
import torch
from test_memit import REQUESTS, TEMPLATES, hparams, peaky, statistics_for
from tiny_models import ARCHITECTURES, tiny_tokenizer

from lightning_kedit.editing import memit, rome, weight_edits
from lightning_kedit.editing.keys import subject_states
from lightning_kedit.editing.targets import compute_target_values
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter, UnsupportedModelError

LAYER = 2
#: Model types whose MLP output passes through a norm before it joins the residual stream.
POST_MLP_NORM = {"gemma2", "gemma3_text"}


def _hidden(model, tokenizer):
    return subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[LAYER], out_layer=LAYER)


def _refused(model_type: str, method) -> None:
    with pytest.raises(KeditError, match=model_type) as caught:
        method()
    assert isinstance(caught.value, UnsupportedModelError) and "post_feedforward_layernorm" in str(caught.value)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_memit_reaches_the_target_hidden_state(model_type):
    tokenizer = tiny_tokenizer()
    model = peaky(model_type)
    hp = hparams((LAYER,), mom2_weight=1e-8)
    stats = statistics_for(model, [LAYER])
    run = lambda: memit.memit_updates(model, tokenizer, REQUESTS, stats, hp, templates=TEMPLATES)  # noqa: E731
    if model_type in POST_MLP_NORM:
        _refused(model_type, run)
        return
    before = _hidden(model, tokenizer).outputs
    factors, values = run()
    adapter = ModelAdapter.for_model(model)
    with weight_edits.temporary_updates(adapter, [LAYER]):
        weight_edits.add_to_weight(adapter, LAYER, factors[LAYER].dense())
        after = _hidden(model, tokenizer).outputs
    target = before + values.delta
    # Relative to the size of the move: the residual MEMIT solved for is reached.
    error = (after - target).norm(dim=-1) / values.delta.norm(dim=-1)
    assert (error < 1e-3).all(), f"{model_type}: relative error {error.tolist()}"


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_rome_hits_its_key_value_and_the_target_hidden_state(model_type):
    tokenizer = tiny_tokenizer()
    model = peaky(model_type)
    hp = hparams((LAYER,))
    stats = statistics_for(model, [LAYER])
    requests = REQUESTS[:1]
    run = lambda: rome.rome_updates(model, tokenizer, requests, stats, hp, templates=TEMPLATES)  # noqa: E731
    if model_type in POST_MLP_NORM:
        _refused(model_type, run)
        return
    states = subject_states(model, tokenizer, requests, TEMPLATES, key_layers=[LAYER], out_layer=LAYER)
    factors, values = run()
    adapter = ModelAdapter.for_model(model)
    weight = adapter.from_stored_layout(adapter.weight(LAYER).detach()).double()
    key = states.keys[LAYER][0]
    wanted = weight @ key + values.delta[0]
    # The rank-one update maps the key to v* = W k + δ exactly (float64 arithmetic).
    torch.testing.assert_close((weight + factors[LAYER].dense()) @ key, wanted, rtol=1e-9, atol=1e-9)
    with weight_edits.temporary_updates(adapter, [LAYER]):
        weight_edits.add_to_weight(adapter, LAYER, factors[LAYER].dense())
        after = subject_states(model, tokenizer, requests, TEMPLATES, key_layers=[LAYER], out_layer=LAYER).outputs
    error = (after - (states.outputs + values.delta)).norm(dim=-1) / values.delta.norm(dim=-1)
    assert (error < 1e-3).all(), f"{model_type}: relative error {error.tolist()}"


@pytest.mark.parametrize("model_type", sorted(POST_MLP_NORM))
def test_target_values_are_refused_before_any_optimisation(model_type):
    model, tokenizer = peaky(model_type), tiny_tokenizer()
    _refused(model_type, lambda: compute_target_values(model, tokenizer, REQUESTS, LAYER, TEMPLATES,
                                                        hparams((LAYER,))))


def test_opt_with_norm_after_the_residual_is_refused():
    model, tokenizer = peaky("opt"), tiny_tokenizer()
    model.config.do_layer_norm_before = False
    for layer in model.model.decoder.layers:
        layer.do_layer_norm_before = False
    with pytest.raises(UnsupportedModelError, match="opt.*do_layer_norm_before"):
        compute_target_values(model, tokenizer, REQUESTS, LAYER, TEMPLATES, hparams((LAYER,)))
