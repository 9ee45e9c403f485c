"""Running a model over edit requests: every prompt scored in one batched pass, then every edit metric.

:func:`score_requests` gives the mean NLLs (and token accuracies) of every prompt a list of requests judges an
edit by (:class:`RequestScores`); :func:`evaluate_requests` feeds them to the metrics of :mod:`.metrics` and
returns the dict ``kedit eval --json`` writes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.metrics import (
    EditConsistency,
    EditEfficacy,
    EditGeneralization,
    EditScore,
    EditSpecificity,
)
from lightning_kedit.evaluation.perplexity import perplexity
from lightning_kedit.evaluation.scoring import score_answers
from lightning_kedit.requests import EditRequest

__all__ = ["RequestScores", "evaluate_requests", "score_requests"]


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
