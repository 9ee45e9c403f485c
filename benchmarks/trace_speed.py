"""How fast is a full causal trace? Batched ``causal_trace`` against one forward per cell, in one run.

A full trace of one prompt (hidden, MLP and attention; every token and layer; 10 noise draws) is timed
against the straightforward implementation: one forward per (kind, token, layer) cell, the noise draws
as the batch, the whole model run (as in ROME's ``trace_with_patch``). The reference costs the same for
every cell, so it is timed on an evenly spread, seeded subset of cells and extrapolated to all of them
(``--reference-cells 0`` runs every cell). The phases alternate in every repeat so that load from other
processes hits both alike; the reference's probabilities on its cells are compared with the fast trace's.
Peak memory is the resident set above the loaded model, sampled every 2 ms during each phase.

Usage (the figures in docs/benchmarks/tracing.md):
    .venv/bin/python benchmarks/trace_speed.py --repeats 1 --reference-cells 30 --threads 1 \\
        --json benchmarks/results/trace_speed.json --figures docs/figures
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.models import ModelAdapter, load_model
from lightning_kedit.models.forward_hooks import output_hooks
from lightning_kedit.tracing import KINDS, TraceResult, causal_trace, restored_layers


class PeakMemory:
    """Resident memory above the level at entry, sampled every 2 ms (Linux ``/proc/self/statm``)."""

    def __enter__(self) -> PeakMemory:
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def reference_cells(
    model: torch.nn.Module, tokenizer: Any, trace: TraceResult, cells: list[tuple[str, int, int]], seed: int
) -> tuple[list[float], list[float]]:
    """``p(restored)`` and seconds for each ``(kind, token, layer)`` cell, one plain forward each."""
    adapter = ModelAdapter.for_model(model)
    ids = torch.tensor([tokenizer(trace.prompt).input_ids])
    layers, samples = adapter.num_layers, trace.samples
    first, end = trace.subject_range
    draws = torch.randn(
        (samples, end - first, adapter.value_size), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )
    noise = (draws * trace.noise).float()
    modules = {
        "hidden": list(adapter.blocks),
        "mlp": [adapter.mlp(i) for i in range(layers)],
        "attn": [adapter.attn(i) for i in range(layers)],
    }
    clean: dict[tuple[str, int], torch.Tensor] = {}
    record = {m: (lambda y, key=(k, i): clean.__setitem__(key, y[0])) for k in KINDS for i, m in enumerate(modules[k])}
    with output_hooks(record):
        model(ids)

    def corrupt(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :first], x[:, first:end] + noise, x[:, end:]], dim=1)

    def restorer(kind: str, layer: int, token: int) -> Any:
        def restore(y: torch.Tensor) -> torch.Tensor:
            y = y.clone()
            y[:, token] = clean[(kind, layer)][token]
            return y

        return restore

    probs, seconds = [], []
    for kind, token, layer in cells:
        hooks = {modules[kind][i]: restorer(kind, i, token) for i in restored_layers(kind, layer, trace.window, layers)}
        start = time.perf_counter()
        with output_hooks({adapter.embeddings(): corrupt}), output_hooks(hooks):
            logits = model(ids.expand(samples, -1)).logits
        probs.append(float(logits[:, -1].double().softmax(-1)[:, trace.answer_id].mean()))
        seconds.append(time.perf_counter() - start)
    return probs, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", default="The Eiffel Tower is located in the city of")
    parser.add_argument("--subject", default="Eiffel Tower")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-cells", type=int, default=30, help="cells timed for the reference (0: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--figures", default=None, metavar="DIR", help="also save the trace's heatmaps here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    kwargs: dict[str, Any] = dict(samples=args.samples, seed=0)
    causal_trace(model, tokenizer, args.prompt, args.subject, kinds=("hidden",), positions=[0], **kwargs)  # warm-up
    grid = [
        (kind, token, layer)
        for kind in KINDS
        for token in range(len(tokenizer(args.prompt).input_ids))
        for layer in range(ModelAdapter.for_model(model).num_layers)
    ]
    count = len(grid) if args.reference_cells <= 0 else min(args.reference_cells, len(grid))
    fast_seconds: list[float] = []
    per_cell: list[float] = []
    fast_mib: list[float] = []
    reference_mib: list[float] = []
    worst = 0.0
    trace: TraceResult | None = None
    for repeat in range(args.repeats):
        with PeakMemory() as memory:
            start = time.perf_counter()
            trace = causal_trace(model, tokenizer, args.prompt, args.subject, **kwargs)
            fast_seconds.append(time.perf_counter() - start)
        fast_mib.append(memory.mib)
        cells = random.Random(repeat).sample(grid, count)
        with PeakMemory() as memory:
            probs, seconds = reference_cells(model, tokenizer, trace, cells, seed=0)
        reference_mib.append(memory.mib)
        per_cell.extend(seconds)
        for (kind, token, layer), p in zip(cells, probs, strict=True):
            worst = max(worst, abs(float(trace.restored_probs(kind)[token, layer]) - p))
        print(f"repeat {repeat}: fast {fast_seconds[-1]:.1f} s, reference {statistics.median(seconds):.3f} s/cell")
    assert trace is not None
    fast = statistics.median(fast_seconds)
    reference = statistics.median(per_cell) * len(grid)
    result = {
        "model": args.model,
        "prompt": args.prompt,
        "subject": args.subject,
        "tokens": len(trace.tokens),
        "layers": trace.effects["hidden"].shape[1],
        "kinds": list(KINDS),
        "samples": args.samples,
        "cells": len(grid),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "reference_cells_timed": len(per_cell),
        "fast_seconds": fast,
        "fast_seconds_all": fast_seconds,
        "reference_seconds_per_cell": statistics.median(per_cell),
        "reference_seconds_extrapolated": reference,
        "speedup": reference / fast,
        "max_abs_difference": worst,
        "fast_peak_mib": max(fast_mib),
        "reference_peak_mib": max(reference_mib),
    }
    print(f"\n{'':<34}{'batched causal_trace':>22}{'one forward per cell':>22}")
    print(f"{'full trace, seconds (median)':<34}{fast:>22.1f}{reference:>22.1f}")
    print(f"{'speed-up':<34}{'':>22}{reference / fast:>21.1f}x")
    print(f"{'peak memory above model, MiB':<34}{max(fast_mib):>22.0f}{max(reference_mib):>22.0f}")
    print(f"{'max |p difference| on shared cells':<34}{worst:>22.2e}")
    print(
        f"({len(grid)} cells: {len(KINDS)} kinds x {result['tokens']} tokens x {result['layers']} layers, "
        f"{args.samples} noise draws; reference timed on {len(per_cell)} cells and extrapolated)"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**result, "trace": trace.to_dict()}, indent=2) + "\n")
    if args.figures:
        from lightning_kedit.tracing.plots import save_trace_figures

        save_trace_figures(trace, args.figures)


if __name__ == "__main__":
    main()
