"""Success by number of edits: the harness behind ``kedit bench``.

For every method and every number of edits ``N`` (a *cell*) the harness edits the first ``N`` requests and
measures efficacy (the success rate), paraphrase, neighbourhood, score and, with a text, perplexity, on all
``N`` facts, with the wall and CPU seconds and the peak memory of the cell.

- Batch methods (``memit``, ``ft``, ``rome``, ``alphaedit``) run each ``N`` from the unedited weights: the delta
  is computed, applied, evaluated and reverted bit for bit before the next cell.
- Sequential methods (``rome-seq``, ``memit-seq``, ``ft-seq``, ``alphaedit-seq``) edit once, ``batch_size``
  facts at a time (ROME: one), and evaluate at each ``N`` on every fact edited so far. The edited weights are
  saved after each evaluation and at least every :data:`CHECKPOINT_SECONDS` between them
  (``state/<method>.safetensors``; AlphaEdit also its :class:`~lightning_kedit.editing.history.EditHistory`,
  whose keys each later batch must keep, in ``state/<method>.history/``), so a later run continues from there.
  A batch is cut short at each ``N``, so a saved state is continued only by a run with the same ``N`` below it.
  A resumed cell's ``edit_seconds`` counts from the first edit; its CPU seconds, peak memory and phases cover
  the resumed part only.
- ``unedited`` rows (the model before editing) give the floor that editing must beat.

Finished cells are kept in ``results.json`` (written atomically after every cell), and a run resumes by
skipping them; target values are cached on disk by :class:`~lightning_kedit.editing.target_cache.TargetCache`,
so that ``N = 1,000`` reuses the work of ``N = 100``. ``results.md`` and ``success_vs_edits.png``
(:mod:`lightning_kedit.bench_report`) are rewritten after every cell. Peak memory is the largest resident set
size (RSS) of the process during the cell, sampled every 50 ms with psutil when it is installed, else the
process's lifetime ``ru_maxrss`` (an upper bound); on a GPU also ``torch.cuda.max_memory_allocated``
(:class:`~lightning_kedit.resource_meter.ResourceMeter`).

Example:
    >>> from lightning_kedit import load_model, load_requests  # doctest: +SKIP
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> requests = load_requests("counterfact-val.json")  # doctest: +SKIP
    >>> results = run_bench(model, tokenizer, requests, methods="memit,rome-seq", counts="1,10",
    ...                     out_dir="bench")  # doctest: +SKIP
    >>> results.row("memit", 10)["efficacy"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kedit.atomic_files import atomic_save_safetensors
from lightning_kedit.bench_report import BenchError, BenchResults, ProgressPrinter, write_report
from lightning_kedit.editing.history import EditHistory, HistoryError
from lightning_kedit.editing.hparams import METHODS, EditHyperParams
from lightning_kedit.editing.target_cache import TargetCache, request_digest
from lightning_kedit.metrics import evaluate_requests
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import fingerprint_digest, model_fingerprint, weights_hash
from lightning_kedit.requests import EditRequest
from lightning_kedit.resource_meter import ResourceMeter

__all__ = [
    "BENCH_METHODS",
    "UNEDITED",
    "BenchError",
    "BenchMethod",
    "BenchResults",
    "ResourceMeter",
    "available_methods",
    "parse_counts",
    "parse_methods",
    "read_sequential_state",
    "run_bench",
]

#: The method name of the rows that measure the model before editing.
UNEDITED = "unedited"
#: A sequential run saves its state after each evaluation, and between them at least this often (seconds).
CHECKPOINT_SECONDS = 300.0
#: The editing methods the harness runs, batch or ``-seq``.
BENCH_METHODS: tuple[str, ...] = METHODS


@dataclass(frozen=True)
class BenchMethod:
    """A benchmarked method: the editing method and whether it edits sequentially.

    Example:
        >>> BenchMethod.parse("rome-seq")
        BenchMethod(name='rome-seq', method='rome', sequential=True)
    """

    name: str
    method: str
    sequential: bool

    @classmethod
    def parse(cls, name: str) -> BenchMethod:
        """``"memit"``, ``"ft"`` (batch) or ``"<method>-seq"`` (sequential)."""
        text = name.strip().lower()
        base, sequential = (text[: -len("-seq")], True) if text.endswith("-seq") else (text, False)
        known = ", ".join(available_methods())
        if base not in BENCH_METHODS:
            raise BenchError(f"unknown method {name!r} in --methods; known methods: {known}")
        return cls(text, base, sequential)


def available_methods() -> list[str]:
    """Every name :meth:`BenchMethod.parse` accepts."""
    return [*BENCH_METHODS, *(f"{m}-seq" for m in BENCH_METHODS)]


def parse_methods(methods: str | Sequence[str]) -> list[BenchMethod]:
    """Comma-separated (or listed) method names, without duplicates, in order.

    Example:
        >>> [m.name for m in parse_methods("memit, rome-seq")]
        ['memit', 'rome-seq']
    """
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    parsed = list(dict.fromkeys(BenchMethod.parse(name) for name in names if name.strip()))
    if not parsed:
        raise BenchError(f"--methods {methods!r} names no method; give e.g. 'memit,rome-seq,ft'")
    return parsed


def parse_counts(counts: str | Sequence[int], available: int | None = None) -> list[int]:
    """Comma-separated numbers of edits, sorted, checked against the ``available`` requests.

    Example:
        >>> parse_counts("100,1,10")
        [1, 10, 100]
    """
    try:
        values = [int(c) for c in counts.split(",") if c.strip()] if isinstance(counts, str) else list(map(int, counts))
    except ValueError as err:
        raise BenchError(f"--n {counts!r} is not a list of numbers of edits like '1,10,100'") from err
    if not values or min(values) < 1:
        raise BenchError(f"--n {counts!r}: give positive numbers of edits like '1,10,100'")
    if available is not None and max(values) > available:
        raise BenchError(
            f"--n {max(values)} is larger than the {available} requests in the request file; "
            f"give numbers of edits up to {available}"
        )
    return sorted(set(values))


def _prefix_digests(requests: Sequence[EditRequest]) -> list[str]:
    """``out[n]``: a digest of ``requests[:n]`` (the facts a cell of ``N = n`` edits and evaluates)."""
    digest = hashlib.sha256()
    out = [digest.hexdigest()[:16]]
    for request in requests:
        digest.update(f"{request.case_id}:{request_digest(request)};".encode())
        out.append(digest.hexdigest()[:16])
    return out


def _layer_weights(model: nn.Module, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    adapter = ModelAdapter.for_model(model)
    return {layer: adapter.weight(layer).detach().clone() for layer in layers}


def _restore(model: nn.Module, weights: Mapping[int, torch.Tensor]) -> None:
    adapter = ModelAdapter.for_model(model)
    with torch.no_grad():
        for layer, weight in weights.items():
            adapter.weight(layer).copy_(weight)


@dataclass
class _Context:
    """What every cell of one benchmark run shares."""

    tokenizer: Any
    requests: Sequence[EditRequest]
    digests: list[str]
    statistics: Any  # resolved once, on the unedited weights (None when only FT runs)
    hparams: dict[str, EditHyperParams]
    target_cache: TargetCache
    ppl_text: str | None
    ppl_tokens: int
    eval_batch_size: int
    batch_size: int
    verbose: bool

    def compute_edit(self, model: nn.Module, requests: Sequence[EditRequest], method: BenchMethod,
                     timings: dict[str, float], history: EditHistory | None = None,
                     keys: dict[int, torch.Tensor] | None = None,
                     extras: dict[str, torch.Tensor] | None = None) -> Any:
        """The delta of ``requests``; phase seconds are added to ``timings``.

        ``history`` and ``keys`` (AlphaEdit's sequence) or ``extras`` (the lifelong method's) are passed on
        only when given.
        """
        from lightning_kedit.editing import editor

        hp = self.hparams[method.name]
        phases: dict[str, float] = {}
        common: dict[str, Any] = dict(method=method.method, statistics=self.statistics, hparams=hp,
                                      progress=self.verbose, timings=phases, target_cache=self.target_cache)
        if history is not None and method.method == "lifelong":  # its running statistics travel in `extras`
            common.update(history=history, extras=extras)
        elif history is not None:  # AlphaEdit's sequence; the other methods take neither argument
            common.update(history=history, keys=keys)
        delta = editor.compute_edit(model, self.tokenizer, list(requests), **common)
        for phase, seconds in phases.items():
            timings[phase] = round(timings.get(phase, 0.0) + seconds, 3)
        return delta

    def evaluate(self, model: nn.Module, n: int) -> tuple[dict[str, Any], float]:
        start = time.perf_counter()
        metrics = evaluate_requests(
            model, self.tokenizer, self.requests[:n], batch_size=self.eval_batch_size, ppl_text=self.ppl_text,
            ppl_tokens=self.ppl_tokens,
        )
        return metrics, time.perf_counter() - start

    def row(self, method: str, n: int, metrics: Mapping[str, Any], edit_s: float, eval_s: float,
            meter: ResourceMeter, **extra: Any) -> dict[str, Any]:
        rates = {k: metrics[k] for k in ("efficacy", "paraphrase", "neighborhood", "score")}
        row = {"method": method, "n": n, **rates, "perplexity": metrics["perplexity"],
               "seconds": round(edit_s + eval_s, 3)}
        row.update({f"{k}_prob": metrics[f"{k}_prob"] for k in ("efficacy", "paraphrase", "neighborhood")})
        row.update(edit_seconds=round(edit_s, 3), eval_seconds=round(eval_s, 3),
                   cpu_seconds=round(meter.cpu_seconds, 3), peak_rss_mb=round(meter.peak_mb, 1),
                   requests_digest=self.digests[n], **extra)
        if meter.cuda_mb is not None:
            row["peak_cuda_mb"] = round(meter.cuda_mb, 1)
        return row

    def settings_digest(self, method: BenchMethod) -> str:
        payload = json.dumps([self.hparams[method.name].to_dict(), self.batch_size], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _run_batch(model: nn.Module, method: BenchMethod, counts: list[int], context: _Context,
               results: BenchResults, progress: ProgressPrinter) -> None:
    """Each N from the unedited weights: compute, apply, evaluate, revert (bit-exact)."""
    for n in counts:
        progress.start(method.name, n)
        hits, phases = context.target_cache.hits, dict[str, float]()
        with ResourceMeter() as meter:
            start = time.perf_counter()
            delta = context.compute_edit(model, context.requests[:n], method, phases)
            edit_s = time.perf_counter() - start
            with delta.applied(model):
                metrics, eval_s = context.evaluate(model, n)
        row = context.row(method.name, n, metrics, edit_s, eval_s, meter, sequential=False, phases=phases,
                          cached_targets=context.target_cache.hits - hits)
        results.add(row)
        progress.finish(row, n)


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


def _load_state(path: Path, model: nn.Module, method: BenchMethod, context: _Context,
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


def _save_state(path: Path, model: nn.Module, method: BenchMethod, context: _Context,
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


def _run_sequential(model: nn.Module, method: BenchMethod, counts: list[int], context: _Context,
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
    base = _layer_weights(model, list(state.weights)) if state else {}

    def checkpoint() -> None:
        if history is not None:
            history.save(history_dir)  # before the weights: a state is only used with a history that matches
        _save_state(path, model, method, context, base, done, edit_total, _cuts(counts, done, batch))

    saved_at = time.perf_counter()
    try:
        if state:
            _restore(model, state.weights)
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
                    base.update(_layer_weights(model, [layer for layer in delta.layers if layer not in base]))
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
        _restore(model, base)


def _check_restored(model: nn.Module, base_hashes: Mapping[int, str]) -> None:
    """Raise when a cell left a weight different from the original (a revert that was not exact)."""
    adapter = ModelAdapter.for_model(model)
    changed = [layer for layer, h in base_hashes.items() if weights_hash(adapter.weight(layer)) != h]
    if changed:
        raise BenchError(f"layers {changed} were not restored bit for bit after a benchmark cell")


def run_bench(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    methods: str | Sequence[str],
    counts: str | Sequence[int],
    out_dir: str | os.PathLike[str],
    model_name: str = "",
    requests_name: str = "",
    statistics: Any = None,
    hparams: Mapping[str, Any] | None = None,
    batch_size: int = 100,
    baseline: bool = True,
    ppl_text: str | os.PathLike[str] | None = None,
    ppl_tokens: int = 20000,
    eval_batch_size: int = 32,
    target_cache: TargetCache | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> BenchResults:
    """Run every (method, N) cell not yet in ``out_dir/results.json`` and write the results, table and plot.

    Args:
        model: the model to edit (left with its original weights, also when interrupted).
        tokenizer: its tokenizer.
        requests: the facts, in order; cell ``N`` edits the first ``N``.
        methods: batch methods (``memit``, ``rome``, ``ft``, ``alphaedit``) and sequential ones (the same with
            ``-seq``: ``rome-seq``, ``memit-seq``, ``ft-seq``, ``alphaedit-seq``).
        counts: the numbers of edits, e.g. ``"1,10,100"``.
        out_dir: the output folder; results of other cells already there are kept and skipped.
        model_name: the model spec written to ``results.json``.
        requests_name: the request file written to ``results.json``.
        statistics: key statistics passed to the editor (None: the editor's cached default).
        hparams: hyper-parameter overrides applied to every method's per-model defaults.
        batch_size: facts per edit of the sequential methods (ROME: always one).
        baseline: also evaluate the unedited model at each N (``unedited`` rows).
        ppl_text: a text file for perplexity (None: no perplexity).
        ppl_tokens: tokens of ``ppl_text`` scored per cell.
        eval_batch_size: sequences per forward of the evaluation.
        target_cache: the target-value cache (None: the default folder under ``cache_dir()``).
        progress: print a line per cell with the time left.
        verbose: also show the editor's own progress.

    Returns:
        The :class:`~lightning_kedit.bench_report.BenchResults` of ``out_dir``.

    Raises:
        BenchError: an unknown method, ``N`` larger than the request list, or an ``out_dir`` holding results
            of another model, other requests or other settings (nothing is written then).
    """
    parsed = parse_methods(methods)
    ns = parse_counts(counts, len(requests))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise BenchError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if ppl_text is not None and not Path(ppl_text).is_file():
        raise BenchError(f"--ppl-text {ppl_text}: no such file; give a plain-text file for perplexity")
    adapter = ModelAdapter.for_model(model)
    overrides = dict(hparams or {})
    per_method = {m.name: EditHyperParams.for_model(model, m.method).replace(**overrides) for m in parsed}
    fingerprint = fingerprint_digest(model_fingerprint(model, tokenizer, range(adapter.num_layers)))
    settings = {
        "hparams": {name: hp.to_dict() for name, hp in per_method.items()},
        "batch_size": batch_size,
        "perplexity_text": Path(ppl_text).name if ppl_text else None,
        "perplexity_tokens": ppl_tokens if ppl_text else None,
    }
    results = BenchResults.open(out_dir, model=model_name, requests=requests_name, fingerprint=fingerprint,
                                settings=settings)
    digests = _prefix_digests(requests)
    results.check_requests(lambda n: digests[n] if n < len(digests) else None)
    names = ([UNEDITED] if baseline else []) + [m.name for m in parsed]
    todo = {name: [n for n in ns if results.row(name, n) is None] for name in names}
    if any(todo[m.name] for m in parsed if m.method not in ("ft", "lifelong")):
        from lightning_kedit.editing import edit_inputs

        # Once, on the unedited weights, for the layers of every method: their fingerprint is part of the
        # statistics' cache key, and a sequential run (or its restored state) changes them.
        stat_layers = sorted({layer for m in parsed if m.method not in ("ft", "lifelong")
                              for layer in per_method[m.name].layers})
        statistics = edit_inputs.resolve_statistics(model, tokenizer, stat_layers, statistics, progress=verbose)
    context = _Context(tokenizer, requests, digests, statistics, per_method, target_cache or TargetCache(),
                       str(ppl_text) if ppl_text else None, ppl_tokens, eval_batch_size, batch_size, verbose)
    cells = [(UNEDITED, n, 0) for n in todo.get(UNEDITED, [])]
    for m in parsed:
        previous = 0
        for n in ns:
            if n in todo[m.name]:
                cells.append((m.name, n, n - previous if m.sequential else n))
            previous = n
    reporter = ProgressPrinter(cells, progress)
    if progress:
        finished = len(names) * len(ns) - len(cells)
        print(f"[bench] {len(cells)} cell(s) to run, {finished} already in {results.path}", file=sys.stderr,
              flush=True)
    base_hashes = {layer: weights_hash(adapter.weight(layer)) for layer in range(adapter.num_layers)}
    try:
        for n in todo.get(UNEDITED, []):
            reporter.start(UNEDITED, n)
            with ResourceMeter() as meter:
                metrics, eval_s = context.evaluate(model, n)
            row = context.row(UNEDITED, n, metrics, 0.0, eval_s, meter)
            results.add(row)
            reporter.finish(row, 0)
        for m in parsed:
            if todo[m.name]:
                if m.sequential:
                    _run_sequential(model, m, ns, context, results, reporter)
                else:
                    _run_batch(model, m, todo[m.name], context, results, reporter)
                _check_restored(model, base_hashes)
    finally:
        if results.rows:
            write_report(results)
    return results
