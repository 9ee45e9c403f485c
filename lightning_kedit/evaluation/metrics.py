"""Edit-quality metrics as torchmetrics ``Metric``\\ s, each with its functional twin (``EditEfficacy`` and
:func:`edit_efficacy`, ...); :mod:`.request_evaluation` runs a model over requests and computes them all.

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
from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "EditConsistency",
    "EditEfficacy",
    "EditGeneralization",
    "EditScore",
    "EditSpecificity",
    "EditTokenAccuracy",
    "edit_consistency",
    "edit_efficacy",
    "edit_generalization",
    "edit_score",
    "edit_specificity",
    "edit_token_accuracy",
    "preference_counts",
    "preference_probability",
    "token_accuracy_counts",
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


def preference_counts(expected: Tensor, other: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """The sums one update adds: prompts with ``q > 1/2``, the sum of ``q`` and the number of prompts.

    The one place the preference of an expected answer over an alternative is counted: the metrics' ``update``
    and their functional twins all call it.

    Example:
        >>> hits, prob, total = preference_counts(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.5]))
        >>> int(hits), total
        (1, 2)
    """
    q = preference_probability(expected.double(), None if other is None else other.double())
    return (q > 0.5).sum(), q.sum(), q.numel()


def token_accuracy_counts(accuracy: Tensor, nll: Tensor) -> tuple[Tensor, Tensor, int]:
    """The sums one update adds: token accuracies, ``exp(-nll)`` and the number of prompts."""
    if accuracy.shape != nll.shape:
        raise ValueError(f"`accuracy` has shape {tuple(accuracy.shape)} but `nll` has {tuple(nll.shape)}")
    return accuracy.double().sum(), torch.exp(-nll.double()).sum(), accuracy.numel()


def _mean(value: Tensor, total: Tensor) -> Tensor:
    """``value / total``, NaN when nothing was counted."""
    return value / total if total > 0 else torch.tensor(math.nan, dtype=torch.float64)


def _form_mean(counts: tuple[Tensor, Tensor, int], form: Form) -> Tensor:
    """The rate (first sum) or the mean probability (second sum) of one update's counts, in float64."""
    first, prob, total = counts
    return _mean((first if form == "rate" else prob).double(), torch.tensor(total))


def _add_sum_states(metric: Metric, first: str) -> None:
    """The states of a rate/probability metric: float64 sums ``first`` and ``prob``, the count ``total``."""
    metric.add_state(first, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
    metric.add_state("prob", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
    metric.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")


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
        _add_sum_states(self, "hits")

    def update(self, expected: Tensor, other: Tensor | None = None) -> None:
        """Add prompts: ``expected`` and ``other`` are mean NLLs (``other`` None or NaN when unknown)."""
        hits, prob, total = preference_counts(expected, other)
        self.hits += hits
        self.prob += prob
        self.total += total

    def compute(self) -> Tensor:
        """The rate or the mean probability; NaN before any update."""
        return _mean(self.hits if self.form == "rate" else self.prob, self.total)


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
        _add_sum_states(self, "accuracy")

    def update(self, accuracy: Tensor, nll: Tensor) -> None:
        """Add prompts: per-prompt token accuracy in [0, 1] and mean NLL of the expected answer."""
        correct, prob, total = token_accuracy_counts(accuracy, nll)
        self.accuracy += correct
        self.prob += prob
        self.total += total

    def compute(self) -> Tensor:
        """The mean token accuracy or the mean probability; NaN before any update."""
        return _mean(self.accuracy if self.form == "rate" else self.prob, self.total)


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
            hits, _, total = preference_counts(*pair)
            self.hits[slot] += hits
            self.total[slot] += total

    def compute(self) -> Tensor:
        """The harmonic mean of the updated components' rates; NaN before any update."""
        return _harmonic_mean(self.hits, self.total)


def _harmonic_mean(hits: Tensor, total: Tensor) -> Tensor:
    """The harmonic mean of the rates ``hits / total`` of the components with ``total > 0``."""
    seen = total > 0
    if not bool(seen.any()):
        return torch.tensor(math.nan, dtype=torch.float64)
    rates = hits[seen] / total[seen]
    if bool((rates == 0).any()):
        return torch.tensor(0.0, dtype=torch.float64)
    return rates.numel() / (1.0 / rates).sum()


# ----------------------------------------------------------------------------------- functional twins
def _preference(expected: Tensor, other: Tensor | None, form: Form) -> Tensor:
    _check_form(form)
    return _form_mean(preference_counts(expected, other), form)


def edit_efficacy(nll_new: Tensor, nll_true: Tensor | None = None, form: Form = "rate") -> Tensor:
    """:class:`EditEfficacy` of one batch of edit prompts.

    Example:
        >>> float(edit_efficacy(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.5])))
        0.5
    """
    return _preference(nll_new, nll_true, form)


def edit_generalization(nll_new: Tensor, nll_true: Tensor | None = None, form: Form = "rate") -> Tensor:
    """:class:`EditGeneralization` of one batch of paraphrase prompts."""
    return _preference(nll_new, nll_true, form)


def edit_specificity(nll_own: Tensor, nll_new: Tensor | None = None, form: Form = "rate") -> Tensor:
    """:class:`EditSpecificity` of one batch of neighbour prompts."""
    return _preference(nll_own, nll_new, form)


def edit_token_accuracy(accuracy: Tensor, nll: Tensor, form: Form = "rate") -> Tensor:
    """:class:`EditTokenAccuracy` of one batch of prompts.

    Example:
        >>> float(edit_token_accuracy(torch.tensor([0.5, 1.0]), torch.tensor([1.0, 0.1])))
        0.75
    """
    _check_form(form)
    return _form_mean(token_accuracy_counts(accuracy, nll), form)


def edit_consistency(accuracy: Tensor, nll: Tensor, form: Form = "rate") -> Tensor:
    """:class:`EditConsistency` of one batch of consistency prompts."""
    return edit_token_accuracy(accuracy, nll, form)


def edit_score(
    *,
    efficacy: tuple[Tensor, Tensor | None] | None = None,
    paraphrase: tuple[Tensor, Tensor | None] | None = None,
    neighborhood: tuple[Tensor, Tensor | None] | None = None,
) -> Tensor:
    """:class:`EditScore` of one batch: the harmonic mean of the given components' rates."""
    hits, total = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.long)
    for slot, pair in enumerate((efficacy, paraphrase, neighborhood)):
        if pair is not None:
            counted = preference_counts(*pair)
            hits[slot] += counted[0]
            total[slot] += counted[2]
    return _harmonic_mean(hits, total)
