"""ROME on tiny models: the averaged key is mapped exactly to W k + δ, sequential requests, bad input."""

from __future__ import annotations

import pytest
import torch
from test_memit import REQUESTS, TEMPLATES, hparams, identical, peaky, snapshot, statistics_for

from lightning_kedit.editing import compute_edit, rome
from lightning_kedit.editing.hparams import HyperParamError
from lightning_kedit.editing.keys import subject_states
from lightning_kedit.models.adapters import ModelAdapter


def _outputs(model, layer, keys):
    adapter = ModelAdapter.for_model(model)
    weight = adapter.from_stored_layout(adapter.weight(layer).detach()).double()
    return keys @ weight.T


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_rome_writes_the_averaged_key_exactly(model_type, tokenizer):
    """(W + Δ) k̄ = W k̄ + δ for the same prefix-averaged key k̄ used to compute Δ (Linear and Conv1D)."""
    model = peaky(model_type)
    before = snapshot(model)
    request = REQUESTS[:1]
    factors, values = rome.rome_updates(model, tokenizer, request, statistics_for(model, [2]), hparams((2,)),
                                        templates=TEMPLATES)
    assert identical(model, before)
    assert factors[2].rank == 1
    key = subject_states(model, tokenizer, request, TEMPLATES, key_layers=[2]).keys[2]
    wanted = _outputs(model, 2, key) + values.delta
    adapter = ModelAdapter.for_model(model)
    edited = adapter.from_stored_layout(adapter.weight(2).detach()).double() + factors[2].dense()
    torch.testing.assert_close(key @ edited.T, wanted, rtol=1e-6, atol=1e-7)


def test_rome_delta_applies_and_reverts(tokenizer):
    model = peaky("llama")
    before = snapshot(model)
    delta = compute_edit(model, tokenizer, REQUESTS[:1], method="rome", hparams=hparams((2,)),
                         statistics=statistics_for(model, [2]))
    assert delta.method == "rome" and delta.layers == [2] and identical(model, before)
    with delta.applied(model):
        assert not identical(model, before)
    assert identical(model, before)


def test_rome_sequential_requests_sum_rank_one_updates(tokenizer):
    model = peaky("llama")
    stats = statistics_for(model, [2])
    factors, values = rome.rome_updates(model, tokenizer, REQUESTS, stats, hparams((2,)), templates=TEMPLATES)
    assert factors[2].rank == len(REQUESTS)
    keys = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[2]).keys[2]
    adapter = ModelAdapter.for_model(model)
    weight = adapter.from_stored_layout(adapter.weight(2).detach()).double()
    edited = weight + factors[2].dense()
    # The last request is written exactly on top of the earlier ones.
    torch.testing.assert_close(keys[-1] @ edited.T, keys[-1] @ weight.T + values.delta[-1], rtol=1e-5, atol=1e-6)


def test_rome_refuses_several_layers(tokenizer):
    model = peaky("llama")
    with pytest.raises(HyperParamError, match="one layer"):
        compute_edit(model, tokenizer, REQUESTS, method="rome", hparams=hparams((1, 2)),
                     statistics=statistics_for(model, [1, 2]))
