"""The field's zsRE measures: teacher-forced argmax tokens against a naive one-position-at-a-time loop."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.field_metrics import argmax_tokens, token_agreement
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
