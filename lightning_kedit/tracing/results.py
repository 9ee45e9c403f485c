"""What a causal trace returns: the kinds of state it restores, its error, and the result dataclasses.

:class:`TraceResult` holds one prompt's indirect effects per (token, layer) cell; :class:`AverageTrace` holds
many facts' effects at the two tokens where ROME reads them (the subject's last token and the prompt's last
token). Both turn into JSON-ready dictionaries with ``to_dict``.

Example:
    >>> result = causal_trace(model, tokenizer, "The Eiffel Tower is located in", "Eiffel Tower")  # doctest: +SKIP
    >>> result.restored_probs("mlp")[result.last_subject_token]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lightning_kedit.errors import KeditError

__all__ = ["KINDS", "AverageTrace", "TraceResult", "TracingError"]

#: What a trace can restore: the residual stream (block output), the MLP output or the attention output.
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")


class TracingError(KeditError):
    """A prompt, subject or answer that cannot be traced (names the input and the fix)."""


@dataclass(frozen=True)
class TraceResult:
    """The outcome of :func:`causal_trace` for one prompt.

    Args:
        prompt: the traced prompt.
        subject: the corrupted subject, as written in the prompt.
        answer: the answer whose probability is measured (its first token), as text.
        answer_id: the token id whose probability is measured.
        tokens: the prompt's tokens as text.
        subject_range: ``(start, end)`` token indices of the subject, ``end`` exclusive.
        effects: per kind, a ``(tokens, layers)`` float64 tensor of indirect effects
            ``p(restored) - p(corrupted)``; rows of tokens that were not traced hold NaN.
        clean_prob: ``p(answer)`` of the clean run.
        corrupted_prob: ``p(answer)`` of the corrupted runs, averaged over the noise draws.
        noise: the standard deviation of the noise added to the subject's embeddings.
        samples: the number of noise draws.
        window: the number of layers restored together for ``"mlp"`` and ``"attn"``.
    """

    prompt: str
    subject: str
    answer: str
    answer_id: int
    tokens: tuple[str, ...]
    subject_range: tuple[int, int]
    effects: dict[str, Tensor]
    clean_prob: float
    corrupted_prob: float
    noise: float
    samples: int
    window: int
    kinds: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.effects))

    @property
    def last_subject_token(self) -> int:
        """Index of the subject's last token, where ROME finds the MLP effect."""
        return self.subject_range[1] - 1

    def restored_probs(self, kind: str) -> Tensor:
        """``p(restored)`` per cell: the indirect effects plus the corrupted probability."""
        return self.effects[kind] + self.corrupted_prob

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (NaN rows become ``None``)."""
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "answer": self.answer,
            "answer_id": self.answer_id,
            "tokens": list(self.tokens),
            "subject_range": list(self.subject_range),
            "clean_prob": self.clean_prob,
            "corrupted_prob": self.corrupted_prob,
            "noise": self.noise,
            "samples": self.samples,
            "window": self.window,
            "effects": {
                kind: [None if math.isnan(row[0]) else row for row in values.tolist()]
                for kind, values in self.effects.items()
            },
        }


@dataclass(frozen=True)
class AverageTrace:
    """Indirect effects of many facts at two tokens: the subject's last token and the prompt's last token.

    Args:
        kinds: the traced kinds.
        case_ids: the traced requests, in order.
        last_subject: per kind, a ``(facts, layers)`` tensor of effects at the subject's last token.
        last_token: per kind, a ``(facts, layers)`` tensor of effects at the prompt's last token.
        clean_probs: ``(facts,)`` clean probabilities of the answers.
        corrupted_probs: ``(facts,)`` corrupted probabilities of the answers.
        scanned: how many requests were looked at (unknown facts are skipped with ``known_only``).
        known_only: whether only facts the model predicts were traced.
    """

    kinds: tuple[str, ...]
    case_ids: tuple[str, ...]
    last_subject: dict[str, Tensor]
    last_token: dict[str, Tensor]
    clean_probs: Tensor
    corrupted_probs: Tensor
    scanned: int
    known_only: bool

    @property
    def n(self) -> int:
        """The number of traced facts."""
        return len(self.case_ids)

    def mean(self, kind: str, where: str = "last_subject") -> Tensor:
        """The average indirect effect per layer of ``kind`` at ``"last_subject"`` or ``"last_token"``."""
        table = {"last_subject": self.last_subject, "last_token": self.last_token}[where]
        return table[kind].mean(0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: the mean curves per kind, and the facts' probabilities."""
        return {
            "n": self.n,
            "scanned": self.scanned,
            "known_only": self.known_only,
            "case_ids": list(self.case_ids),
            "last_subject": {kind: self.mean(kind).tolist() for kind in self.kinds},
            "last_token": {kind: self.mean(kind, "last_token").tolist() for kind in self.kinds},
            "clean_prob": float(self.clean_probs.mean()) if self.n else None,
            "corrupted_prob": float(self.corrupted_probs.mean()) if self.n else None,
        }

