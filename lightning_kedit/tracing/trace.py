"""Causal tracing (Meng et al., 2022) of one prompt: where in the network does a model recall a fact?

A trace runs the prompt three ways (:class:`~.tracer.Tracer`): clean, corrupted (Gaussian noise on the
subject's token embeddings, ``samples`` seeded draws, so that the answer's probability drops) and restored (a
corrupted run with the clean state of one (layer, token) cell put back). The indirect effect of a cell is
``p(restored) - p(corrupted)``, the probabilities averaged over the noise draws (ROME, Eq. 1-3). Cells before
the subject have an effect of exactly zero (the model is causal and the noise starts at the subject) and are
not run.

Example:
    >>> result = causal_trace(model, tokenizer, "The Eiffel Tower is located in", "Eiffel Tower")  # doctest: +SKIP
    >>> result.effects["mlp"].shape  # (tokens, layers)  # doctest: +SKIP
    torch.Size([7, 30])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.models.adapters import ModelAdapter

from .results import KINDS, TraceResult, TracingError
from .tracer import Tracer, embedding_noise_scale, model_device

__all__ = ["EncodedPrompt", "causal_trace", "check_kinds", "encode_prompt"]

_CPU_CELLS_PER_BATCH = 8  # cells per forward on a CPU, so that batches skip more shared layers


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenised prompt: its ids, the subject's token range and the answer's token ids.

    Args:
        ids: the prompt's token ids, ``(tokens,)``.
        subject: ``(start, end)`` token indices of the subject, ``end`` exclusive.
        answer_ids: the answer's token ids after the prompt; empty: the model's greedy prediction.
    """

    ids: Tensor
    subject: tuple[int, int]
    answer_ids: tuple[int, ...]


def _context_length(model: nn.Module) -> int | None:
    """The most tokens ``model`` reads, from its config (None when it does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _subject_range(tokenizer: Any, prompt: str, start: int, end: int, ids: list[int]) -> tuple[int, int]:
    """Token indices ``[first, last + 1)`` of the characters ``prompt[start:end]``."""
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        return inside[0], inside[-1] + 1
    except (NotImplementedError, KeyError, IndexError):  # slow tokenizers have no offsets
        first = len(tokenizer(prompt[:start]).input_ids)
        last = len(tokenizer(prompt[:end]).input_ids)
        return min(first, len(ids) - 1), max(min(last, len(ids)), first + 1)


def encode_prompt(
    model: nn.Module, tokenizer: Any, prompt: str, subject: str, answer: str | None
) -> EncodedPrompt:
    """Tokenise ``prompt`` and ``answer`` and locate ``subject``, refusing what cannot be traced.

    Raises:
        TracingError: an empty prompt or subject, a subject not in the prompt, a prompt longer than the
            model's context, or an answer that adds no token.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise TracingError(f"`prompt`={prompt!r} is empty; give the text that precedes the answer")
    if not isinstance(subject, str) or not subject.strip():
        raise TracingError(f"`subject`={subject!r} is empty; give the subject as written in the prompt")
    start = prompt.find(subject)
    if start < 0:
        raise TracingError(
            f"`subject`={subject!r} does not occur in `prompt`={prompt!r}; give it exactly as written there"
        )
    ids = tokenizer(prompt).input_ids
    context = _context_length(model)
    if context is not None and len(ids) > context:
        raise TracingError(f"`prompt` has {len(ids)} tokens but the model reads at most {context}; shorten the prompt")
    answer_ids: tuple[int, ...] = ()
    if answer is not None:
        # Answers are stored without a leading space and joined to the prompt at a word boundary.
        text = answer if prompt[-1:].isspace() or answer[:1].isspace() else " " + answer
        full = tokenizer(prompt + text).input_ids
        rest = full[len(ids) :] if full[: len(ids)] == ids else tokenizer(text, add_special_tokens=False).input_ids
        if not answer.strip() or not rest:
            raise TracingError(
                f"`answer`={answer!r} adds no token after the prompt; give a non-empty continuation "
                "(or None for the model's own prediction)"
            )
        answer_ids = tuple(rest)
    first, end = _subject_range(tokenizer, prompt, start, start + len(subject), ids)
    return EncodedPrompt(torch.tensor(ids), (first, end), answer_ids)


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` without repeats, checked to be a non-empty subset of :data:`~.results.KINDS`."""
    chosen = tuple(dict.fromkeys(kinds))
    bad = [k for k in chosen if k not in KINDS]
    if not chosen or bad:
        raise TracingError(f"`kinds`={list(kinds)} must be a non-empty subset of {list(KINDS)}")
    return chosen


def _check_settings(samples: int, window: int, batch_size: int | None, noise: float | None) -> None:
    """Raise :class:`TracingError` for a setting of :func:`causal_trace` outside its range."""
    if not isinstance(samples, int) or samples < 1:
        raise TracingError(f"`samples`={samples!r} must be a positive integer")
    if not isinstance(window, int) or window < 1:
        raise TracingError(f"`window`={window!r} must be a positive integer")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise TracingError(f"`batch_size`={batch_size!r} must be a positive integer or None")
    if noise is not None and not (math.isfinite(noise) and noise >= 0):
        raise TracingError(f"`noise`={noise!r} must be a finite non-negative standard deviation")


@torch.no_grad()
def causal_trace(
    model: nn.Module,
    tokenizer: Any,
    prompt: str,
    subject: str,
    answer: str | None = None,
    *,
    kinds: Sequence[str] = KINDS,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    window: int = 10,
    batch_size: int | None = None,
    positions: Sequence[int] | None = None,
) -> TraceResult:
    """Trace which states carry the fact ``prompt -> answer`` about ``subject``.

    Args:
        model: a causal LM supported by :class:`~lightning_kedit.models.adapters.ModelAdapter`.
        tokenizer: its tokenizer.
        prompt: the text before the answer, holding ``subject``.
        subject: the part of the prompt to corrupt (its first occurrence).
        answer: the expected continuation (stored without a leading space); its first token is measured.
            ``None`` measures the model's own greedy next token.
        kinds: any of ``"hidden"``, ``"mlp"``, ``"attn"``.
        noise: standard deviation of the Gaussian noise; ``None`` = :func:`embedding_noise_scale` (3x).
        samples: noise draws per cell, drawn once from ``seed`` and shared by every cell.
        seed: the seed of the noise draws.
        window: layers restored together for ``"mlp"`` and ``"attn"`` (see :func:`restored_layers`).
        batch_size: sequences per forward pass (noise draws x cells). ``None``: on a GPU, every layer of a
            token in one forward; on a CPU, 8 cells per forward, so that batches skip more shared layers.
        positions: token indices to trace (``None``: all); other rows of the result hold NaN.

    Returns:
        A :class:`TraceResult`.

    Raises:
        TracingError: a subject not in the prompt, an empty answer, a prompt longer than the context, or
            an invalid setting.

    Example:
        >>> result = causal_trace(model, tokenizer, "The Eiffel Tower is located in", "Eiffel Tower",
        ...                       "Paris", kinds=("mlp",))  # doctest: +SKIP
        >>> result.effects["mlp"][result.last_subject_token].argmax()  # doctest: +SKIP
    """
    kinds = check_kinds(kinds)
    _check_settings(samples, window, batch_size, noise)
    encoded = encode_prompt(model, tokenizer, prompt, subject, answer)
    num_tokens = len(encoded.ids)
    traced = list(range(num_tokens)) if positions is None else sorted({int(p) for p in positions})
    if any(not 0 <= p < num_tokens for p in traced):
        raise TracingError(f"`positions`={list(positions or [])} must lie in [0, {num_tokens - 1}]")
    scale = embedding_noise_scale(model) if noise is None else float(noise)
    adapter = ModelAdapter.for_model(model)
    num_layers = adapter.num_layers
    first, end = encoded.subject
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randn((samples, end - first, adapter.value_size), generator=generator, dtype=torch.float64)
    if batch_size is None:
        per_batch = num_layers if model_device(model).type == "cuda" else _CPU_CELLS_PER_BATCH
        batch_size = per_batch * samples
    tracer = Tracer(model, encoded.ids, encoded.subject, draws * scale, batch_size)
    clean = tracer.run_clean()
    answer_id = encoded.answer_ids[0] if encoded.answer_ids else int(clean.argmax())
    corrupted = tracer.run_corrupted(answer_id)
    cells = [(kind, p, layer) for kind in kinds for p in traced if p >= first for layer in range(num_layers)]
    probs = tracer.run_cells(cells, window, answer_id) if cells else torch.empty(0, dtype=torch.float64)
    effects: dict[str, Tensor] = {}
    for kind in kinds:
        values = torch.full((num_tokens, num_layers), math.nan, dtype=torch.float64)
        values[[p for p in traced if p < first]] = 0.0  # before the subject nothing was corrupted
        effects[kind] = values
    for (kind, token, layer), p in zip(cells, probs.tolist(), strict=True):
        effects[kind][token, layer] = p - corrupted
    tokens = tuple(tokenizer.decode([int(i)]) for i in encoded.ids)
    return TraceResult(
        prompt=prompt,
        subject=subject,
        answer=answer if answer is not None else tokenizer.decode([answer_id]),
        answer_id=answer_id,
        tokens=tokens,
        subject_range=encoded.subject,
        effects=effects,
        clean_prob=float(clean[answer_id]),
        corrupted_prob=corrupted,
        noise=scale,
        samples=samples,
        window=window,
    )
