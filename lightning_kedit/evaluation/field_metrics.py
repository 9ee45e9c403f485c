"""zsRE measured as the lifelong-editing literature measures it: token accuracy, and locality as agreement.

Beside our preference rates (:mod:`lightning_kedit.evaluation.metrics`), most editing papers report on zsRE

- *efficacy* and *generalisation*: the share of the answer's tokens that are the model's argmax when the
  gold answer prefix is given (teacher forcing), on the edit prompt and on its rephrasings;
- *locality*: the share of answer positions of the locality prompts where the edited model's argmax token
  equals the **unedited** model's (not the gold answer's: NQ questions the model cannot answer still count
  when the edit leaves its answer unchanged).

:func:`argmax_tokens` gives the teacher-forced argmax tokens of a model at each answer position;
:func:`token_agreement` compares two such lists. :func:`field_scores` gives the three measures of a list of
requests, with the unedited model's locality tokens from :func:`locality_tokens`.

Example:
    >>> before = argmax_tokens(model, tokenizer, ["Who wrote Hamlet?"], ["Shakespeare"])  # doctest: +SKIP
    >>> delta.apply(model)  # doctest: +SKIP
    >>> after = argmax_tokens(model, tokenizer, ["Who wrote Hamlet?"], ["Shakespeare"])  # doctest: +SKIP
    >>> token_agreement(after, before)  # doctest: +SKIP
    1.0
    >>> reference = locality_tokens(unedited_model, tokenizer, requests)  # doctest: +SKIP
    >>> field_scores(edited_model, tokenizer, requests, reference)  # doctest: +SKIP
    {'efficacy_tokens': 0.97, 'generalization_tokens': 0.88, 'locality_tokens': 0.95}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.scoring import encode_pairs
from lightning_kedit.requests import EditRequest

__all__ = ["argmax_tokens", "field_scores", "locality_tokens", "token_agreement"]


@torch.no_grad()
def argmax_tokens(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> list[Tensor]:
    """Per pair, the model's argmax token at each answer position given the gold prefix, ``(n_answer,)`` int64.

    The token accuracy of pair ``i`` is ``(argmax_tokens(...)[i] == gold_i).float().mean()``.

    Raises:
        KeditError: lengths differ or an answer adds no token (:func:`~.scoring.encode_pairs`).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for ids, context in encode_pairs(tokenizer, prompts, answers):
            logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0]
            out.append(logits[context - 1 : len(ids) - 1].argmax(-1).cpu())  # position t predicts token t+1
    finally:
        model.train(was_training)
    return out


def token_agreement(predicted: Sequence[Tensor], reference: Sequence[Tensor]) -> float:
    """The mean over pairs of the share of positions where ``predicted`` equals ``reference`` (each pair counts once).

    With ``reference`` the gold answers' tokens this is the field's token accuracy; with the unedited model's
    :func:`argmax_tokens` it is the field's locality.

    Example:
        >>> token_agreement([torch.tensor([1, 2]), torch.tensor([3])], [torch.tensor([1, 5]), torch.tensor([3])])
        0.75
    """
    if len(predicted) != len(reference) or not predicted:
        raise KeditError(f"got {len(predicted)} predictions for {len(reference)} references; give one per pair")
    shares = []
    for p, r in zip(predicted, reference, strict=True):
        if p.shape != r.shape:
            raise KeditError(f"a prediction of {tuple(p.shape)} tokens is compared with a reference of "
                             f"{tuple(r.shape)}; give both for the same pairs")
        shares.append(float((p == r).double().mean()))
    return sum(shares) / len(shares)


def _token_accuracy(model: nn.Module, tokenizer: Any, prompts: Sequence[str], answers: Sequence[str]) -> float:
    """The field's token accuracy: argmax tokens against the answers' own tokens, as :func:`argmax_tokens` aligns
    them."""
    gold = [torch.tensor(ids[context:]) for ids, context in encode_pairs(tokenizer, prompts, answers)]
    return token_agreement(argmax_tokens(model, tokenizer, prompts, answers), gold)


def _locality_pairs(requests: Sequence[EditRequest]) -> tuple[list[str], list[str]]:
    pairs = [(n.prompt, n.answer) for r in requests for n in r.neighborhood]
    return [p for p, _ in pairs], [a for _, a in pairs]


def locality_tokens(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest]) -> list[Tensor]:
    """The model's argmax tokens on every neighbourhood pair of ``requests``, in order: the locality reference.

    Take it from the model *before* the edits and pass it to :func:`field_scores` after them.
    """
    return argmax_tokens(model, tokenizer, *_locality_pairs(requests))


def field_scores(
    model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], reference: Sequence[Tensor] | None = None
) -> dict[str, float | None]:
    """The field's zsRE measures of ``requests`` on ``model``, each in [0, 1].

    - ``efficacy_tokens``: token accuracy of ``target_new`` after the edit prompt;
    - ``generalization_tokens``: the same after each paraphrase prompt (``None`` when no request has one);
    - ``locality_tokens``: agreement with ``reference`` (:func:`locality_tokens` of the unedited model) on the
      neighbourhood pairs (``None`` without a reference or neighbourhood pairs).

    Each is the mean over pairs of the share of answer positions that agree.

    Raises:
        KeditError: ``requests`` is empty, or ``reference`` does not hold one entry per neighbourhood pair.
    """
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    prompts = [r.prompt_text for r in requests]
    targets = [r.target_new for r in requests]
    scores: dict[str, float | None] = {
        "efficacy_tokens": _token_accuracy(model, tokenizer, prompts, targets),
        "generalization_tokens": None,
        "locality_tokens": None,
    }
    paraphrases = [(p, r.target_new) for r in requests for p in r.paraphrase_prompts]
    if paraphrases:
        p_prompts, p_targets = [p for p, _ in paraphrases], [a for _, a in paraphrases]
        scores["generalization_tokens"] = _token_accuracy(model, tokenizer, p_prompts, p_targets)
    l_prompts, l_answers = _locality_pairs(requests)
    if reference is not None and l_prompts:
        if len(reference) != len(l_prompts):
            raise KeditError(f"`reference` holds {len(reference)} token lists for {len(l_prompts)} neighbourhood "
                             "pairs; compute it with locality_tokens on the same requests")
        scores["locality_tokens"] = token_agreement(argmax_tokens(model, tokenizer, l_prompts, l_answers), reference)
    return scores
