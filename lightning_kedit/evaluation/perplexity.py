"""Perplexity of a model on a text file: the fluency check that an edit leaves the rest of the model intact.

The first ``max_tokens`` tokens of the text (tokenized without special tokens) are cut into consecutive
windows of ``window`` tokens (stride = window, so no token is scored twice and no window sees the previous
one). Each window is scored alone, behind the special tokens the tokenizer puts in front of a text (its BOS,
when it adds one); every token with at least one token before it is predicted, and

.. math:: \\mathrm{PPL} = \\exp\\Big(-\\frac{1}{N} \\sum_{t} \\log p(x_t \\mid x_{<t})\\Big)

over the ``N`` predicted tokens, accumulated in float64.

Example:
    >>> perplexity(model, tokenizer, "wikitext2_test.txt", max_tokens=20000)  # doctest: +SKIP
    25.75
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.scoring import special_affixes, token_scores

__all__ = ["Perplexity", "perplexity", "sequence_log_prob", "text_windows"]


class Perplexity(Metric):
    """Perplexity from summed token log-probabilities: ``update(log_prob, num_tokens)``.

    Example:
        >>> metric = Perplexity()
        >>> metric.update(torch.tensor([-2.0, -4.0], dtype=torch.float64), torch.tensor([1, 1]))
        >>> round(float(metric.compute()), 4)  # exp(3)
        20.0855
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    log_prob: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("log_prob", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, log_prob: Tensor, num_tokens: Tensor) -> None:
        """Add summed log-probabilities and the number of tokens they cover."""
        self.log_prob += log_prob.double().sum()
        self.count += num_tokens.sum()

    def compute(self) -> Tensor:
        """``exp(-sum log p / N)``; NaN before any token."""
        if self.count == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return torch.exp(-self.log_prob / self.count)


def text_windows(
    tokenizer: Any, text_path: str | os.PathLike[str], *, max_tokens: int = 20000, window: int = 512
) -> list[list[int]]:
    """The first ``max_tokens`` tokens of a text file as windows of ``window`` tokens, BOS-prefixed if usual.

    Raises:
        KeditError: the file is missing, unreadable, not UTF-8 text or empty, or an argument is not positive.

    Example:
        >>> windows = text_windows(tokenizer, "wikitext2_test.txt", max_tokens=1000)  # doctest: +SKIP
        >>> [len(w) for w in windows]  # doctest: +SKIP
        [512, 488]
    """
    if max_tokens < 2:
        raise KeditError(f"`max_tokens` must be at least 2, got {max_tokens!r}")
    if window < 2:
        raise KeditError(f"`window` must be at least 2, got {window!r}")
    path = Path(text_path)
    if not path.is_file():
        raise KeditError(f"perplexity text {str(path)!r} is not a file; give a plain UTF-8 text file")
    # Read only as much text as the tokens need (a token is rarely longer than 16 characters).
    chars = 16 * max_tokens
    try:
        with path.open(encoding="utf-8") as handle:
            text = handle.read(chars)
            rest = handle.read(1)
    except UnicodeDecodeError as err:
        raise KeditError(f"perplexity text {str(path)!r} is not UTF-8 text ({err.reason}); give a text file") from err
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < max_tokens and rest:
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids = ids[:max_tokens]
    prefix = special_affixes(tokenizer)[0]
    windows = [prefix + ids[start : start + window] for start in range(0, len(ids), window)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise KeditError(f"perplexity text {str(path)!r} holds fewer than 2 tokens; give a longer text")
    return windows


def sequence_log_prob(model: nn.Module, input_ids: Tensor, *, start: int = 1) -> Tensor:
    """Float64 ``sum_{t >= start} log p(x_t | x_<t)`` of each row of an unpadded ``(B, T)`` batch.

    Example:
        >>> sequence_log_prob(model, torch.tensor([[40, 17, 291]]))  # doctest: +SKIP
        tensor([-7.5312], dtype=torch.float64)
    """
    logits = model(input_ids=input_ids, use_cache=False).logits
    rows, width = input_ids.shape
    picked = logits[:, start - 1 : width - 1].reshape(-1, logits.shape[-1])
    log_prob, _ = token_scores(picked, input_ids[:, start:].reshape(-1))
    return log_prob.view(rows, width - start).sum(-1)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text_path: str | os.PathLike[str],
    *,
    max_tokens: int = 20000,
    window: int = 512,
    batch_size: int = 2,
    progress: bool = False,
) -> float:
    """Perplexity of ``model`` on the first ``max_tokens`` tokens of a text file (see the module docstring).

    Args:
        model: a causal LM; put in eval mode for the call and restored after.
        tokenizer: its tokenizer.
        text_path: a UTF-8 text file.
        max_tokens: how many tokens of the text to score.
        window: tokens per window (stride = window).
        batch_size: windows per forward (the logits of a batch take ``batch_size * window * vocab`` floats).
        progress: show a tqdm bar on stderr.

    Example:
        >>> round(perplexity(model, tokenizer, "wikitext2_test.txt"), 2)  # doctest: +SKIP
        25.75
    """
    if batch_size < 1:
        raise KeditError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    windows = text_windows(tokenizer, text_path, max_tokens=max_tokens, window=window)
    skip = len(special_affixes(tokenizer)[0])
    device = next(model.parameters()).device
    metric = Perplexity()
    # Windows of equal length batch without padding; only the last one can be shorter.
    groups: dict[int, list[list[int]]] = {}
    for tokens in windows:
        groups.setdefault(len(tokens), []).append(tokens)
    batches = [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", leave=False)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = torch.tensor(batch, device=device)
            # With a BOS the first text token is predicted from it; without one, from nothing, so it is skipped.
            start = max(skip, 1)
            metric.update(sequence_log_prob(model, ids, start=start).cpu(), torch.full((len(batch),),
                                                                                      ids.shape[1] - start))
    finally:
        model.train(was_training)
    return float(metric.compute())
