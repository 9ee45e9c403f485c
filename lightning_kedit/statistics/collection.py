"""Collecting key statistics: hooks on the MLP projections, one truncated pass over any data, and a cache.

Every edit layer's keys come from the same forward pass, and the pass stops when the MLP output projection
of the last edit layer is called (its input holds the last keys), so neither that projection nor the layers
above it run: for SmolLM2 and layers 4-8 that is 9 of 30 blocks less one projection, and no LM head.
Padding (and optionally BOS) tokens are dropped through the attention mask. What remains on top of that
truncated pass is the arithmetic of the second moments (docs/benchmarks).

Example:
    >>> from lightning_kedit import load_model  # doctest: +SKIP
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> stats = collect_key_statistics(model, tokenizer, [4, 5, 6, 7, 8], max_tokens=20_000)  # doctest: +SKIP
    >>> stats.second_moment(4).shape  # doctest: +SKIP
    torch.Size([1536, 1536])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.text_windows import text_windows, window_batches
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.forward_hooks import input_hooks, run_until
from lightning_kedit.statistics.key_statistics import KeyStatistics

__all__ = [
    "KeyTracker",
    "TextPaths",
    "collect_key_statistics",
    "default_corpus_path",
    "describe_source",
    "load_or_collect_statistics",
    "model_context_length",
    "statistics_cache_path",
    "track_keys",
]

log = logging.getLogger(__name__)

#: A text file, or several.
TextPaths = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


class KeyTracker:
    """Routes the keys seen by the hooks of :func:`track_keys` into a :class:`KeyStatistics`.

    Attributes:
        statistics: where the keys go.
        mask: a ``(batch, tokens)`` mask (1 = a real token) applied to the next forward passes, or ``None``
            to keep every position. Set it before each forward pass whose batch holds padding.
        enabled: when False, the hooks record nothing (e.g. during validation steps).
    """

    def __init__(self, statistics: KeyStatistics) -> None:
        self.statistics = statistics
        self.mask: Tensor | None = None
        self.enabled = True

    def record(self, layer: int, inputs: Tensor) -> None:
        """Add the rows of ``inputs`` (``(batch, tokens, key_size)``) that :attr:`mask` keeps."""
        if not self.enabled:
            return
        keys = inputs.detach()
        if self.mask is None:
            self.statistics.update(layer, keys.reshape(-1, keys.shape[-1]))
            return
        if self.mask.numel() != keys[..., 0].numel():
            raise KeditError(
                f"the tracker's mask has shape {tuple(self.mask.shape)} but layer {layer} saw keys of shape "
                f"{tuple(keys.shape)}; set `tracker.mask` to the attention mask of the batch being run"
            )
        keep = self.mask.reshape(-1).to(device=keys.device, dtype=torch.bool)
        rows = keys.reshape(-1, keys.shape[-1])
        # Full windows (most batches of packed text) need no copy of the selected rows.
        self.statistics.update(layer, rows if bool(keep.all()) else rows[keep])


@contextmanager
def track_keys(model: nn.Module, statistics: KeyStatistics) -> Iterator[KeyTracker]:
    """Record the MLP keys of every layer of ``statistics`` on each forward pass inside the block.

    Hooks sit on the inputs of the MLP output projections and are removed when the block ends, also on
    errors. Keys are detached and accumulated in the statistics' dtype. A model run with activation
    checkpointing recomputes its forward in the backward pass: disable ``tracker.enabled`` around the
    recomputation, or the keys count twice.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64)).eval()
        >>> stats = KeyStatistics([0, 1], key_size=128)
        >>> with track_keys(model, stats) as tracker:
        ...     tracker.mask = torch.tensor([[1, 1, 0]])
        ...     _ = model(torch.tensor([[1, 2, 0]]))
        >>> stats.count(0), stats.count(1)
        (2, 2)
    """
    adapter = ModelAdapter.for_model(model)
    _check_layers(adapter, statistics.layers)
    if statistics.key_size != adapter.key_size:
        raise KeditError(
            f"statistics with key_size={statistics.key_size} cannot track {adapter.model_type} keys of size "
            f"{adapter.key_size}"
        )
    tracker = KeyTracker(statistics)

    def hook(layer: int) -> Any:
        return lambda inputs: tracker.record(layer, inputs)

    with input_hooks({adapter.mlp_out(layer): hook(layer) for layer in statistics.layers}):
        yield tracker


def _check_layers(adapter: ModelAdapter, layers: Sequence[int]) -> list[int]:
    try:
        return adapter.check_layers(list(layers))
    except ValueError as err:
        raise KeditError(str(err)) from err


def model_context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow, from its config, or None when unbounded."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_corpus_path() -> Path:
    """The bundled English Wikipedia excerpt (``lightning_kedit.requests.bundled_corpus_path``)."""
    try:
        from lightning_kedit.requests import bundled_corpus_path
    except ImportError as err:
        raise KeditError("this installation has no bundled corpus; pass a text file (--text FILE)") from err
    return Path(bundled_corpus_path())


def describe_source(source: TextPaths | Iterable[Any] | None) -> str:
    """A short description of a data source for the statistics' metadata."""
    if source is None:
        return f"text:{default_corpus_path().name}"
    if isinstance(source, (str, os.PathLike)):
        return f"text:{Path(source).name}"
    if isinstance(source, Sequence) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        return "text:" + "+".join(Path(s).name for s in source)
    return f"batches:{type(source).__name__}"


def _is_text(source: Any) -> TypeGuard[TextPaths]:
    if isinstance(source, (str, os.PathLike)):
        return True
    return isinstance(source, Sequence) and bool(source) and all(isinstance(s, (str, os.PathLike)) for s in source)


def _as_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(input_ids, attention_mask)`` from a tensor, a mapping with those keys, or a tuple of both."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise KeditError(f"a batch mapping must hold 'input_ids'; got keys {sorted(batch)}")
        return batch["input_ids"], batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0], batch[1] if len(batch) > 1 and isinstance(batch[1], Tensor) else None
    raise KeditError(
        f"cannot read token ids from a batch of type {type(batch).__name__}; give tensors of token ids, "
        "mappings with 'input_ids' (and 'attention_mask'), or (input_ids, attention_mask) tuples"
    )


def _fit_budget(ids: Tensor, mask: Tensor, remaining: int) -> tuple[Tensor, Tensor]:
    """Cut a batch so that its mask keeps at most ``remaining`` tokens (row-major order)."""
    kept = mask.reshape(-1).cumsum(0).reshape(mask.shape) <= remaining
    mask = mask * kept
    rows = int(mask.any(dim=1).nonzero().max()) + 1 if bool(mask.any()) else 0
    return ids[:rows], mask[:rows]


def collect_key_statistics(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    source: TextPaths | Iterable[Any] | None = None,
    *,
    max_tokens: int = 100_000,
    window: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    skip_bos: bool = False,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
) -> KeyStatistics:
    """The second moment of the MLP keys of ``layers``, from one truncated pass over ``source``.

    Args:
        model: a supported causal LM; it runs in eval mode and is left in the mode it was in.
        tokenizer: its tokenizer (text sources, padding id, BOS).
        layers: the edit layers.
        source: text file path(s); an iterable of batches (a ``DataLoader``; tensors of token ids, mappings
            with ``input_ids`` and ``attention_mask``, or ``(input_ids, attention_mask)`` tuples); or None for
            the bundled Wikipedia excerpt.
        max_tokens: stop after this many keys (non-padding tokens) per layer.
        window: tokens per window when reading text (at most the model's context length).
        batch_size: windows per forward pass when reading text.
        progress: show a progress bar with tokens, tokens/s and time left.
        skip_bos: leave BOS tokens out (their keys are outliers that no edit prompt ends on).
        dtype: accumulation dtype of :class:`KeyStatistics`.
        product_dtype: dtype of each batch's products (``None``: exact, in ``dtype``; ``torch.float32``: about
            1.2x instead of 1.4x the cost of the truncated forward on SmolLM2, relative error ~1e-7).

    Returns:
        The statistics, with ``.source`` describing the data.

    Raises:
        KeditError: layers outside the model, a window longer than its context, unusable text or batches.
    """
    adapter = ModelAdapter.for_model(model)
    layers = _check_layers(adapter, layers)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise KeditError(f"`max_tokens` must be a positive int, got {max_tokens!r}")
    batches: Iterable[Any]
    if source is None or _is_text(source):
        context = model_context_length(model)
        if context is not None and window > context:
            raise KeditError(
                f"`window`={window} is longer than the model's context of {context} tokens; "
                f"use --window {context} or less"
            )
        if tokenizer is None:
            raise KeditError("reading text needs the model's tokenizer; pass `tokenizer`")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        paths: TextPaths = default_corpus_path() if source is None else source
        # With BOS tokens skipped, windows hold fewer keys than tokens: let the loop below stop the reading.
        windows = text_windows(tokenizer, paths, window, max_tokens=None if skip_bos else max_tokens)
        batches = window_batches(windows, batch_size, pad_id)
    else:
        batches = cast(Iterable[Any], source)
    statistics = KeyStatistics(layers, adapter.key_size, dtype=dtype, product_dtype=product_dtype)
    statistics.source = describe_source(source)
    bos = getattr(tokenizer, "bos_token_id", None) if skip_bos else None
    device = next(model.parameters()).device
    stop = adapter.mlp_out(layers[-1])
    was_training = model.training
    model.eval()
    from tqdm.auto import tqdm

    bar = tqdm(total=max_tokens, unit="tok", unit_scale=True, disable=not progress, desc="key statistics")
    seen = 0
    try:
        with torch.no_grad(), track_keys(model, statistics) as tracker:
            for batch in batches:
                ids, mask = _as_batch(batch)
                ids = ids.unsqueeze(0) if ids.ndim == 1 else ids
                mask = torch.ones_like(ids) if mask is None else mask.to(ids.device, torch.long).reshape(ids.shape)
                if bos is not None:
                    mask = mask * (ids != bos)
                ids, mask = _fit_budget(ids, mask, max_tokens - seen)
                tokens = int(mask.sum())
                if tokens == 0:
                    continue
                tracker.mask = mask = mask.to(device)
                # The keys are the last projection's input: the pass stops before the projection itself runs.
                run_until(model, stop, before=True, input_ids=ids.to(device), attention_mask=mask, use_cache=False)
                seen += tokens
                bar.update(tokens)
                if seen >= max_tokens:
                    break
    finally:
        bar.close()
        model.train(was_training)
    if seen == 0:
        raise KeditError(f"the source {statistics.source!r} gave no tokens; give non-empty text or batches")
    return statistics


def statistics_cache_path(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    source: TextPaths | None = None,
    *,
    max_tokens: int = 100_000,
    window: int = 256,
    skip_bos: bool = False,
    product_dtype: torch.dtype | None = None,
) -> Path:
    """Where :func:`load_or_collect_statistics` caches these statistics: ``cache_dir()/stats/<digest>.safetensors``.

    The digest covers the model fingerprint (model type, sizes, the edit layers' weights, the tokenizer
    vocabulary) and the collection settings, so that other data or another budget is another entry.
    """
    from lightning_kedit.files import cache_dir
    from lightning_kedit.models.fingerprint import fingerprint_digest, model_fingerprint

    settings = f"{describe_source(source)}|{max_tokens}|{window}|{skip_bos}"
    if product_dtype not in (None, torch.float64):
        settings += f"|{product_dtype}"
    digest = fingerprint_digest(model_fingerprint(model, tokenizer, layers), settings)
    return cache_dir() / "stats" / f"{digest}.safetensors"


def load_or_collect_statistics(
    model: nn.Module,
    tokenizer: Any,
    layers: Sequence[int],
    *,
    cache: bool = True,
    source: TextPaths | None = None,
    max_tokens: int = 100_000,
    window: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    skip_bos: bool = False,
    product_dtype: torch.dtype | None = None,
    force: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> KeyStatistics:
    """Statistics from the cache when there, else collected (:func:`collect_key_statistics`) and cached.

    Args:
        model, tokenizer, layers: as for :func:`collect_key_statistics`.
        cache: read and write the cache; False always collects and writes nothing.
        source: text file path(s), or None for the bundled corpus (batches have no identity to cache by:
            use :func:`collect_key_statistics` for them).
        max_tokens, window, batch_size, progress, skip_bos, product_dtype: as for :func:`collect_key_statistics`.
        force: collect again even when the cache holds the statistics, and overwrite it.
        path: the cache file; by default :func:`statistics_cache_path`, keyed by the model fingerprint and the
            collection settings.

    Example:
        >>> stats = load_or_collect_statistics(model, tokenizer, [4, 5, 6, 7, 8])  # doctest: +SKIP
    """
    from lightning_kedit.models.fingerprint import model_fingerprint

    if source is not None and not _is_text(source):
        raise KeditError(
            f"load_or_collect_statistics caches statistics of text files only, got {type(source).__name__}; "
            "call collect_key_statistics for batches"
        )
    layers = _check_layers(ModelAdapter.for_model(model), layers)
    if path is None:
        target = statistics_cache_path(
            model,
            tokenizer,
            layers,
            source,
            max_tokens=max_tokens,
            window=window,
            skip_bos=skip_bos,
            product_dtype=product_dtype,
        )
    else:
        target = Path(path)
    if cache and not force and target.is_file():
        log.info("key statistics loaded from %s", target)
        return KeyStatistics.load(target, model=model, tokenizer=tokenizer, layers=layers)
    statistics = collect_key_statistics(
        model,
        tokenizer,
        layers,
        source,
        max_tokens=max_tokens,
        window=window,
        batch_size=batch_size,
        progress=progress,
        skip_bos=skip_bos,
        product_dtype=product_dtype,
    )
    if cache:
        statistics.save(target, model_fingerprint(model, tokenizer, layers), source=statistics.source or "")
        log.info("key statistics cached in %s", target)
    return statistics
