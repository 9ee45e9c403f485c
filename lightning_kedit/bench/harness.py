"""Success by number of edits: the harness behind ``kedit bench``.

For every method and every number of edits ``N`` (a *cell*) the harness edits the first ``N`` requests and
measures efficacy (the success rate), paraphrase, neighbourhood, score and, with a text, perplexity, on all
``N`` facts, with the wall and CPU seconds and the peak memory of the cell.

- Batch methods (``memit``, ``ft``, ``rome``, ``alphaedit``) run each ``N`` from the unedited weights: the delta
  is computed, applied, evaluated and reverted bit for bit before the next cell.
- Sequential methods (``rome-seq``, ``memit-seq``, ``ft-seq``, ``alphaedit-seq``) edit once, ``batch_size``
  facts at a time (ROME: one), and evaluate at each ``N`` on every fact edited so far. The edited weights are
  saved after each evaluation and at least every :data:`~.sequential.CHECKPOINT_SECONDS` between them
  (``state/<method>.safetensors``; AlphaEdit also its :class:`~lightning_kedit.editing.history.EditHistory`,
  whose keys each later batch must keep, in ``state/<method>.history/``), so a later run continues from there.
  A batch is cut short at each ``N``, so a saved state is continued only by a run with the same ``N`` below it.
  A resumed cell's ``edit_seconds`` counts from the first edit; its CPU seconds, peak memory and phases cover
  the resumed part only.
- ``unedited`` rows (the model before editing) give the floor that editing must beat.

Finished cells are kept in ``results.json`` (written atomically after every cell), and a run resumes by
skipping them; target values are cached on disk by :class:`~lightning_kedit.editing.target_cache.TargetCache`,
so that ``N = 1,000`` reuses the work of ``N = 100``. ``results.md`` and ``success_vs_edits.png``
(:mod:`lightning_kedit.bench.report`) are rewritten after every cell. Peak memory is the largest resident set
size (RSS) of the process during the cell, sampled every 50 ms with psutil when it is installed, else the
process's lifetime ``ru_maxrss`` (an upper bound); on a GPU also ``torch.cuda.max_memory_allocated``
(:class:`~lightning_kedit.bench.resource_meter.ResourceMeter`).

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

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lightning_kedit.bench.cells import (
    UNEDITED,
    BenchContext,
    check_restored,
    parse_counts,
    parse_methods,
    prefix_digests,
    run_batch_cells,
)
from lightning_kedit.bench.report import BenchError, BenchResults, ProgressPrinter, write_report
from lightning_kedit.bench.resource_meter import ResourceMeter
from lightning_kedit.bench.sequential import run_sequential_cells
from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.target_cache import TargetCache
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import fingerprint_digest, model_fingerprint, weights_hash
from lightning_kedit.requests import EditRequest

__all__ = ["run_bench"]


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
        The :class:`~lightning_kedit.bench.report.BenchResults` of ``out_dir``.

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
    per_method = {m.name: EditHyperParams.for_model(model, m.method).with_overrides(overrides) for m in parsed}
    fingerprint = fingerprint_digest(model_fingerprint(model, tokenizer, range(adapter.num_layers)))
    settings = {
        "hparams": {name: hp.to_dict() for name, hp in per_method.items()},
        "batch_size": batch_size,
        "perplexity_text": Path(ppl_text).name if ppl_text else None,
        "perplexity_tokens": ppl_tokens if ppl_text else None,
    }
    results = BenchResults.open(out_dir, model=model_name, requests=requests_name, fingerprint=fingerprint,
                                settings=settings)
    digests = prefix_digests(requests)
    results.check_requests(lambda n: digests[n] if n < len(digests) else None)
    names = ([UNEDITED] if baseline else []) + [m.name for m in parsed]
    todo = {name: [n for n in ns if results.row(name, n) is None] for name in names}
    if any(todo[m.name] for m in parsed if per_method[m.name].uses_key_statistics(m.method)):
        from lightning_kedit.editing import edit_inputs

        # Once, on the unedited weights, for the layers of every method: their fingerprint is part of the
        # statistics' cache key, and a sequential run (or its restored state) changes them.
        stat_layers = sorted({layer for m in parsed if per_method[m.name].uses_key_statistics(m.method)
                              for layer in per_method[m.name].layers})
        statistics = edit_inputs.resolve_statistics(model, tokenizer, stat_layers, statistics, progress=verbose)
    context = BenchContext(tokenizer, requests, digests, statistics, per_method, target_cache or TargetCache(),
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
                    run_sequential_cells(model, m, ns, context, results, reporter)
                else:
                    run_batch_cells(model, m, todo[m.name], context, results, reporter)
                check_restored(model, base_hashes)
    finally:
        if results.rows:
            write_report(results)
    return results
