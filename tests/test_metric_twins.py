"""Each edit metric class and its functional twin give the same value, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_kedit.evaluation.metrics import (
    EditConsistency,
    EditEfficacy,
    EditGeneralization,
    EditScore,
    EditSpecificity,
    EditTokenAccuracy,
    edit_consistency,
    edit_efficacy,
    edit_generalization,
    edit_score,
    edit_specificity,
    edit_token_accuracy,
)


def _nlls(seed: int, n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    expected = torch.rand(n, generator=generator, dtype=torch.float64) * 5
    other = torch.rand(n, generator=generator, dtype=torch.float64) * 5
    other[::7] = math.nan  # requests without a true target
    return expected, other


@pytest.mark.parametrize("form", ["rate", "prob"])
@pytest.mark.parametrize(
    ("cls", "function"),
    [(EditEfficacy, edit_efficacy), (EditGeneralization, edit_generalization), (EditSpecificity, edit_specificity)],
)
def test_preference_twins_agree(cls, function, form) -> None:
    for seed in range(3):
        expected, other = _nlls(seed)
        metric = cls(form=form)
        metric.update(expected, other)
        assert torch.equal(metric.compute(), function(expected, other, form=form))
        alone = cls(form=form)
        alone.update(expected.float())
        assert torch.equal(alone.compute(), function(expected.float(), form=form))
    assert math.isnan(float(function(torch.tensor([]), torch.tensor([]), form=form)))


@pytest.mark.parametrize("form", ["rate", "prob"])
@pytest.mark.parametrize(
    ("cls", "function"), [(EditTokenAccuracy, edit_token_accuracy), (EditConsistency, edit_consistency)]
)
def test_token_accuracy_twins_agree(cls, function, form) -> None:
    accuracy = torch.tensor([0.0, 0.5, 1.0, 0.25])
    nll = torch.tensor([3.0, 0.7, 0.1, 1.5])
    metric = cls(form=form)
    metric.update(accuracy, nll)
    assert torch.equal(metric.compute(), function(accuracy, nll, form=form))


def test_score_twin_agrees() -> None:
    efficacy, paraphrase, neighborhood = _nlls(0), _nlls(1), _nlls(2)
    for parts in ({"efficacy": efficacy}, {"efficacy": efficacy, "neighborhood": neighborhood},
                  {"efficacy": efficacy, "paraphrase": paraphrase, "neighborhood": neighborhood}, {}):
        metric = EditScore()
        metric.update(**parts)
        value = edit_score(**parts)
        assert torch.equal(metric.compute(), value) or (math.isnan(float(value)) and not parts)
