"""Why a long cumulative lifelong sequence loses its edits and damages text: fit and cost read from its history.

Question: after thousands of edits written with ``solve="cumulative"``, is the loss of efficacy and retention a
matter of tuning, or does a linear update of the edit layers run out of room? The script reads a saved sequence
(``benchmarks/sequential_edits.py --solve cumulative --history-dir D``) and, at each checkpoint of ``b`` batches,
for every edit layer with the rows ``K`` (keys) and ``R`` (the outputs asked, as changes from the first
weights ``W₀``) of batches ``1..b`` and the total change ``ΔW = W_b − W₀`` the sequence actually wrote:

- ``fit``: ``‖K ΔWᵀ − R‖ / ‖R‖``, the share of what the rows ask that the written total misses, over all rows and
  over the first batch's rows (``fit_first``: the retention of the first 100 in the layer's own terms);
- ``ceiling``: the same for the best update with no preservation term (least squares, ridge ``1e-8·tr/d``):
  what no linear update of this layer can write, however it is weighted;
- ``text_change``: ``tr(ΔW C ΔWᵀ) / tr(W₀ C W₀ᵀ)``, ``C`` the layer's key second moment over ordinary text: the
  relative mean squared change of the layer's output on text;
- ``keys_in_text``: the share of the rows' key energy inside the eigen-directions of ``C`` that hold 99 % of
  ``trace C``, and ``text_dims``: how many those are. Keys there cannot be written without moving text's outputs.

The sums and solves are float64. Reported per layer in the JSON and as the mean over layers in the table.

Run (the numbers of docs/benchmarks/sequential.md; ``D`` is the ``--history-dir`` of the sequence):
    python benchmarks/lifelong_capacity.py --history D/lifelong --at 1,10,30,100 \\
        --out benchmarks/results/lifelong_capacity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_kedit.editing.edit_inputs import resolve_statistics
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.loading import load_model

COLUMNS = ("batches", "rows", "fit", "fit_first", "ceiling", "text_change", "keys_in_text")


def relative_miss(keys: Tensor, targets: Tensor, change: Tensor) -> float:
    """``‖K ΔWᵀ − R‖ / ‖R‖``: the share of the asked outputs that ``change`` does not write."""
    return float((keys @ change.T - targets).norm() / targets.norm().clamp_min(1e-30))


def least_squares(keys: Tensor, targets: Tensor) -> Tensor:
    """The best ``ΔW`` for the rows alone, ``Rᵀ K (KᵀK + εI)⁻¹`` with ``ε = 1e-8 · tr(KᵀK) / d_k``."""
    gram = keys.T @ keys
    ridge = 1e-8 * float(gram.trace()) / gram.shape[0]
    return torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), keys.T @ targets).T


def text_subspace(second_moment: Tensor, share: float = 0.99) -> Tensor:
    """The ``(d_k, r)`` eigenvectors of ``C`` with the largest eigenvalues that hold ``share`` of ``trace C``."""
    values, vectors = torch.linalg.eigh(second_moment)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    rank = int((values.cumsum(0) / values.sum() < share).sum()) + 1
    return vectors[:, :rank]


def layer_measures(keys: Tensor, targets: Tensor, first: int, change: Tensor, text_energy: Tensor,
                   second_moment: Tensor, basis: Tensor) -> dict[str, float]:
    """The measures of the module docstring for one layer (tensors float64; ``text_energy`` is
    ``tr(W₀ C W₀ᵀ)``)."""
    return {
        "fit": relative_miss(keys, targets, change),
        "fit_first": relative_miss(keys[:first], targets[:first], change),
        "ceiling": relative_miss(keys, targets, least_squares(keys, targets)),
        "text_change": float(torch.trace(change @ second_moment @ change.T) / text_energy),
        "keys_in_text": float((keys @ basis).norm() ** 2 / keys.norm() ** 2),
        "text_dims": basis.shape[1],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", required=True, help="a folder saved by EditHistory.save (cumulative batches)")
    parser.add_argument("--at", default="1,10,30,100", help="checkpoints, in batches")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="benchmarks/results/lifelong_capacity.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_model(args.model)
    adapter = ModelAdapter.for_model(model)
    history = EditHistory.load(args.history)
    layers = history.layers
    checkpoints = [b for b in (int(x) for x in args.at.split(",") if x) if 1 <= b <= len(history)]
    if not checkpoints:
        raise SystemExit(f"--at {args.at}: the history holds {len(history)} batches")
    statistics = resolve_statistics(model, tokenizer, layers)  # of the unedited model: the history's W₀
    # The d_v × d_k maps of the update equations, from the stored layout (transposed for Conv1D).
    first_weights = {layer: adapter.from_stored_layout(w).to(torch.float64)
                     for layer, w in history.weights_after(0).items()}
    moments = {layer: statistics.second_moment(layer).to(torch.float64) for layer in layers}
    bases = {layer: text_subspace(moments[layer]) for layer in layers}
    text_energy = {layer: torch.trace(w @ moments[layer] @ w.T) for layer, w in first_weights.items()}
    rows: list[dict[str, Any]] = []
    print(" | ".join(COLUMNS))
    for batches in checkpoints:
        weights = history.weights_after(batches)
        extras = [history[i].extras for i in range(batches)]
        per_layer = {}
        for layer in layers:
            keys = torch.cat([e[f"layers.{layer}.rows.key"] for e in extras]).to(torch.float64)
            targets = torch.cat([e[f"layers.{layer}.rows.target"] for e in extras]).to(torch.float64)
            change = adapter.from_stored_layout(weights[layer]).to(torch.float64) - first_weights[layer]
            per_layer[layer] = layer_measures(keys, targets, extras[0][f"layers.{layer}.rows.key"].shape[0],
                                              change, text_energy[layer], moments[layer], bases[layer])
        mean = {name: sum(m[name] for m in per_layer.values()) / len(per_layer)
                for name in ("fit", "fit_first", "ceiling", "text_change", "keys_in_text", "text_dims")}
        rows.append({"batches": batches, "rows": int(keys.shape[0]), **{k: round(v, 4) for k, v in mean.items()},
                     "layers": {str(k): {n: round(v, 5) for n, v in m.items()} for k, m in per_layer.items()}})
        print(" | ".join(str(rows[-1][c]) for c in COLUMNS), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": vars(args), "layers": layers, "rows": rows}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
