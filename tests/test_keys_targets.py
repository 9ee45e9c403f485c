"""Keys, subject location, context prefixes and target values on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing import replay as replay_module
from lightning_kedit.editing.hparams import EditHyperParams, HyperParamError
from lightning_kedit.editing.keys import locate_token, subject_char_end, subject_states, template_weights
from lightning_kedit.editing.prefixes import context_templates, generate_prefixes
from lightning_kedit.editing.replay import PREFIX_CACHE_TYPES
from lightning_kedit.editing.targets import compute_target_values
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

REQUESTS = [
    EditRequest("a", "{} plays the", "Toko Yasuda", "Paris", "guitar"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "London", "French"),
    EditRequest("c", "{}, which is located in", "Eiffel Tower", "Rome"),
]
TEMPLATES = ["{}", "The capital. {}", "Apple was founded by. {}"]


def peaky(model_type: str) -> torch.nn.Module:
    """A tiny model whose LM head is scaled up, so that its next-token distributions are far from uniform."""
    model = tiny_model(model_type).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def test_locate_token_last_subject_token(tokenizer):
    text = "Toko Yasuda plays the"
    ids, index = locate_token(tokenizer, text, len("Toko Yasuda"))
    assert ids == tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids[: index + 1]) == "Toko Yasuda"


def test_locate_token_with_bos():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = tiny_tokenizer()
    backend = copy.deepcopy(base.backend_tokenizer)
    bos = base.convert_tokens_to_ids("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    with_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    ids, index = locate_token(with_bos, "Toko Yasuda plays", len("Toko Yasuda"))
    plain_ids, plain_index = locate_token(base, "Toko Yasuda plays", len("Toko Yasuda"))
    assert ids[0] == bos and ids[1:] == plain_ids
    assert index == plain_index + 1


def test_subject_char_end_with_template():
    text, end = subject_char_end(REQUESTS[1], "Hello there. {}")
    assert text == "Hello there. The mother tongue of Danielle Darrieux is"
    assert text[:end].endswith("Danielle Darrieux")


def _naive_states(model, tokenizer, layer, out_layer, weights=None):
    """One prompt at a time, in float64, locating the subject by tokenising the text up to it."""
    weights = weights or [1.0 / len(TEMPLATES)] * len(TEMPLATES)
    model = copy.deepcopy(model).double().eval()
    adapter = ModelAdapter.for_model(model)
    keys, outs = [], []
    for request in REQUESTS:
        k_sum, o_sum = 0.0, 0.0
        for template, weight in zip(TEMPLATES, weights, strict=True):
            text, end = subject_char_end(request, template)
            pos = len(tokenizer(text[:end])["input_ids"]) - 1
            seen: dict[str, torch.Tensor] = {}
            adapter.mlp_out(layer).register_forward_pre_hook(lambda m, a, seen=seen: seen.setdefault("k", a[0]))
            adapter.block(out_layer).register_forward_hook(
                lambda m, a, o, seen=seen: seen.setdefault("o", o[0] if isinstance(o, tuple) else o)
            )
            with torch.no_grad():
                model(input_ids=torch.tensor([tokenizer(text)["input_ids"]]))
            k = seen["k"].reshape(1, -1, seen["k"].shape[-1])
            k_sum = k_sum + weight * k[0, pos]
            o_sum = o_sum + weight * seen["o"][0, pos]
            adapter.mlp_out(layer)._forward_pre_hooks.clear()
            adapter.block(out_layer)._forward_hooks.clear()
        keys.append(k_sum)
        outs.append(o_sum)
    return torch.stack(keys), torch.stack(outs)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_keys_match_naive_float64(model_type, tokenizer):
    model = tiny_model(model_type).eval()
    states = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[1, 2], out_layer=2, batch_size=4)
    keys, outs = _naive_states(model, tokenizer, 1, 2)
    assert states.keys[1].dtype == torch.float64
    torch.testing.assert_close(states.keys[1], keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states.outputs, outs, rtol=1e-4, atol=1e-5)


def test_keys_weighted_by_template_match_naive_float64(tokenizer):
    model = tiny_model("llama").eval()
    weights = template_weights(TEMPLATES, 0.5)
    assert weights == [0.5, 0.25, 0.25]
    states = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[1], out_layer=2, weights=weights)
    keys, outs = _naive_states(model, tokenizer, 1, 2, weights)
    torch.testing.assert_close(states.keys[1], keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states.outputs, outs, rtol=1e-4, atol=1e-5)
    assert template_weights(TEMPLATES, None) is None
    with pytest.raises(KeditError, match="weights"):
        subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[1], weights=[1.0])
    with pytest.raises(HyperParamError, match="bare_weight"):
        EditHyperParams(bare_weight=1.5)


def test_subject_states_empty_requests(tokenizer):
    with pytest.raises(KeditError, match="empty"):
        subject_states(tiny_model("llama"), tokenizer, [], TEMPLATES, key_layers=[1])


def test_prefixes_seeded_and_cached(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    model = tiny_model("llama")
    texts = generate_prefixes(model, tokenizer, 4, 5, seed=3)
    assert len(texts) == 5 and texts == generate_prefixes(model, tokenizer, 4, 5, seed=3)
    assert all(text and "<|endoftext|>" not in text and "{" not in text for text in texts)
    templates = context_templates(model, tokenizer, ((4, 5),), seed=3)
    assert templates[0] == "{}" and len(templates) == 6
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])
    assert list((tmp_path / "prefixes").glob("*.json"))


def _direct_prob(model, tokenizer, request, templates):
    """exp(-mean over templates of the mean token NLL of the target), from full forward passes in float64."""
    model = copy.deepcopy(model).double().eval()
    nlls = []
    for template in templates:
        prompt, _ = subject_char_end(request, template)
        ids = tokenizer(prompt + " " + request.target_new)["input_ids"]
        n_prompt = len(tokenizer(prompt)["input_ids"])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        nlls.append(-torch.stack([logp[i - 1, ids[i]] for i in range(n_prompt, len(ids))]).mean())
    return torch.exp(-torch.stack(nlls).mean())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_target_loss_replay_matches_full_forward(model_type, tokenizer):
    model = peaky(model_type)
    hp = EditHyperParams(layers=(1,), v_steps=1)
    values = compute_target_values(model, tokenizer, REQUESTS, 1, TEMPLATES, hp)
    assert torch.equal(values.delta, torch.zeros_like(values.delta))
    for i, request in enumerate(REQUESTS):
        assert values.prob[i] == pytest.approx(float(_direct_prob(model, tokenizer, request, TEMPLATES)), rel=1e-4)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_targets_raise_probability_and_leave_model(model_type, tokenizer):
    model = peaky(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = EditHyperParams(layers=(2,), v_steps=8, v_lr=0.5, clamp_norm=50.0, kl_factor=0.0, weight_decay=0.0)
    start = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp.replace(v_steps=1)).prob
    values = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp)
    assert (values.prob > start).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_targets_clamp_norm(tokenizer):
    model = peaky("llama")
    hp = EditHyperParams(layers=(2,), v_steps=10, v_lr=5.0, clamp_norm=0.5, weight_decay=0.0)
    values = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp)
    states = subject_states(model, tokenizer, REQUESTS, ["{}"], key_layers=[2], out_layer=2)
    limit = 0.5 * states.outputs.norm(dim=-1)
    assert (values.delta.norm(dim=-1) <= limit * (1 + 1e-4)).all()


def test_targets_early_stop(tokenizer):
    model = peaky("llama")
    values = compute_target_values(
        model, tokenizer, REQUESTS, 2, TEMPLATES, EditHyperParams(layers=(2,), stop_prob=1e-12)
    )
    assert (values.steps == 0).all() and torch.equal(values.delta, torch.zeros_like(values.delta))


def test_targets_batches_are_independent(tokenizer):
    """Splitting the requests into smaller batches (as for a batch too large for memory) changes nothing."""
    model = peaky("llama")
    hp = EditHyperParams(layers=(2,), v_steps=6, stop_prob=0.999, v_bfloat16=False)
    together = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp)
    apart = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp.replace(batch_size=1))
    torch.testing.assert_close(together.delta, apart.delta, rtol=1e-3, atol=1e-4)


def test_targets_empty_requests(tokenizer):
    with pytest.raises(KeditError, match="empty"):
        compute_target_values(tiny_model("llama"), tokenizer, [], 1, TEMPLATES)


@pytest.mark.parametrize(
    ("field", "value"), [("v_lr", 0.0), ("batch_size", 0), ("stop_prob", 1.5), ("layers", ()), ("v_steps", -1)]
)
def test_hparams_validation(field, value):
    with pytest.raises(HyperParamError, match=field):
        EditHyperParams(**{field: value})


def test_hparams_for_model_and_overrides():
    model = tiny_model("gpt2", num_layers=8)
    memit = EditHyperParams.for_model(model, "memit")
    assert memit.layers and max(memit.layers) < 8 and memit.clamp_norm == 0.75
    assert len(EditHyperParams.for_model(model, "rome").layers) == 1
    assert EditHyperParams.for_model(model, "memit", layers=[2, 3]).layers == (2, 3)
    with pytest.raises(HyperParamError, match="unknown"):
        memit.replace(not_a_field=1)
    with pytest.raises(HyperParamError, match="method"):
        EditHyperParams.for_model(model, "magic")
    assert EditHyperParams.from_dict(memit.to_dict()) == memit


def test_targets_bfloat16_autocast_close_to_float32(tokenizer):
    model = peaky("llama")
    hp = EditHyperParams(layers=(2,), v_steps=1)
    exact = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp)
    fast = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp.replace(v_bfloat16=True))
    torch.testing.assert_close(fast.prob, exact.prob, rtol=0.1, atol=0.0)


def _prob_with_delta(model, tokenizer, request, templates, layer, delta):
    """Like _direct_prob, with ``delta`` added to block ``layer``'s output at the subject's last token (float64)."""
    model = copy.deepcopy(model).double().eval()
    adapter = ModelAdapter.for_model(model)
    nlls = []
    for template in templates:
        prompt, end = subject_char_end(request, template)
        ids, subject = locate_token(tokenizer, prompt + " " + request.target_new, end)
        n_prompt = len(tokenizer(prompt)["input_ids"])

        def shift(module, args, output, subject=subject):
            hidden = (output[0] if isinstance(output, tuple) else output).clone()
            hidden[0, subject] += delta.double()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = adapter.block(layer).register_forward_hook(shift)
        try:
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        finally:
            handle.remove()
        nlls.append(-torch.stack([logp[i - 1, ids[i]] for i in range(n_prompt, len(ids))]).mean())
    return float(torch.exp(-torch.stack(nlls).mean()))


@pytest.mark.parametrize("model_type", sorted(PREFIX_CACHE_TYPES))
def test_targets_bfloat16_phase_reports_exact_probability(model_type, tokenizer):
    """The bfloat16 phase is judged again in the model's own arithmetic: the reported probability is exact."""
    model = peaky(model_type)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attention = model.config._attn_implementation
    hp = EditHyperParams(layers=(1,), v_steps=6, v_lr=0.5, clamp_norm=50.0, stop_prob=0.999, v_bfloat16=True)
    values = compute_target_values(model, tokenizer, REQUESTS, 1, TEMPLATES, hp)
    assert torch.isfinite(values.delta).all() and values.delta.abs().sum() > 0
    for i, request in enumerate(REQUESTS):
        exact = _prob_with_delta(model, tokenizer, request, TEMPLATES, 1, values.delta[i])
        assert float(values.prob[i]) == pytest.approx(exact, rel=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config._attn_implementation == attention
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_tail_groups_cover_rows_once_within_waste():
    lengths = torch.tensor([1, 7, 7, 3, 4, 4, 4, 2, 9, 1, 5, 6, 6, 6])
    groups = replay_module.tail_groups(lengths, waste=0.25)
    rows = torch.cat(groups).sort().values
    assert torch.equal(rows, torch.arange(len(lengths)))
    for group in groups:
        width, real = int(lengths[group].max()), int(lengths[group].sum())
        assert len(group) == 1 or width * len(group) <= 1.25 * real
    assert len(replay_module.tail_groups(lengths, waste=0.0)) == len(lengths.unique())
    assert len(replay_module.tail_groups(lengths, waste=10.0)) == 1


@pytest.mark.parametrize("model_type", sorted(PREFIX_CACHE_TYPES))
def test_prefix_cache_matches_full_replay(model_type, tokenizer, monkeypatch):
    """Replaying only the subject and later positions over a cached prefix gives the same δ as replaying all."""
    model = peaky(model_type)
    requests = [*REQUESTS, EditRequest("d", "{} is a", "Apple", "Toyota")]  # subject first: an empty prefix
    hp = EditHyperParams(layers=(1,), v_steps=5, v_lr=0.5, clamp_norm=50.0, stop_prob=0.999, v_bfloat16=False)
    cached = compute_target_values(model, tokenizer, requests, 1, TEMPLATES, hp)
    monkeypatch.setattr(replay_module, "PREFIX_CACHE_TYPES", frozenset())
    full = compute_target_values(model, tokenizer, requests, 1, TEMPLATES, hp)
    assert torch.isfinite(cached.delta).all()
    torch.testing.assert_close(cached.prob, full.prob, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cached.delta, full.delta, rtol=1e-3, atol=1e-5)
