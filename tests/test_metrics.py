"""Edit metrics and perplexity against independent naive computations (one prompt at a time, float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_scoring import naive_pair
from tiny_models import _CORPUS, tiny_model, tiny_tokenizer
from torchmetrics.utilities.data import dim_zero_sum

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.metrics import (
    EditConsistency,
    EditEfficacy,
    EditGeneralization,
    EditScore,
    EditSpecificity,
    EditTokenAccuracy,
    preference_probability,
)
from lightning_kedit.evaluation.perplexity import Perplexity, perplexity, text_windows
from lightning_kedit.evaluation.request_evaluation import evaluate_requests, score_requests
from lightning_kedit.requests import EditRequest, PromptAnswer

REQUESTS = [
    EditRequest(
        case_id="0", prompt="{} plays the", subject="Toko Yasuda", target_new="piano", target_true="guitar",
        paraphrase_prompts=("Toko Yasuda is known for playing the", "The instrument of Toko Yasuda is the"),
        neighborhood=(PromptAnswer("Michael Jordan plays", "basketball"), PromptAnswer("Sweden plays", "football")),
        consistency=(PromptAnswer("The instrument Toko Yasuda plays is the", "piano"),),
    ),
    EditRequest(
        case_id="1", prompt="The capital of {} is", subject="Italy", target_new="London", target_true="Rome",
        paraphrase_prompts=("Italy has its capital in",),
        neighborhood=(PromptAnswer("Berlin is the capital of", "Germany"),),
    ),
    EditRequest(
        case_id="2", prompt="{} was founded by", subject="Apple", target_new="Steve Jobs", target_true=None,
        paraphrase_prompts=("The founder of Apple is",),
        neighborhood=(PromptAnswer("Microsoft was founded by", "Bill Gates"),),
        consistency=(PromptAnswer("Apple's founder is", "Steve Jobs"),),
    ),
]


def naive_nll(reference, tokenizer, prompt: str, answer: str) -> float:
    log_prob, count, _ = naive_pair(reference, tokenizer, prompt, answer)
    return -log_prob / count


def naive_accuracy(reference, tokenizer, prompt: str, answer: str) -> float:
    _, count, correct = naive_pair(reference, tokenizer, prompt, answer)
    return correct / count


def naive_q(nll_expected: float, nll_other: float | None) -> float:
    # p_e / (p_e + p_o) with p = exp(-nll), written out; p_e alone without an alternative.
    p_e = math.exp(-nll_expected)
    return p_e if nll_other is None else p_e / (p_e + math.exp(-nll_other))


def naive_metrics(model, tokenizer, requests) -> dict:
    model = copy.deepcopy(model).double()
    efficacy, paraphrase, neighborhood, consistency = [], [], [], []
    for r in requests:
        true = None if r.target_true is None else naive_nll(model, tokenizer, r.prompt_text, r.target_true)
        efficacy.append(naive_q(naive_nll(model, tokenizer, r.prompt_text, r.target_new), true))
        for p in r.paraphrase_prompts:
            true = None if r.target_true is None else naive_nll(model, tokenizer, p, r.target_true)
            paraphrase.append(naive_q(naive_nll(model, tokenizer, p, r.target_new), true))
        for n in r.neighborhood:
            own = naive_nll(model, tokenizer, n.prompt, n.answer)
            neighborhood.append(naive_q(own, naive_nll(model, tokenizer, n.prompt, r.target_new)))
        for c in r.consistency:
            consistency.append(naive_accuracy(model, tokenizer, c.prompt, c.answer))
    result = {"n": len(requests)}
    for name, qs in (("efficacy", efficacy), ("paraphrase", paraphrase), ("neighborhood", neighborhood)):
        result[name] = sum(q > 0.5 for q in qs) / len(qs)
        result[f"{name}_prob"] = sum(qs) / len(qs)
    rates = [result["efficacy"], result["paraphrase"], result["neighborhood"]]
    result["score"] = 0.0 if min(rates) == 0 else 3 / sum(1 / r for r in rates)
    result["consistency"] = sum(consistency) / len(consistency) if consistency else None
    return result


@pytest.mark.parametrize("model_type,seed", [("llama", 0), ("gpt2", 1)])
def test_evaluate_requests_matches_naive(model_type, seed):
    model, tokenizer = tiny_model(model_type, seed=seed), tiny_tokenizer()
    expected = naive_metrics(model, tokenizer, REQUESTS)
    result = evaluate_requests(model, tokenizer, REQUESTS, batch_size=4)
    assert list(result) == ["n", "efficacy", "paraphrase", "neighborhood", "consistency", "score", "efficacy_prob",
                            "paraphrase_prob", "neighborhood_prob", "perplexity"]
    assert result["perplexity"] is None
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key


def test_missing_kinds_are_none(llama, tokenizer):
    bare = [EditRequest(case_id="0", prompt="{} plays the", subject="Toko Yasuda", target_new="piano",
                        target_true="guitar")]
    result = evaluate_requests(llama, tokenizer, bare)
    assert result["paraphrase"] is None and result["neighborhood"] is None and result["consistency"] is None
    assert result["score"] == result["efficacy"]
    with pytest.raises(KeditError, match="no requests"):
        evaluate_requests(llama, tokenizer, [])


def test_metrics_fed_by_score_requests(llama, tokenizer):
    scores = score_requests(llama, tokenizer, REQUESTS)
    assert torch.isnan(scores.efficacy[1]).tolist() == [False, False, True]
    accuracy = EditTokenAccuracy()
    accuracy.update(*scores.rewrite_accuracy)
    reference = copy.deepcopy(llama).double()
    expected = [naive_accuracy(reference, tokenizer, r.prompt_text, r.target_new) for r in REQUESTS]
    assert float(accuracy.compute()) == pytest.approx(sum(expected) / len(expected), abs=1e-9)


def test_preference_metrics_formula():
    expected, other = torch.tensor([1.0, 3.0, 2.0, 0.5]), torch.tensor([2.0, 2.5, 2.0, math.nan])
    q = [naive_q(1.0, 2.0), naive_q(3.0, 2.5), 0.5, naive_q(0.5, None)]
    for cls in (EditEfficacy, EditGeneralization, EditSpecificity):
        rate, prob = cls(), cls(form="prob")
        rate.update(expected, other)
        prob.update(expected, other)
        assert float(rate.compute()) == pytest.approx(2 / 4)  # a tie is not a success; exp(-0.5) > 1/2 is
        assert float(prob.compute()) == pytest.approx(sum(q) / 4)
    torch.testing.assert_close(preference_probability(expected), torch.exp(-expected))
    with pytest.raises(ValueError, match="form"):
        EditEfficacy(form="mean")
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own notice, then NaN
        assert math.isnan(float(EditEfficacy().compute()))


def test_token_accuracy_and_consistency_formula():
    for cls in (EditTokenAccuracy, EditConsistency):
        rate, prob = cls(), cls(form="prob")
        for metric in (rate, prob):
            metric.update(torch.tensor([1.0, 0.5]), torch.tensor([0.1, 2.0]))
            metric.update(torch.tensor([0.0]), torch.tensor([3.0]))
        assert float(rate.compute()) == pytest.approx(0.5)
        assert float(prob.compute()) == pytest.approx((math.exp(-0.1) + math.exp(-2.0) + math.exp(-3.0)) / 3)
    with pytest.raises(ValueError, match="shape"):
        EditConsistency().update(torch.ones(2), torch.ones(3))


def test_score_formula():
    score = EditScore()
    score.update(efficacy=(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])),
                 paraphrase=(torch.tensor([1.0]), torch.tensor([2.0])),
                 neighborhood=(torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 2.0, 0.0])))
    assert float(score.compute()) == pytest.approx(3 / (1 / 0.5 + 1 / 1.0 + 1 / 0.75))
    score.update(efficacy=(torch.tensor([5.0] * 10), torch.tensor([0.0] * 10)))
    assert float(score.compute()) == pytest.approx(3 / (1 / (1 / 12) + 1 / 1.0 + 1 / 0.75))
    zero = EditScore()
    zero.update(efficacy=(torch.tensor([3.0]), torch.tensor([1.0])), paraphrase=(torch.ones(1), 2 * torch.ones(1)))
    assert float(zero.compute()) == 0.0


def test_states_reduce_by_sum_and_merge():
    metrics = [EditEfficacy(), EditTokenAccuracy(), EditScore(), Perplexity()]
    for metric in metrics:
        assert metric._reductions and all(fn is dim_zero_sum for fn in metric._reductions.values())
    halves, whole = (EditEfficacy(form="prob"), EditEfficacy(form="prob")), EditEfficacy(form="prob")
    expected, other = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 2.0, 2.0, 2.0])
    halves[0].update(expected[:2], other[:2])
    halves[1].update(expected[2:], other[2:])
    whole.update(expected, other)
    halves[0].merge_state(halves[1])
    assert float(halves[0].compute()) == pytest.approx(float(whole.compute()))


def test_metric_in_a_lightning_validation_loop(llama, tokenizer):
    import lightning as L

    class Evaluate(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = llama
            self.efficacy = EditEfficacy()

        def validation_step(self, batch, batch_idx):
            scores = score_requests(self.model, tokenizer, [REQUESTS[int(i)] for i in batch])
            self.efficacy.update(*scores.efficacy)
            self.log("efficacy", self.efficacy, batch_size=len(batch))

    loader = torch.utils.data.DataLoader(list(range(len(REQUESTS))), batch_size=2)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(Evaluate(), loader, verbose=False)[0]["efficacy"]
    assert logged == pytest.approx(evaluate_requests(llama, tokenizer, REQUESTS)["efficacy"])


def naive_perplexity(model, tokenizer, text: str, max_tokens: int, window: int, prefix: list[int]) -> float:
    reference = copy.deepcopy(model).double()
    ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        tokens = prefix + ids[start : start + window]
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([tokens])).logits[0]
        for t in range(1, len(tokens)):
            total += float(torch.log_softmax(logits[t - 1], -1)[tokens[t]])
            count += 1
    return math.exp(-total / count)


@pytest.mark.parametrize("max_tokens,window", [(50, 16), (1000, 64)])
def test_perplexity_matches_naive(llama, tokenizer, tmp_path, max_tokens, window):
    text = tmp_path / "text.txt"
    text.write_text(_CORPUS)
    expected = naive_perplexity(llama, tokenizer, _CORPUS, max_tokens, window, prefix=[])
    assert perplexity(llama, tokenizer, text, max_tokens=max_tokens, window=window) == pytest.approx(expected,
                                                                                                   rel=1e-6)


def test_perplexity_behind_a_bos(llama, tmp_path):
    from test_scoring import _with_post_processor

    with_bos = _with_post_processor("EOS $A")
    text = tmp_path / "text.txt"
    text.write_text(_CORPUS)
    windows = text_windows(with_bos, text, max_tokens=30, window=10)
    assert [w[0] for w in windows] == [with_bos.eos_token_id] * 3 and [len(w) for w in windows] == [11] * 3
    expected = naive_perplexity(llama, with_bos, _CORPUS, 30, 10, prefix=[with_bos.eos_token_id])
    assert perplexity(llama, with_bos, text, max_tokens=30, window=10) == pytest.approx(expected, rel=1e-6)


def test_perplexity_bad_input(llama, tokenizer, tmp_path):
    with pytest.raises(KeditError, match="is not a file"):
        perplexity(llama, tokenizer, tmp_path / "missing.txt")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(KeditError, match="not UTF-8"):
        perplexity(llama, tokenizer, binary)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(KeditError, match="fewer than 2 tokens"):
        perplexity(llama, tokenizer, empty)
    with pytest.raises(KeditError, match="max_tokens"):
        perplexity(llama, tokenizer, empty, max_tokens=1)
    metric = Perplexity()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(float(metric.compute()))
