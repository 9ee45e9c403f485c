"""Token rows for a batched forward pass: :class:`TokenRows` (right-padded ids, mask, subject positions).

Example:
    >>> rows = pad_rows([[5, 6, 7], [8]], [2, 0], pad_id=0)
    >>> rows.input_ids.tolist(), rows.lengths.tolist()
    ([[5, 6, 7], [8, 0, 0]], [3, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["TokenRows", "pad_rows", "padding_id"]


@dataclass
class TokenRows:
    """Right-padded token rows and, per row, the index of the subject's last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor
    lengths: torch.Tensor


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id rows are padded with: the pad token, else the end-of-sequence token, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def pad_rows(rows: list[list[int]], positions: list[int], pad_id: int) -> TokenRows:
    """``rows`` right-padded with ``pad_id`` into one batch; ``positions`` are each row's subject token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    lengths = mask.sum(1)
    return TokenRows(ids, mask, torch.tensor(positions, dtype=torch.long), lengths)
