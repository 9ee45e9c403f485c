"""The sequential cells of a benchmark run: one run of edits evaluated at each ``N``, saved and resumed.

The edited weights are saved after each evaluation and at least every :data:`CHECKPOINT_SECONDS` between
them (``state/<method>.safetensors``; AlphaEdit and the lifelong method also their history, in
``state/<method>.history/``), so that a later run continues from there.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_kedit.bench.cells import BenchContext, BenchMethod, layer_weights, restore_weights
from lightning_kedit.bench.report import BenchResults, ProgressPrinter
from lightning_kedit.bench.resource_meter import ResourceMeter
from lightning_kedit.editing.history import EditHistory, HistoryError
from lightning_kedit.files import atomic_save_safetensors
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import weights_hash

__all__ = ["CHECKPOINT_SECONDS", "read_sequential_state", "run_sequential_cells"]

#: A sequential run saves its state after each evaluation, and between them at least this often (seconds).
CHECKPOINT_SECONDS = 300.0


@dataclass
class _SequentialState:
    """The edited weights of a sequential run after ``edits`` facts (``state/<method>.safetensors``)."""

    edits: int
    edit_seconds: float
    weights: dict[int, torch.Tensor]


def read_sequential_state(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[int, torch.Tensor]] | None:
    """The metadata and the edited weight per layer of a sequential run's ``state/<method>.safetensors``.

    Returns:
        ``(metadata, {layer: weight})``; None when the file is missing, unreadable or not such a state.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            meta = dict(handle.metadata() or {})
            weights = {int(key.split(".")[1]): handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception:  # missing or unreadable: start again (the file is rewritten at the next checkpoint)
        return None
    return meta, weights


def _cuts(counts: Sequence[int], edits: int, batch: int) -> str:
    """Where a run of ``edits`` edits cut its batches short (the counts below it), when batches can be cut."""
    return json.dumps([n for n in counts if n < edits] if batch > 1 else [])


def _load_state(path: Path, model: nn.Module, method: BenchMethod, context: BenchContext,
                counts: Sequence[int], pending: Sequence[int], batch: int) -> _SequentialState | None:
    """The saved state of a sequential run, when it was made on this model's weights with these settings.

    With batches of more than one request, the state must also have been cut into batches at the same counts:
    a run evaluated at other counts edited other batches.
    """
    read = read_sequential_state(path) if path.is_file() else None
    if read is None:
        return None
    meta, weights = read
    try:
        edits, base = int(meta["edits"]), json.loads(meta["base"])
    except (KeyError, ValueError):
        return None
    adapter = ModelAdapter.for_model(model)
    usable = (
        meta.get("settings") == context.settings_digest(method)
        and edits < len(context.digests) and meta.get("requests") == context.digests[edits]
        and all(n >= edits for n in pending)
        and meta.get("cuts", "[]") == _cuts(counts, edits, batch)
        and set(base) == {str(layer) for layer in weights}
        and all(weights_hash(adapter.weight(int(layer))) == h for layer, h in base.items())
    )
    return _SequentialState(edits, float(meta.get("edit_seconds", 0.0)), weights) if usable else None


def _save_state(path: Path, model: nn.Module, method: BenchMethod, context: BenchContext,
                base: Mapping[int, torch.Tensor], edits: int, edit_seconds: float, cuts: str) -> None:
    """Save the edited weights atomically, unless a state with more edits is already there."""

    existing = read_sequential_state(path) if path.is_file() else None
    if existing is not None and int(existing[0].get("edits", 0)) > edits:
        return
    adapter = ModelAdapter.for_model(model)
    tensors = {f"layers.{layer}": adapter.weight(layer).detach().cpu().contiguous() for layer in base}
    metadata = {
        "method": method.name, "edits": str(edits), "edit_seconds": str(edit_seconds),
        "requests": context.digests[edits], "settings": context.settings_digest(method),
        "base": json.dumps({str(layer): weights_hash(weight) for layer, weight in base.items()}),
        "cuts": cuts,
    }
    atomic_save_safetensors(tensors, path, metadata)


def _load_history(folder: Path, state: _SequentialState | None) -> EditHistory | None:
    """AlphaEdit's history saved beside ``state``, cut back to the state's edits (None if it holds fewer).

    The history is written before the weights, so a run stopped between the two writes leaves a history some
    batches ahead of the state: those batches are forgotten and computed again.
    """
    if state is None or not (folder / "history.json").is_file():
        return None
    try:
        history = EditHistory.load(folder)
    except HistoryError:
        return None
    edits_after = [0]  # edits_after[b]: the requests written by the first b batches
    for entry in history:
        edits_after.append(edits_after[-1] + len(entry.delta.request_ids))
    if state.edits not in edits_after:
        return None
    history.truncate(edits_after.index(state.edits))
    return history


def run_sequential_cells(model: nn.Module, method: BenchMethod, counts: list[int], context: BenchContext,
                    results: BenchResults, progress: ProgressPrinter) -> None:
    """One run of edits (``batch_size`` facts at a time), evaluated at each N; base weights restored at the end."""
    path = results.folder / "state" / f"{method.name}.safetensors"
    history_dir = path.with_suffix(".history")
    batch = 1 if method.method == "rome" else context.batch_size
    pending = [n for n in counts if results.row(method.name, n) is None]
    state = _load_state(path, model, method, context, counts, pending, batch)
    history = None
    if method.method in ("alphaedit", "lifelong"):
        # Each batch must keep the keys (AlphaEdit) or running statistics (lifelong) of all earlier ones:
        # without the saved history, start again.
        history = _load_history(history_dir, state)
        state = state if history is not None else None
        history = history if history is not None else EditHistory()
    done, edit_total = (state.edits, state.edit_seconds) if state else (0, 0.0)
    base = layer_weights(model, list(state.weights)) if state else {}

    def checkpoint() -> None:
        if history is not None:
            history.save(history_dir)  # before the weights: a state is only used with a history that matches
        _save_state(path, model, method, context, base, done, edit_total, _cuts(counts, done, batch))

    saved_at = time.perf_counter()
    try:
        if state:
            restore_weights(model, state.weights)
        for n in counts:
            if n not in pending and n <= done:
                continue
            if n in pending:
                progress.start(method.name, n)
            edits, hits, phases = n - done, context.target_cache.hits, dict[str, float]()
            with ResourceMeter() as meter:
                while done < n:
                    chunk = context.requests[done : min(done + batch, n)]
                    start = time.perf_counter()
                    keys: dict[int, torch.Tensor] = {}
                    extras: dict[str, torch.Tensor] = {}
                    delta = context.compute_edit(model, chunk, method, phases, history, keys, extras)
                    base.update(layer_weights(model, [layer for layer in delta.layers if layer not in base]))
                    delta.apply(model)
                    if history is not None:
                        history.push(delta, keys, model=None, initial=base, extras=extras)
                    edit_total += time.perf_counter() - start
                    done += len(chunk)
                    if done < n and time.perf_counter() - saved_at > CHECKPOINT_SECONDS:
                        checkpoint()  # a long stretch between evaluations resumes from here
                        saved_at = time.perf_counter()
                if n in pending:
                    metrics, eval_s = context.evaluate(model, n)
            if n in pending:
                row = context.row(method.name, n, metrics, edit_total, eval_s, meter, sequential=True,
                                  batch_size=batch, phases=phases, cached_targets=context.target_cache.hits - hits)
                results.add(row)
                progress.finish(row, edits)
            checkpoint()
            saved_at = time.perf_counter()
    finally:
        restore_weights(model, base)
