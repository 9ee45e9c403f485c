"""Causal tracing (Meng et al., 2022): where in the network does a model recall a fact?

A trace runs the prompt three ways. The *clean* run records every hidden state. The *corrupted* runs add
Gaussian noise to the subject's token embeddings (``samples`` draws, seeded) so that the answer's
probability drops. The *restored* runs are corrupted runs in which the clean state of one (layer, token)
cell is put back: the block output for ``"hidden"``, or the MLP / attention outputs of a window of layers
centred on the layer for ``"mlp"`` / ``"attn"`` (ROME's Section 2.1). The indirect effect of a cell is
``p(restored) - p(corrupted)``, the probabilities averaged over the noise draws (ROME, Eq. 1-3).

All restorations go through the model batched (noise draws x cells in the batch dimension), and two
exact shortcuts avoid recomputing what every cell shares: the blocks below a batch's first restored layer
replay the corrupted run's outputs instead of running, and the tokens before the restored one come from a
key/value cache of the corrupted prefix. Cells before the subject have an effect of exactly zero (the model
is causal and the noise starts at the subject) and are not run.

Example:
    >>> from lightning_kedit import load_model  # doctest: +SKIP
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> result = causal_trace(model, tokenizer, "The Eiffel Tower is located in", "Eiffel Tower")  # doctest: +SKIP
    >>> result.effects["mlp"].shape  # (tokens, layers)  # doctest: +SKIP
    torch.Size([7, 30])
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError
from lightning_kedit.hooks import capture_outputs, first_tensor, output_hooks, replace_first_tensor
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.loading import cache_dir
from lightning_kedit.requests import EditRequest

__all__ = [
    "KINDS",
    "AverageTrace",
    "TraceResult",
    "TracingError",
    "average_trace",
    "best_window",
    "causal_trace",
    "choose_edit_layers",
    "embedding_noise_scale",
    "restored_layers",
]

#: What a trace can restore: the residual stream (block output), the MLP output or the attention output.
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")

_WHERE = ("last_subject", "last_token")  # the two tokens of an averaged trace
_NOISE_TOKENS = 8192
_CPU_CELLS_PER_BATCH = 8  # token ids sampled to measure the spread of the embeddings
_noise_scales: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


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


def embedding_noise_scale(model: nn.Module, factor: float = 3.0) -> float:
    """``factor`` times the standard deviation of the model's token embeddings (ROME's noise level).

    Measured once per model over up to 8192 token ids spread over the vocabulary, on the output of the
    embedding module (so that scaled embeddings, as in Gemma, are measured where the noise is added).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64))
        >>> 0.03 < embedding_noise_scale(model) < 0.09  # GPT-2 initialises embeddings with std 0.02
        True
    """
    if model not in _noise_scales:
        embeddings = ModelAdapter.for_model(model).embeddings()
        vocab = int(getattr(embeddings, "num_embeddings", 0) or getattr(model.config, "vocab_size", 0))
        ids = torch.linspace(0, vocab - 1, min(vocab, _NOISE_TOKENS)).long()
        with torch.no_grad():
            _noise_scales[model] = float(embeddings(ids.to(_device(model))).double().std())
    return factor * _noise_scales[model]


def restored_layers(kind: str, layer: int, window: int, num_layers: int) -> range:
    """The layers restored for the cell at ``layer``: itself for ``"hidden"``, else a centred window.

    The window is ``[layer - window // 2, layer + ceil(window / 2))`` clipped to the model, as in ROME.

    Example:
        >>> restored_layers("mlp", 0, 10, 30), restored_layers("mlp", 12, 10, 30), restored_layers("hidden", 3, 10, 30)
        (range(0, 5), range(7, 17), range(3, 4))
    """
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


@dataclass(frozen=True)
class _Prompt:
    ids: Tensor  # (T,)
    subject: tuple[int, int]
    answer_ids: tuple[int, ...]  # empty: the model's greedy prediction


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _context_length(model: nn.Module) -> int | None:
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


def _encode(model: nn.Module, tokenizer: Any, prompt: str, subject: str, answer: str | None) -> _Prompt:
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
    return _Prompt(torch.tensor(ids), (first, end), answer_ids)


@contextmanager
def _replayed(blocks: Sequence[nn.Module], outputs: Sequence[Any]) -> Iterator[None]:
    """Skip ``blocks``: each returns the matching precomputed output instead of running."""
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block, output in zip(blocks, outputs, strict=True):
            block.forward = (lambda value: lambda *args, **kwargs: value)(output)  # type: ignore[method-assign]
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward  # type: ignore[method-assign]


class _Tracer:
    """Clean, corrupted and batched restored runs of one tokenised prompt."""

    def __init__(self, model: nn.Module, prompt: _Prompt, noise: Tensor, batch_size: int) -> None:
        self.model = model
        self.adapter = ModelAdapter.for_model(model)
        self.device = _device(model)
        self.ids = prompt.ids.to(self.device)
        self.subject = prompt.subject
        self.noise = noise.to(self.device, next(self.adapter.embeddings().parameters()).dtype)
        self.samples = int(noise.shape[0])
        self.cells_per_batch = max(1, batch_size // self.samples)
        parameters = inspect.signature(model.forward).parameters
        self.keep_one = "logits_to_keep" in parameters
        # transformers 5.2x renamed ``past_key_values`` to ``cache``.
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.modules: dict[str, list[nn.Module]] = {
            "hidden": list(self.adapter.blocks),
            "mlp": [self.adapter.mlp(i) for i in range(self.adapter.num_layers)],
            "attn": [self.adapter.attn(i) for i in range(self.adapter.num_layers)],
        }
        self.clean: dict[str, list[Tensor]] = {}
        self.corrupted_blocks: list[Any] = []
        self.prefixes: dict[int, Any] = {}

    def _forward(self, ids: Tensor, past: Any = None, use_cache: bool = False) -> Any:
        kwargs: dict[str, Any] = {"use_cache": use_cache or past is not None}
        if self.keep_one:
            kwargs["logits_to_keep"] = 1
        if past is not None:
            kwargs[self.cache_name] = past
        return self.model(input_ids=ids, **kwargs)

    @contextmanager
    def _noised(self, offset: int, repeats: int) -> Iterator[None]:
        """Add the noise draws to the subject's embeddings of a forward starting at token ``offset``."""
        noise = self.noise.repeat_interleave(repeats, dim=0)  # row r holds draw r // repeats
        first, end = self.subject

        def add(embedded: Tensor) -> Tensor | None:
            lo, hi = max(first, offset), min(end, offset + embedded.shape[1])
            if lo >= hi:
                return None
            out = embedded.clone()
            out[:, lo - offset : hi - offset] += noise[:, lo - first : hi - first]
            return out

        with output_hooks({self.adapter.embeddings(): add}):
            yield

    def run_clean(self) -> Tensor:
        """The clean run: records every state, returns the next-token probabilities ``(vocab,)``."""
        names = {f"{kind}.{i}": module for kind, modules in self.modules.items() for i, module in enumerate(modules)}
        with capture_outputs(names) as seen:
            logits = self._forward(self.ids[None]).logits
        for kind, modules in self.modules.items():
            # OPT's fc2 sees tokens flattened to (batch * tokens, width): view every state as (tokens, width).
            self.clean[kind] = [seen[f"{kind}.{i}"][0].reshape(len(self.ids), -1) for i in range(len(modules))]
        return logits[0, -1].double().softmax(-1)

    def run_corrupted(self, answer: int) -> float:
        """The corrupted runs: record the block outputs (replayed later), return the mean ``p(answer)``."""
        outputs: list[Any] = [None] * len(self.modules["hidden"])

        def keep(i: int) -> Callable[[nn.Module, Any, Any], None]:
            return lambda module, args, output: outputs.__setitem__(i, output)

        handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.modules["hidden"])]
        try:
            with self._noised(0, 1):
                logits = self._forward(self.ids[None].expand(self.samples, -1)).logits
        finally:
            for handle in handles:
                handle.remove()
        self.corrupted_blocks = outputs
        return float(logits[:, -1].double().softmax(-1)[:, answer].mean())

    def _prefix(self, offset: int) -> Any:
        """The key/value cache of the corrupted run over tokens ``[0, offset)``, or None without a cache."""
        if offset not in self.prefixes:
            with self._noised(0, 1):
                out = self._forward(self.ids[None, :offset].expand(self.samples, -1), use_cache=True)
            cache = out.get(self.cache_name)
            self.prefixes[offset] = cache if hasattr(cache, "batch_repeat_interleave") else None
        return self.prefixes[offset]

    def run_cells(self, cells: Sequence[tuple[str, int, int]], window: int, answer: int) -> Tensor:
        """Mean ``p(answer)`` over the noise draws for each ``(kind, token, layer)`` restored cell."""
        num_layers = self.adapter.num_layers
        restored = {cell: restored_layers(cell[0], cell[2], window, num_layers) for cell in cells}
        # The blocks below ``entry`` replay the corrupted run. A restored block output is applied by a hook
        # that also fires on a replayed block, and nothing before it differs: its block is replayed too.
        entry = {cell: r.start + (cell[0] == "hidden") for cell, r in restored.items()}
        # Batches share a token (for the prefix cache) and, as far as possible, an entry layer: kinds mixed.
        order = sorted(range(len(cells)), key=lambda i: (cells[i][1], entry[cells[i]]))
        probs = torch.empty(len(cells), dtype=torch.float64)
        batch: list[int] = []
        for position, index in enumerate(order):
            batch.append(index)
            following = order[position + 1] if position + 1 < len(order) else None
            if len(batch) == self.cells_per_batch or following is None or cells[following][1] != cells[index][1]:
                chosen = [cells[i] for i in batch]
                probs[batch] = self._run_batch(chosen, restored, min(entry[c] for c in chosen), answer)
                batch = []
        return probs

    def _run_batch(
        self, cells: list[tuple[str, int, int]], restored: dict[tuple[str, int, int], range], entry: int, answer: int
    ) -> Tensor:
        n = len(cells)
        offset = cells[0][1]
        past = self._prefix(offset) if offset > 0 else None
        if past is None:
            offset = 0
        else:
            past = copy.deepcopy(past)
            past.batch_repeat_interleave(n)
        replay = [
            replace_first_tensor(output, first_tensor(output)[:, offset:].repeat_interleave(n, dim=0))
            for output in self.corrupted_blocks[:entry]
        ]
        # Row r = draw * n + cell: cell c owns rows c, c + n, c + 2n, ...
        rows_of = torch.arange(self.samples, device=self.device) * n
        patches: dict[tuple[str, int], list[tuple[Tensor, int]]] = {}
        for c, cell in enumerate(cells):
            for layer in restored[cell]:
                patches.setdefault((cell[0], layer), []).append((rows_of + c, cell[1]))
        hooks = {
            self.modules[kind][layer]: self._restore(kind, layer, pairs, offset, self.samples * n)
            for (kind, layer), pairs in patches.items()
        }
        with ExitStack() as stack:
            stack.enter_context(self._noised(offset, n))
            stack.enter_context(_replayed(self.modules["hidden"][:entry], replay))
            stack.enter_context(output_hooks(hooks))
            ids = self.ids[None, offset:].expand(self.samples * n, -1)
            logits = self._forward(ids, past).logits
        p = logits[:, -1].double().softmax(-1)[:, answer]
        return p.view(self.samples, n).mean(0).cpu()

    def _restore(
        self, kind: str, layer: int, pairs: list[tuple[Tensor, int]], offset: int, batch: int
    ) -> Callable[[Tensor], Tensor]:
        rows = torch.cat([r for r, _ in pairs])
        tokens = torch.cat([torch.full_like(r, t) for r, t in pairs])
        values = self.clean[kind][layer][tokens]

        def restore(output: Tensor) -> Tensor:
            out = output.clone()
            out.view(batch, -1, out.shape[-1])[rows, tokens - offset] = values.to(out.dtype)
            return out

        return restore


def _check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(kinds))
    bad = [k for k in chosen if k not in KINDS]
    if not chosen or bad:
        raise TracingError(f"`kinds`={list(kinds)} must be a non-empty subset of {list(KINDS)}")
    return chosen


def _check_settings(samples: int, window: int, batch_size: int | None, noise: float | None) -> None:
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
    kinds = _check_kinds(kinds)
    _check_settings(samples, window, batch_size, noise)
    encoded = _encode(model, tokenizer, prompt, subject, answer)
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
        per_batch = num_layers if _device(model).type == "cuda" else _CPU_CELLS_PER_BATCH
        batch_size = per_batch * samples
    tracer = _Tracer(model, encoded, draws * scale, batch_size)
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


def _greedy_token(model: nn.Module, tokenizer: Any, prompt: str) -> int:
    ids = torch.tensor([tokenizer(prompt).input_ids], device=_device(model))
    with torch.no_grad():
        return int(model(input_ids=ids).logits[0, -1].argmax())


def average_trace(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    n: int = 200,
    *,
    kinds: Sequence[str] = KINDS,
    known_only: bool = True,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    window: int = 10,
    batch_size: int | None = None,
    progress: bool = False,
) -> AverageTrace:
    """Trace up to ``n`` facts at the subject's last token and the last token, for averaged curves.

    Each request's filled prompt is traced with its ``target_true`` as the answer (the model's greedy token
    when it has none). With ``known_only`` (ROME's choice) a fact is traced only when the model's greedy
    next token is the answer's first token, and requests are scanned until ``n`` such facts are found.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        requests: the facts (CounterFact requests, for instance).
        n: how many facts to trace.
        kinds, noise, samples, seed, window, batch_size: as in :func:`causal_trace`.
        known_only: skip facts the model does not predict.
        progress: show a progress bar.

    Example:
        >>> curves = average_trace(model, tokenizer, load_requests("counterfact-val.json"), n=50)  # doctest: +SKIP
        >>> curves.mean("mlp").argmax()  # doctest: +SKIP
    """
    if not isinstance(n, int) or n < 1:
        raise TracingError(f"`n`={n!r} must be a positive integer")
    kinds = _check_kinds(kinds)
    rows: dict[str, dict[str, list[Tensor]]] = {where: {k: [] for k in kinds} for where in _WHERE}
    case_ids: list[str] = []
    probs: list[tuple[float, float]] = []
    scanned = 0
    bar = _progress(total=n, enabled=progress, desc="tracing facts")
    for request in requests:
        if len(case_ids) == n:
            break
        scanned += 1
        prompt, answer = request.prompt_text, request.target_true
        if known_only and answer is not None:
            expected = _encode(model, tokenizer, prompt, request.subject, answer).answer_ids[0]
            if _greedy_token(model, tokenizer, prompt) != expected:
                continue
        first_pass = _encode(model, tokenizer, prompt, request.subject, None)
        last_subject, last = first_pass.subject[1] - 1, len(first_pass.ids) - 1
        result = causal_trace(
            model,
            tokenizer,
            prompt,
            request.subject,
            answer,
            kinds=kinds,
            noise=noise,
            samples=samples,
            seed=seed,
            window=window,
            batch_size=batch_size,
            positions=(last_subject, last),
        )
        for kind in kinds:
            rows["last_subject"][kind].append(result.effects[kind][last_subject])
            rows["last_token"][kind].append(result.effects[kind][last])
        case_ids.append(request.case_id)
        probs.append((result.clean_prob, result.corrupted_prob))
        bar.update(1)
    bar.close()
    layers = ModelAdapter.for_model(model).num_layers

    def stack(values: list[Tensor]) -> Tensor:
        return torch.stack(values) if values else torch.empty(0, layers, dtype=torch.float64)

    clean, corrupted = (torch.tensor([p[i] for p in probs], dtype=torch.float64) for i in (0, 1))
    return AverageTrace(
        kinds=kinds,
        case_ids=tuple(case_ids),
        last_subject={k: stack(v) for k, v in rows["last_subject"].items()},
        last_token={k: stack(v) for k, v in rows["last_token"].items()},
        clean_probs=clean,
        corrupted_probs=corrupted,
        scanned=scanned,
        known_only=known_only,
    )


def best_window(curve: Tensor, window: int) -> list[int]:
    """The ``window`` consecutive layers with the largest total of ``curve`` (the first, on ties).

    Example:
        >>> best_window(torch.tensor([0.0, 0.1, 0.5, 0.4, 0.0, 0.2]), 2)
        [2, 3]
    """
    if curve.dim() != 1 or not 1 <= window <= len(curve):
        raise TracingError(f"`window`={window!r} must lie in [1, {len(curve)}] (the number of layers)")
    totals = curve.double().unfold(0, window, 1).sum(-1)
    start = int(torch.argmax(totals))
    return list(range(start, start + window))


def choose_edit_layers(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest] | None = None,
    *,
    window: int = 5,
    n: int = 50,
    samples: int = 10,
    seed: int = 0,
    trace_window: int = 10,
    cache: bool = True,
    progress: bool = False,
) -> list[int]:
    """Edit layers measured rather than guessed: the window with the largest MLP effect (``layers="auto"``).

    The MLP indirect effect at the subject's last token is averaged over up to ``n`` known facts
    (:func:`average_trace`), and the ``window`` consecutive layers with the largest total are returned.
    The averaged curve is cached in ``cache_dir()/layers/`` under a digest of the model fingerprint, the
    requests and the trace settings, so a later call with other ``window`` sizes is instant.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        requests: facts to trace; ``None`` = the bundled CounterFact facts. When the model predicts none of
            them, its own greedy answers are traced instead.
        window: how many consecutive layers to return.
        n: how many facts to average over.
        samples, seed: noise draws per cell and their seed.
        trace_window: layers restored together per MLP cell (ROME's window).
        cache: read and write the cached curve.
        progress: show a progress bar.

    Example:
        >>> choose_edit_layers(model, tokenizer)  # doctest: +SKIP
        [3, 4, 5, 6, 7]
    """
    adapter = ModelAdapter.for_model(model)
    if not isinstance(window, int) or not 1 <= window <= adapter.num_layers:
        raise TracingError(f"`window`={window!r} must lie in [1, {adapter.num_layers}] (the number of layers)")
    if requests is None:
        from lightning_kedit.requests import bundled_requests

        requests = bundled_requests()
    requests = list(requests)
    path = _curve_path(model, tokenizer, requests, n=n, samples=samples, seed=seed, trace_window=trace_window)
    if cache and path.is_file():
        return best_window(torch.tensor(json.loads(path.read_text())["curve"]), window)
    settings: dict[str, Any] = dict(kinds=("mlp",), samples=samples, seed=seed, window=trace_window, progress=progress)
    traced = average_trace(model, tokenizer, requests, n, **settings)
    if traced.n == 0:
        unknown = [replace(r, target_true=None) for r in requests]
        traced = average_trace(model, tokenizer, unknown, n, known_only=False, **settings)
    if traced.n == 0:
        raise TracingError("`requests` is empty; give at least one fact to trace")
    curve = traced.mean("mlp")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"curve": curve.tolist(), "case_ids": list(traced.case_ids), "known_only": traced.known_only}
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(entry) + "\n")
        partial.replace(path)
    return best_window(curve, window)


def _curve_path(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], **settings: Any) -> Path:
    """Where the averaged MLP curve for this model, these requests and settings is cached."""
    from lightning_kedit.models.fingerprint import fingerprint_digest, model_fingerprint

    layers = range(ModelAdapter.for_model(model).num_layers)
    facts = hashlib.sha256(
        json.dumps([(r.case_id, r.prompt_text, r.subject, r.target_true) for r in requests]).encode()
    ).hexdigest()
    key = fingerprint_digest(model_fingerprint(model, tokenizer, layers), facts, json.dumps(settings, sort_keys=True))
    return cache_dir() / "layers" / f"{key}.json"


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)
