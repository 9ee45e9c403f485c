"""The field's zsRE measures: teacher-forced argmax tokens against a naive one-position-at-a-time loop."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.field_metrics import argmax_tokens, field_scores, locality_tokens, token_agreement
from lightning_kedit.evaluation.scoring import answer_token_accuracy, encode_pairs

PROMPTS = ["Toko Yasuda plays the", "The capital of Italy is"]
ANSWERS = ["guitar", "Rome"]


def test_argmax_tokens_match_a_naive_prefix_loop_and_give_the_token_accuracy():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    got = argmax_tokens(model, tok, PROMPTS, ANSWERS)
    for (ids, context), tokens in zip(encode_pairs(tok, PROMPTS, ANSWERS), got, strict=True):
        naive = []
        for t in range(context, len(ids)):  # one forward per answer token, on the gold prefix only
            with torch.no_grad():
                naive.append(int(model(input_ids=torch.tensor([ids[:t]])).logits[0, -1].argmax()))
        assert tokens.tolist() == naive
    gold = [torch.tensor(ids[context:]) for ids, context in encode_pairs(tok, PROMPTS, ANSWERS)]
    expected = answer_token_accuracy(model, tok, PROMPTS, ANSWERS).mean().item()
    assert token_agreement(got, gold) == pytest.approx(expected, abs=1e-12)


def test_locality_is_agreement_with_the_unedited_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = argmax_tokens(model, tok, PROMPTS, ANSWERS)
    assert token_agreement(argmax_tokens(model, tok, PROMPTS, ANSWERS), before) == 1.0
    other = tiny_model("llama", seed=3)
    assert token_agreement(argmax_tokens(other, tok, PROMPTS, ANSWERS), before) < 1.0
    with pytest.raises(KeditError, match="one per pair"):
        token_agreement(before[:1], before)


def _requests():
    from lightning_kedit.requests import EditRequest, PromptAnswer

    return [
        EditRequest("0", "{} plays the", "Toko Yasuda", "piano", "guitar",
                    paraphrase_prompts=("Toko Yasuda is a musician who plays the", "Toko Yasuda's instrument is the"),
                    neighborhood=(PromptAnswer("Jimi Hendrix plays the", "guitar"),)),
        EditRequest("1", "The capital of {} is", "Italy", "Paris", "Rome",
                    neighborhood=(PromptAnswer("The capital of Spain is", "Madrid"),
                                  PromptAnswer("The capital of France is", "Paris"))),
    ]


def test_field_scores_are_the_mean_token_accuracies_of_each_pair_kind():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    requests = _requests()
    reference = locality_tokens(model, tok, requests)
    assert len(reference) == 3  # one per neighbourhood pair, in request order
    scores = field_scores(model, tok, requests, reference)
    efficacy = answer_token_accuracy(model, tok, [r.prompt_text for r in requests], [r.target_new for r in requests])
    assert scores["efficacy_tokens"] == pytest.approx(efficacy.mean().item(), abs=1e-12)
    paraphrases = answer_token_accuracy(model, tok, list(requests[0].paraphrase_prompts), ["piano", "piano"])
    assert scores["generalization_tokens"] == pytest.approx(paraphrases.mean().item(), abs=1e-12)
    assert scores["locality_tokens"] == 1.0  # the model is its own reference
    other = field_scores(tiny_model("llama", seed=3), tok, requests, reference)
    assert other["locality_tokens"] is not None and other["locality_tokens"] < 1.0


def test_field_scores_say_what_is_missing_and_refuse_a_reference_of_other_requests():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    requests = _requests()
    scores = field_scores(model, tok, requests[1:])
    assert scores["generalization_tokens"] is None and scores["locality_tokens"] is None
    with pytest.raises(KeditError, match="compute it with locality_tokens on the same requests"):
        field_scores(model, tok, requests, locality_tokens(model, tok, requests[1:]))
    with pytest.raises(KeditError, match="request list is empty"):
        field_scores(model, tok, [])
