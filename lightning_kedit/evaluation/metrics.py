"""Edit-quality metrics as torchmetrics ``Metric``\\ s, and ``evaluate_requests`` that computes them all.

Every metric compares mean negative log-likelihoods (NLL, per answer token, see :mod:`.scoring`).
For an expected answer :math:`e` and an alternative :math:`o` on one prompt, with :math:`p = \\exp(-\\mathrm{NLL})`
the per-token geometric-mean probability,

.. math:: q = \\frac{p_e}{p_e + p_o} = \\sigma(\\mathrm{NLL}_o - \\mathrm{NLL}_e),

and where no alternative is known (a request without a true target) :math:`q = p_e`. Each metric has two
forms: the *rate* ``mean[q > 1/2]`` (with an alternative: the expected answer is more likely, as the
"score" metrics of ROME and MEMIT on CounterFact) and the *probability* ``mean[q]`` (``*_prob``; 0.5 means the
model cannot tell the two answers apart). Means are over prompts.

- efficacy: edit prompt, ``e`` = new target, ``o`` = true target;
- generalization (paraphrase): the same on paraphrase prompts;
- specificity (neighbourhood): neighbour prompts, ``e`` = their own (unchanged) answer, ``o`` = new target;
- consistency: prompts whose answer after the edit is given (implications, multi-hop questions). No
  alternative answer exists, so the rate is the mean token accuracy of the expected answer (argmax given the
  gold prefix, as zsRE is scored) and the probability form is the mean of :math:`p_e`;
- token accuracy: the same measure for any answer (zsRE-style efficacy);
- score: the harmonic mean of the efficacy, paraphrase and neighbourhood rates (ROME/MEMIT "S");
- perplexity: :math:`\\exp(-\\sum \\log p / N)` over the tokens of a text (see :mod:`.perplexity`).

All states are sums, so they reduce across processes by sum.

Example:
    >>> import torch
    >>> efficacy = EditEfficacy()
    >>> efficacy.update(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.5]))  # NLL of new, NLL of true
    >>> float(efficacy.compute())
    0.5
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.perplexity import perplexity
from lightning_kedit.evaluation.scoring import score_answers
from lightning_kedit.requests import EditRequest

__all__ = [
    "EditConsistency",
    "EditEfficacy",
    "EditGeneralization",
    "EditScore",
    "EditSpecificity",
    "EditTokenAccuracy",
    "RequestScores",
    "evaluate_requests",
    "preference_probability",
    "score_requests",
]

Form = Literal["rate", "prob"]


def preference_probability(expected: Tensor, other: Tensor | None = None) -> Tensor:
    """``q = p_e / (p_e + p_o) = sigmoid(nll_o - nll_e)``; ``q = exp(-nll_e)`` where ``other`` is None or NaN.

    Args:
        expected: mean NLL of the expected answer, any shape.
        other: mean NLL of the alternative answer, same shape, NaN where unknown.

    Example:
        >>> preference_probability(torch.tensor([1.0]), torch.tensor([1.0]))
        tensor([0.5000])
    """
    alone = torch.exp(-expected)
    if other is None:
        return alone
    if other.shape != expected.shape:
        raise ValueError(f"`other` has shape {tuple(other.shape)} but `expected` has {tuple(expected.shape)}")
    return torch.where(torch.isnan(other), alone, torch.sigmoid(other - expected))


def _check_form(form: str) -> None:
    if form not in ("rate", "prob"):
        raise ValueError(f"`form` must be 'rate' or 'prob', got {form!r}")


class _PreferenceMetric(Metric):
    """Rate (``mean[q > 1/2]``) or mean probability (``mean[q]``) of an expected answer over an alternative."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    hits: Tensor
    prob: Tensor
    total: Tensor

    def __init__(self, form: Form = "rate", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_form(form)
        self.form = form
        self.add_state("hits", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prob", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, expected: Tensor, other: Tensor | None = None) -> None:
        """Add prompts: ``expected`` and ``other`` are mean NLLs (``other`` None or NaN when unknown)."""
        q = preference_probability(expected.double(), None if other is None else other.double())
        self.hits += (q > 0.5).sum()
        self.prob += q.sum()
        self.total += q.numel()

    def compute(self) -> Tensor:
        """The rate or the mean probability; NaN before any update."""
        value = self.hits if self.form == "rate" else self.prob
        return value / self.total if self.total > 0 else torch.tensor(math.nan, dtype=torch.float64)


class EditEfficacy(_PreferenceMetric):
    """Edit prompts on which the new target beats the true target.

    ``update(nll_new, nll_true)``; ``nll_true`` None or NaN for requests without a true target (then a new
    target counts when its per-token probability exceeds 1/2).

    Args:
        form: ``"rate"`` (fraction of prompts) or ``"prob"`` (mean of ``p_new / (p_new + p_true)``).

    Example:
        >>> metric = EditEfficacy(form="prob")
        >>> metric.update(torch.tensor([1.0]), torch.tensor([1.0]))
        >>> float(metric.compute())
        0.5
    """


class EditGeneralization(_PreferenceMetric):
    """Paraphrase prompts on which the new target beats the true target: ``update(nll_new, nll_true)``.

    Args:
        form: ``"rate"`` or ``"prob"``, as :class:`EditEfficacy`.

    Example:
        >>> metric = EditGeneralization()
        >>> metric.update(torch.tensor([0.5, 4.0]), torch.tensor([1.0, 1.0]))
        >>> float(metric.compute())
        0.5
    """


class EditSpecificity(_PreferenceMetric):
    """Neighbour prompts on which their own answer still beats the new target: ``update(nll_own, nll_new)``.

    Args:
        form: ``"rate"`` or ``"prob"`` (mean of ``p_own / (p_own + p_new)``).

    Example:
        >>> metric = EditSpecificity()
        >>> metric.update(torch.tensor([0.5]), torch.tensor([3.0]))
        >>> float(metric.compute())
        1.0
    """


class EditTokenAccuracy(Metric):
    """Mean over prompts of the fraction of answer tokens predicted by argmax given the gold prefix.

    ``update(accuracy, nll)`` takes per-prompt token accuracies and mean NLLs (see
    :class:`lightning_kedit.evaluation.scoring.AnswerScores`).

    Args:
        form: ``"rate"`` (mean token accuracy) or ``"prob"`` (mean per-token probability ``exp(-nll)``).

    Example:
        >>> metric = EditTokenAccuracy()
        >>> metric.update(torch.tensor([1.0, 0.5]), torch.tensor([0.1, 2.0]))
        >>> float(metric.compute())
        0.75
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    accuracy: Tensor
    prob: Tensor
    total: Tensor

    def __init__(self, form: Form = "rate", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_form(form)
        self.form = form
        self.add_state("accuracy", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prob", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, accuracy: Tensor, nll: Tensor) -> None:
        """Add prompts: per-prompt token accuracy in [0, 1] and mean NLL of the expected answer."""
        if accuracy.shape != nll.shape:
            raise ValueError(f"`accuracy` has shape {tuple(accuracy.shape)} but `nll` has {tuple(nll.shape)}")
        self.accuracy += accuracy.double().sum()
        self.prob += torch.exp(-nll.double()).sum()
        self.total += accuracy.numel()

    def compute(self) -> Tensor:
        """The mean token accuracy or the mean probability; NaN before any update."""
        value = self.accuracy if self.form == "rate" else self.prob
        return value / self.total if self.total > 0 else torch.tensor(math.nan, dtype=torch.float64)


class EditConsistency(EditTokenAccuracy):
    """Token accuracy of the expected post-edit answers of implication or multi-hop prompts.

    No alternative answer is known for these prompts, so the rate is the mean token accuracy of the expected
    answer (argmax given the gold prefix) and the probability form the mean of ``exp(-nll)``.

    Example:
        >>> metric = EditConsistency()
        >>> metric.update(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 0.2]))
        >>> float(metric.compute())
        0.5
    """


class EditScore(Metric):
    """Harmonic mean of the efficacy, paraphrase and neighbourhood rates (the CounterFact "score").

    ``update(efficacy=(nll_new, nll_true), paraphrase=(nll_new, nll_true), neighborhood=(nll_own, nll_new))``,
    each optional. Components never updated are left out of the mean; a zero rate gives a zero score.

    Example:
        >>> score = EditScore()
        >>> score.update(efficacy=(torch.tensor([1.0]), torch.tensor([2.0])),
        ...              neighborhood=(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])))
        >>> round(float(score.compute()), 4)  # harmonic mean of 1.0 and 0.5
        0.6667
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    hits: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.zeros(3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(3, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        *,
        efficacy: tuple[Tensor, Tensor | None] | None = None,
        paraphrase: tuple[Tensor, Tensor | None] | None = None,
        neighborhood: tuple[Tensor, Tensor | None] | None = None,
    ) -> None:
        """Add prompts of any of the three kinds, each as ``(nll_expected, nll_other)``."""
        for slot, pair in enumerate((efficacy, paraphrase, neighborhood)):
            if pair is None:
                continue
            expected, other = pair
            q = preference_probability(expected.double(), None if other is None else other.double())
            self.hits[slot] += (q > 0.5).sum()
            self.total[slot] += q.numel()

    def compute(self) -> Tensor:
        """The harmonic mean of the updated components' rates; NaN before any update."""
        seen = self.total > 0
        if not bool(seen.any()):
            return torch.tensor(math.nan, dtype=torch.float64)
        rates = self.hits[seen] / self.total[seen]
        if bool((rates == 0).any()):
            return torch.tensor(0.0, dtype=torch.float64)
        return rates.numel() / (1.0 / rates).sum()


@dataclass(frozen=True)
class RequestScores:
    """Mean NLLs (and token accuracies) of every prompt a list of requests judges an edit by.

    Attributes:
        efficacy: ``(nll_new, nll_true)`` per request; ``nll_true`` NaN without a true target.
        paraphrase: ``(nll_new, nll_true)`` per paraphrase prompt.
        neighborhood: ``(nll_own, nll_new)`` per neighbour prompt.
        consistency: ``(token_accuracy, nll)`` of the expected answer per consistency prompt.
        rewrite_accuracy: ``(token_accuracy, nll)`` of the new target per edit prompt (zsRE-style efficacy).
    """

    efficacy: tuple[Tensor, Tensor]
    paraphrase: tuple[Tensor, Tensor]
    neighborhood: tuple[Tensor, Tensor]
    consistency: tuple[Tensor, Tensor]
    rewrite_accuracy: tuple[Tensor, Tensor]


def score_requests(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> RequestScores:
    """Score every prompt of ``requests`` in one batched pass (pairs sharing a prompt share a forward).

    Example:
        >>> scores = score_requests(model, tokenizer, requests)  # doctest: +SKIP
        >>> efficacy = EditEfficacy()  # doctest: +SKIP
        >>> efficacy.update(*scores.efficacy)  # doctest: +SKIP
    """
    prompts: list[str] = []
    answers: list[str] = []

    def add(pairs: list[tuple[str, str]]) -> slice:
        start = len(prompts)
        for prompt, answer in pairs:
            prompts.append(prompt)
            answers.append(answer)
        return slice(start, len(prompts))

    new = add([(r.prompt_text, r.target_new) for r in requests])
    true = add([(r.prompt_text, r.target_true) for r in requests if r.target_true is not None])
    para_new = add([(p, r.target_new) for r in requests for p in r.paraphrase_prompts])
    para_true = add(
        [(p, r.target_true) for r in requests if r.target_true is not None for p in r.paraphrase_prompts]
    )
    neigh_own = add([(n.prompt, n.answer) for r in requests for n in r.neighborhood])
    neigh_new = add([(n.prompt, r.target_new) for r in requests for n in r.neighborhood])
    consistency = add([(c.prompt, c.answer) for r in requests for c in r.consistency])
    scores = score_answers(model, tokenizer, prompts, answers, batch_size=batch_size, progress=progress)
    nll, accuracy = scores.nll, scores.token_accuracy

    def aligned(values: Tensor, has_true: list[bool]) -> Tensor:
        # Spread the true-target NLLs over all rows, NaN where a request has no true target.
        out = torch.full((len(has_true),), math.nan, dtype=torch.float64)
        out[torch.tensor(has_true, dtype=torch.bool)] = values
        return out

    has_true = [r.target_true is not None for r in requests]
    para_has_true = [r.target_true is not None for r in requests for _ in r.paraphrase_prompts]
    return RequestScores(
        efficacy=(nll[new], aligned(nll[true], has_true)),
        paraphrase=(nll[para_new], aligned(nll[para_true], para_has_true)),
        neighborhood=(nll[neigh_own], nll[neigh_new]),
        consistency=(accuracy[consistency], nll[consistency]),
        rewrite_accuracy=(accuracy[new], nll[new]),
    )


def _value(metric: Metric) -> float | None:
    return float(metric.compute()) if metric.update_count else None


def evaluate_requests(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    batch_size: int = 32,
    ppl_text: str | os.PathLike[str] | None = None,
    ppl_tokens: int = 20000,
    progress: bool = False,
) -> dict[str, Any]:
    """All edit metrics of ``requests`` on ``model`` as the dict ``kedit eval --json`` writes (less model/seconds).

    Args:
        model: the (possibly edited) causal LM.
        tokenizer: its tokenizer.
        requests: the requests to judge the model by.
        batch_size: sequences per forward.
        ppl_text: a text file whose first ``ppl_tokens`` tokens give the perplexity (None: no perplexity).
        ppl_tokens: how many tokens of ``ppl_text`` to score.
        progress: show tqdm bars on stderr.

    Returns:
        ``n``, ``efficacy``, ``paraphrase``, ``neighborhood``, ``consistency``, ``score``, ``efficacy_prob``,
        ``paraphrase_prob``, ``neighborhood_prob``, ``perplexity``: rates in [0, 1], None where the requests
        hold no prompt of that kind (or no ``ppl_text``).

    Example:
        >>> result = evaluate_requests(model, tokenizer, bundled_requests())  # doctest: +SKIP
        >>> result["efficacy"], result["neighborhood"]  # doctest: +SKIP
        (0.3, 0.8)
    """
    if not requests:
        raise KeditError("no requests to evaluate; give at least one edit request")
    scores = score_requests(model, tokenizer, requests, batch_size=batch_size, progress=progress)
    result: dict[str, Any] = {"n": len(requests)}
    kinds = {
        "efficacy": (EditEfficacy, scores.efficacy),
        "paraphrase": (EditGeneralization, scores.paraphrase),
        "neighborhood": (EditSpecificity, scores.neighborhood),
    }
    for name, (cls, pair) in kinds.items():
        rate, prob = cls(), cls(form="prob")
        if pair[0].numel():
            rate.update(*pair)
            prob.update(*pair)
        result[name], result[f"{name}_prob"] = _value(rate), _value(prob)
    consistency = EditConsistency()
    if scores.consistency[0].numel():
        consistency.update(*scores.consistency)
    result["consistency"] = _value(consistency)
    score = EditScore()
    score.update(**{name: pair for name, (_, pair) in kinds.items() if pair[0].numel()})
    result["score"] = _value(score)
    result["perplexity"] = None
    if ppl_text is not None:
        result["perplexity"] = perplexity(model, tokenizer, ppl_text, max_tokens=ppl_tokens, progress=progress)
    order = ["n", "efficacy", "paraphrase", "neighborhood", "consistency", "score", "efficacy_prob",
             "paraphrase_prob", "neighborhood_prob", "perplexity"]
    return {key: result[key] for key in order}
