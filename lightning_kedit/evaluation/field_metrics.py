"""zsRE measured as the lifelong-editing literature measures it: token accuracy, and locality as agreement.

Beside our preference rates (:mod:`lightning_kedit.evaluation.metrics`), most editing papers report on zsRE

- *efficacy* and *generalisation*: the share of the answer's tokens that are the model's argmax when the
  gold answer prefix is given (teacher forcing), on the edit prompt and on its rephrasings;
- *locality*: the share of answer positions of the locality prompts where the edited model's argmax token
  equals the **unedited** model's (not the gold answer's: NQ questions the model cannot answer still count
  when the edit leaves its answer unchanged).

:func:`argmax_tokens` gives the teacher-forced argmax tokens of a model at each answer position;
:func:`token_agreement` compares two such lists. Both are pure functions of their inputs.

Example:
    >>> before = argmax_tokens(model, tokenizer, ["Who wrote Hamlet?"], ["Shakespeare"])  # doctest: +SKIP
    >>> delta.apply(model)  # doctest: +SKIP
    >>> after = argmax_tokens(model, tokenizer, ["Who wrote Hamlet?"], ["Shakespeare"])  # doctest: +SKIP
    >>> token_agreement(after, before)  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.scoring import encode_pairs

__all__ = ["argmax_tokens", "token_agreement"]


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
