"""Token batches: the padding id of a tokenizer and padded ``(input_ids, attention_mask)`` from token rows.

Every batched forward pass of the library (key and target rows, answer scoring, perplexity windows, lifelong
features, the Lightning data module) pads its rows here.

Example:
    >>> ids, mask = padded_batch([[5, 6, 7], [8]], pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    >>> padded_batch([[5, 6, 7], [8]], pad_id=0, side="left")[0].tolist()
    [[5, 6, 7], [0, 0, 8]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_kedit.errors import KeditError

__all__ = ["padded_batch", "padding_id"]


def padding_id(tokenizer: Any, *, fallback: int | None = 0) -> int:
    """The id rows are padded with: the pad token, else the end-of-sequence token, else ``fallback``.

    Padding only fills masked positions, so any id serves for a forward pass; ``fallback=None`` makes a
    tokenizer with neither token an error instead (for ids that a user's training step may read).

    Raises:
        KeditError: the tokenizer has neither token and ``fallback`` is None.

    Example:
        >>> from types import SimpleNamespace
        >>> padding_id(SimpleNamespace(pad_token_id=None, eos_token_id=2))
        2
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    if fallback is None:
        raise KeditError("the tokenizer has neither a pad nor an end-of-sequence token; set tokenizer.pad_token")
    return fallback


def padded_batch(
    rows: Sequence[Sequence[int] | Tensor], pad_id: int, side: Literal["right", "left"] = "right"
) -> tuple[Tensor, Tensor]:
    """``rows`` of token ids padded with ``pad_id`` on ``side`` into ``(input_ids, attention_mask)`` (long).

    Raises:
        KeditError: no rows, or an unknown ``side``.
    """
    if side not in ("right", "left"):
        raise KeditError(f"`side`={side!r} is neither 'right' nor 'left'")
    if not rows:
        raise KeditError("no token rows to pad")
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.as_tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask
