"""The cells of a benchmark run: the methods and counts, what cells share (:class:`BenchContext`), batch cells.

A batch cell edits the first ``N`` requests from the unedited weights, evaluates and reverts bit for bit
(:func:`run_batch_cells`); the sequential cells are in :mod:`.sequential`, the run in :mod:`.harness`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_kedit.bench.report import BenchError, BenchResults, ProgressPrinter
from lightning_kedit.bench.resource_meter import ResourceMeter
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.hparams import METHODS, EditHyperParams
from lightning_kedit.editing.target_cache import TargetCache, request_digest
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.files import short_digest
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import weights_hash
from lightning_kedit.requests import EditRequest

__all__ = [
    "BENCH_METHODS",
    "UNEDITED",
    "BenchContext",
    "BenchMethod",
    "available_methods",
    "check_restored",
    "layer_weights",
    "parse_counts",
    "parse_methods",
    "prefix_digests",
    "restore_weights",
    "run_batch_cells",
]

#: The method name of the rows that measure the model before editing.
UNEDITED = "unedited"
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


def prefix_digests(requests: Sequence[EditRequest]) -> list[str]:
    """``out[n]``: a digest of ``requests[:n]`` (the facts a cell of ``N = n`` edits and evaluates)."""
    digest = hashlib.sha256()
    out = [digest.hexdigest()[:16]]
    for request in requests:
        digest.update(f"{request.case_id}:{request_digest(request)};".encode())
        out.append(digest.hexdigest()[:16])
    return out


def layer_weights(model: nn.Module, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """A copy of the edited weight of each of ``layers``."""
    adapter = ModelAdapter.for_model(model)
    return {layer: adapter.weight(layer).detach().clone() for layer in layers}


def restore_weights(model: nn.Module, weights: Mapping[int, torch.Tensor]) -> None:
    """Copy ``weights`` (by layer) back into ``model``'s edited weights."""
    adapter = ModelAdapter.for_model(model)
    with torch.no_grad():
        for layer, weight in weights.items():
            adapter.weight(layer).copy_(weight)


@dataclass
class BenchContext:
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
        return short_digest(payload, 16)


def run_batch_cells(model: nn.Module, method: BenchMethod, counts: list[int], context: BenchContext,
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


def check_restored(model: nn.Module, base_hashes: Mapping[int, str]) -> None:
    """Raise when a cell left a weight different from the original (a revert that was not exact)."""
    adapter = ModelAdapter.for_model(model)
    changed = [layer for layer, h in base_hashes.items() if weights_hash(adapter.weight(layer)) != h]
    if changed:
        raise BenchError(f"layers {changed} were not restored bit for bit after a benchmark cell")
