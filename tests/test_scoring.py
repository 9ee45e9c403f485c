"""Batched answer scoring against a naive float64 loop, one prompt at a time."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import _CORPUS, ARCHITECTURES, tiny_model, tiny_tokenizer
from tokenizers import processors

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.scoring import (
    _plan_sequences,
    answer_log_probs,
    answer_nll,
    answer_token_accuracy,
    encode_pairs,
    join_answer,
    score_answers,
)

PROMPTS = [
    "The Eiffel Tower is located in",
    "The capital of Italy is",
    "The capital of Italy is",
    "Toko Yasuda plays the",
    "Toko Yasuda plays the",
    "Michael Jordan plays",
    "Apple was founded by",
    "The mother tongue of Thomas Joannes Stieltjes is",
]
ANSWERS = ["Paris", "Rome", "London", "guitar", "piano music", "basketball", "Steve Jobs", "Dutch"]


def naive_pair(reference, tokenizer, prompt: str, answer: str) -> tuple[float, int, int]:
    """Log-probability, token count and argmax hits of one answer, by a plain loop over float64 logits."""
    context = tokenizer(prompt).input_ids
    full = tokenizer(prompt + " " + answer).input_ids
    assert full[: len(context)] == context
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([full])).logits[0]
    total, hits = 0.0, 0
    for t in range(len(context), len(full)):
        row = logits[t - 1]
        total += float(row[full[t]] - torch.logsumexp(row, dim=0))
        hits += int(int(row.argmax()) == full[t])
    return total, len(full) - len(context), hits


def naive_scores(model, tokenizer, prompts, answers):
    """One pair at a time, float64 copy of the model."""
    reference = copy.deepcopy(model).double()
    rows = [naive_pair(reference, tokenizer, p, a) for p, a in zip(prompts, answers, strict=True)]
    log_probs, counts, correct = zip(*rows, strict=True)
    return torch.tensor(log_probs, dtype=torch.float64), torch.tensor(counts), torch.tensor(correct)


_NAIVE: dict[str, tuple[torch.Tensor, ...]] = {}


def naive_reference(model_type: str) -> tuple[torch.Tensor, ...]:
    if model_type not in _NAIVE:
        _NAIVE[model_type] = naive_scores(tiny_model(model_type), tiny_tokenizer(), PROMPTS, ANSWERS)
    return _NAIVE[model_type]


@pytest.mark.parametrize(
    "model_type,batch_size,padding_side",
    [("llama", 3, "left"), ("llama", 32, "right"), ("gpt2", 1, "right"), ("gpt2", 3, "right"), ("gpt2", 32, "left")],
)
def test_batched_matches_naive(model_type, padding_side, batch_size):
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    expected_lp, expected_n, expected_hits = naive_reference(model_type)
    scores = score_answers(model, tokenizer, PROMPTS, ANSWERS, batch_size=batch_size, padding_side=padding_side)
    assert scores.log_prob.dtype == torch.float64
    torch.testing.assert_close(scores.log_prob, expected_lp, atol=1e-5, rtol=0)
    assert scores.num_tokens.tolist() == expected_n.tolist()
    assert scores.num_correct.tolist() == expected_hits.tolist()
    torch.testing.assert_close(scores.nll, -expected_lp / expected_n, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_every_architecture_batched_equals_one_at_a_time(model_type):
    model, tokenizer = tiny_model(model_type, num_layers=2), tiny_tokenizer()
    pairs = zip(PROMPTS, ANSWERS, strict=True)
    alone = torch.cat([score_answers(model, tokenizer, [p], [a]).log_prob for p, a in pairs])
    for side in ("right", "left"):
        batched = score_answers(model, tokenizer, PROMPTS, ANSWERS, batch_size=8, padding_side=side)
        torch.testing.assert_close(batched.log_prob, alone, atol=1e-5, rtol=0)


def test_wrappers_and_mode_restored(llama, tokenizer):
    llama.train()
    log_prob, count = answer_log_probs(llama, tokenizer, PROMPTS, ANSWERS)
    assert llama.training
    torch.testing.assert_close(answer_nll(llama, tokenizer, PROMPTS, ANSWERS), -log_prob / count)
    accuracy = answer_token_accuracy(llama, tokenizer, PROMPTS, ANSWERS)
    assert accuracy.dtype == torch.float64 and bool(((accuracy >= 0) & (accuracy <= 1)).all())
    assert tokenizer.padding_side == "right"


def test_token_accuracy_is_one_for_the_greedy_answer(llama, tokenizer):
    checked = 0
    words = _CORPUS.split()
    for prompt in (" ".join(words[:k]) for k in range(2, 30)):
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            for _ in range(2):
                ids.append(int(llama(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        answer = tokenizer.decode(ids[len(tokenizer(prompt).input_ids) :])
        if not answer.strip() or encode_pairs(tokenizer, [prompt], [answer])[0][0] != ids:
            continue  # the greedy tokens must re-encode to themselves for the check to mean anything
        scores = score_answers(llama, tokenizer, [prompt], [answer])
        assert scores.token_accuracy.tolist() == [1.0]
        checked += 1
        if checked == 2:
            break
    assert checked > 0


def _with_post_processor(template_single: str) -> object:
    tokenizer = copy.deepcopy(tiny_tokenizer())
    eos = tokenizer.eos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=template_single.replace("EOS", eos), special_tokens=[(eos, tokenizer.eos_token_id)]
    )
    return tokenizer


def test_bos_is_kept_and_appended_eos_dropped(llama):
    with_bos = _with_post_processor("EOS $A")
    assert with_bos("Rome").input_ids[0] == with_bos.eos_token_id
    expected_lp, _, _ = naive_scores(llama, with_bos, PROMPTS, ANSWERS)
    torch.testing.assert_close(score_answers(llama, with_bos, PROMPTS, ANSWERS).log_prob, expected_lp, atol=1e-5,
                               rtol=0)
    # An empty prompt is scorable behind a BOS.
    assert score_answers(llama, with_bos, [""], ["Rome"]).num_tokens.tolist() == [len(with_bos("Rome").input_ids) - 1]
    with_eos = _with_post_processor("$A EOS")
    plain = score_answers(llama, tiny_tokenizer(), PROMPTS, ANSWERS)
    torch.testing.assert_close(score_answers(llama, with_eos, PROMPTS, ANSWERS).log_prob, plain.log_prob)


def test_word_boundary():
    assert join_answer("Paris is in", "France") == "Paris is in France"
    assert join_answer("Q: where? A: ", "France") == "Q: where? A: France"
    assert join_answer("Paris is in", " France") == "Paris is in France"


def test_shared_prompts_cost_one_sequence(tokenizer):
    pairs = encode_pairs(tokenizer, ["The capital of Italy is"] * 3 + ["Berlin is"], ["R", "L", "Rome", "R"])
    sequences, owner = _plan_sequences(pairs)
    # Single-token answers need only the prompt, which the multi-token answer's sequence starts with.
    assert len(sequences) == 2
    assert owner[0] == owner[1] == owner[2] != owner[3]
    for (ids, _), sequence in zip(pairs, owner, strict=True):
        assert sequences[sequence][: len(ids) - 1] == tuple(ids[:-1])


def test_bad_input(llama, tokenizer):
    with pytest.raises(KeditError, match="2 prompts but 1 answers"):
        score_answers(llama, tokenizer, ["a", "b"], ["c"])
    with pytest.raises(KeditError, match="is empty"):
        score_answers(llama, tokenizer, ["Paris is in"], [""])
    with pytest.raises(KeditError, match="no BOS"):
        score_answers(llama, tokenizer, [""], ["Rome"])
    with pytest.raises(KeditError, match="batch_size"):
        score_answers(llama, tokenizer, ["a"], ["b"], batch_size=0)
    empty = score_answers(llama, tokenizer, [], [])
    assert empty.log_prob.shape == (0,)
