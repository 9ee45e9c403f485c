"""Token rows for a batched forward pass: :class:`TokenRows` (right-padded ids, mask, subject positions).

Example:
    >>> rows = pad_rows([[5, 6, 7], [8]], [2, 0], pad_id=0)
    >>> rows.input_ids.tolist(), rows.lengths.tolist()
    ([[5, 6, 7], [8, 0, 0]], [3, 1])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_kedit.token_batches import padded_batch

__all__ = ["TokenRows", "pad_rows"]


@dataclass
class TokenRows:
    """Right-padded token rows and, per row, the index of the subject's last token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_pos: torch.Tensor
    lengths: torch.Tensor


def pad_rows(rows: list[list[int]], positions: list[int], pad_id: int) -> TokenRows:
    """``rows`` right-padded with ``pad_id`` into one batch; ``positions`` are each row's subject token."""
    ids, mask = padded_batch(rows, pad_id)
    lengths = mask.sum(1)
    return TokenRows(ids, mask, torch.tensor(positions, dtype=torch.long), lengths)
