"""FT-L baseline: one Adam step against an independently computed gradient, the bound, and an untouched model."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing.finetune import compute_finetune_delta
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

REQUESTS = [
    EditRequest("0", "{} plays the", "Toko Yasuda", "piano"),
    EditRequest("1", "{} is located in", "The Eiffel Tower", "Rome"),
    EditRequest("2", "The mother tongue of {} is", "Danielle Darrieux", "English"),
]


def _reference_loss(model: torch.nn.Module, requests=REQUESTS) -> torch.Tensor:
    """Mean over requests of the mean NLL of the answer tokens, one unpadded forward per request."""
    tokenizer = tiny_tokenizer()
    losses = []
    for request in requests:
        context = tokenizer(request.prompt_text)["input_ids"]
        answer = tokenizer(" " + request.target_new)["input_ids"]
        ids = torch.tensor([context + answer])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        token_nll = -log_probs.gather(-1, ids[0, 1:, None])[:, 0]
        losses.append(token_nll[len(context) - 1 :].mean())
    return torch.stack(losses).mean()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_step_is_the_clamped_adam_step_of_the_independent_gradient(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter.for_model(model)
    lr, bound = 1e-2, 6e-3
    delta = compute_finetune_delta(model, tiny_tokenizer(), REQUESTS, layer=1, steps=1, lr=lr, linf_bound=bound,
                                   batch_size=2, min_loss=0.0)
    assert delta.method == "ft" and delta.layers == [1] and delta.update(1).rank is None
    assert delta.request_ids == ("0", "1", "2")

    reference = copy.deepcopy(model)
    weight = ModelAdapter.for_model(reference).weight(1)
    _reference_loss(reference).backward()
    grad = adapter.from_stored_layout(weight.grad).double()
    # Adam's first step is lr * g / (|g| + eps); the L∞ clamp then cuts it to the bound.
    expected = (-lr * grad / (grad.abs() + 1e-8)).clamp(-bound, bound)
    change = delta.update(1).dense()
    assert change.abs().max() <= bound * (1 + 1e-6)
    clear = grad.abs() > 1e-5
    assert clear.float().mean() > 0.5
    torch.testing.assert_close(change[clear], expected[clear], rtol=0, atol=1e-7)


def test_batching_does_not_change_the_result_and_the_model_is_left_untouched():
    model = tiny_model("gpt2").train()
    before = _state(model)
    kwargs = dict(layer=2, steps=2, lr=1e-3, linf_bound=1e-2, min_loss=0.0)
    one = compute_finetune_delta(model, tiny_tokenizer(), REQUESTS, batch_size=1, **kwargs)
    all_ = compute_finetune_delta(model, tiny_tokenizer(), REQUESTS, batch_size=3, **kwargs)
    torch.testing.assert_close(one.update(2).dense(), all_.update(2).dense(), rtol=0, atol=1e-6)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_applying_the_delta_lowers_the_target_nll(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        before = float(_reference_loss(model))
    delta = compute_finetune_delta(model, tiny_tokenizer(), REQUESTS, steps=8, lr=2e-2, linf_bound=5e-2)
    assert delta.layers == [ModelAdapter.for_model(model).default_layers()[1]]
    with delta.applied(model), torch.no_grad():
        after = float(_reference_loss(model))
    assert after < before - 0.05


def test_bfloat16_model():
    model = tiny_model("llama", dtype=torch.bfloat16)
    before = _state(model)
    delta = compute_finetune_delta(model, tiny_tokenizer(), REQUESTS[:1], layer=0, steps=2, lr=1e-2,
                                   linf_bound=1e-2)
    assert torch.isfinite(delta.update(0).dense()).all() and delta.update(0).dense().abs().max() > 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with delta.applied(model):
        assert ModelAdapter.for_model(model).weight(0).dtype == torch.bfloat16


def test_bad_arguments_are_refused():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(KeditError, match="empty"):
        compute_finetune_delta(model, tokenizer, [])
    with pytest.raises(ValueError, match="`steps`"):
        compute_finetune_delta(model, tokenizer, REQUESTS, steps=0)
    with pytest.raises(ValueError, match="`linf_bound`"):
        compute_finetune_delta(model, tokenizer, REQUESTS, linf_bound=0.0)
    with pytest.raises(ValueError, match="outside"):
        compute_finetune_delta(model, tokenizer, REQUESTS, layer=9)


@pytest.mark.integration
def test_smollm2_ft_raises_the_new_targets_probability_and_leaves_the_model_alone(smollm2):
    from lightning_kedit.evaluation.scoring import answer_nll
    from lightning_kedit.requests import bundled_requests

    model, tokenizer = smollm2
    requests = bundled_requests()[:3]
    prompts, targets = [r.prompt_text for r in requests], [r.target_new for r in requests]
    before = answer_nll(model, tokenizer, prompts, targets)
    state = _state(model)
    delta = compute_finetune_delta(model, tokenizer, requests, steps=3, lr=5e-3, linf_bound=1e-2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert float(delta.update(delta.layers[0]).dense().abs().max()) <= 1e-2 * (1 + 1e-6)
    with delta.applied(model):
        after = answer_nll(model, tokenizer, prompts, targets)
    assert (after < before - 0.5).all(), (before, after)
