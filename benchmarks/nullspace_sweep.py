"""How should AlphaEdit's null space be chosen on a model whose keys fill their space? One batch, many settings.

Question: on SmolLM2-135M, which null-space rule, threshold and ``λ₀ C`` weight give the best first batch of a
sequence (efficacy, paraphrase, neighbourhood, perplexity), and how large are the null spaces they pick?

The target values of the batch are computed once and shared by every setting, so only the solve differs:
for each ``rule:threshold:preserve_weight`` the script computes :func:`~lightning_kedit.editing.alphaedit.
alphaedit_updates`, applies the factors, evaluates, and restores the weights bit for bit. With ``--spectrum``
it also prints the null-space dimension per edit layer and the share of the edit keys' energy inside it.

Usage (the tables of docs/benchmarks/sequential.md):
    python benchmarks/nullspace_sweep.py --n 100 --spectrum --json benchmarks/results/nullspace_sweep.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lightning_kedit import load_model
from lightning_kedit.editing import alphaedit
from lightning_kedit.editing.edit_inputs import resolve_statistics
from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.keys import subject_states
from lightning_kedit.editing.nullspace import null_space_basis
from lightning_kedit.editing.prefixes import context_templates
from lightning_kedit.editing.targets import compute_target_values
from lightning_kedit.editing.weight_edits import add_to_weight
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import load_requests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETTINGS = ("eigenvalue:0.01:0,energy:0.02:0,energy:0.05:0,energy:0.1:0,energy:0.2:0,energy:0.1:4000,"
            "energy:0.2:4000,energy:0.5:4000,energy:1.0:4000")
METRICS = ("efficacy", "paraphrase", "neighborhood", "score", "perplexity")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", default=str(DATA / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--n", type=int, default=100, help="requests of the batch")
    parser.add_argument("--settings", default=SETTINGS, help="comma-separated rule:threshold:preserve_weight")
    parser.add_argument("--ppl-text", default=str(DATA / "text" / "wikitext2_test.txt"))
    parser.add_argument("--ppl-tokens", type=int, default=5000)
    parser.add_argument("--spectrum", action="store_true", help="also print null-space sizes per layer")
    parser.add_argument("--spectrum-thresholds", default="0.01,0.02,0.05,0.1,0.2,0.5")
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


def spectrum(model: Any, tokenizer: Any, requests: list, stats: Any, layers: list[int],
             thresholds: list[float]) -> list[dict[str, Any]]:
    """Null-space size per layer and threshold, with the share of ordinary and edit keys' energy inside it."""
    keys = subject_states(model, tokenizer, requests, ["{}"], key_layers=layers).keys
    rows = []
    for layer in layers:
        c = stats.second_moment(layer).to(torch.float64)
        k = keys[layer].to(torch.float64)
        for rule, threshold in [("energy", t) for t in thresholds] + [("eigenvalue", 0.01)]:
            basis = null_space_basis(c, threshold=threshold, rule=rule)
            rows.append({"layer": layer, "rule": rule, "threshold": threshold, "dims": basis.shape[1],
                         "text_energy": float((basis.T @ c @ basis).trace() / c.trace()),
                         "edit_key_energy": float(((k @ basis) ** 2).sum() / (k**2).sum())})
            print(" | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in rows[-1].values()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model, tokenizer = load_model("smollm2")
    hp = EditHyperParams.for_model(model, "alphaedit")
    layers = list(hp.layers)
    requests = load_requests(args.requests, n=args.n)
    stats = resolve_statistics(model, tokenizer, layers)
    result: dict[str, Any] = {"n": args.n, "layers": layers, "stats_tokens": stats.count(layers[0])}
    if args.spectrum:
        result["spectrum"] = spectrum(model, tokenizer, requests, stats, layers,
                                      [float(t) for t in args.spectrum_thresholds.split(",")])
    templates = context_templates(model, tokenizer, hp.prefix_lengths, seed=hp.seed)
    start = time.perf_counter()
    values = compute_target_values(model, tokenizer, requests, layers[-1], templates, hp)
    result["targets_s"] = round(time.perf_counter() - start, 1)
    adapter = ModelAdapter.for_model(model)
    base = {layer: adapter.weight(layer).detach().clone() for layer in layers}
    unedited = evaluate_requests(model, tokenizer, requests, ppl_text=args.ppl_text, ppl_tokens=args.ppl_tokens)
    result["unedited"] = {k: unedited[k] for k in METRICS}
    print("rule | threshold | preserve_weight | " + " | ".join(METRICS) + " | mean update norm")
    print("unedited | | | " + " | ".join(f"{unedited[k]:.3f}" for k in METRICS) + " |")
    result["rows"] = []
    original = alphaedit.compute_target_values
    alphaedit.compute_target_values = lambda *a, **k: values  # type: ignore[assignment]  # shared targets
    try:
        for setting in args.settings.split(","):
            rule, threshold, weight = setting.split(":")
            factors, _, _ = alphaedit.alphaedit_updates(model, tokenizer, requests, stats, hp,
                                                        threshold=float(threshold), rule=rule,
                                                        preserve_weight=float(weight))
            for layer, update in factors.items():
                add_to_weight(adapter, layer, update.dense())
            metrics = evaluate_requests(model, tokenizer, requests, ppl_text=args.ppl_text,
                                        ppl_tokens=args.ppl_tokens)
            for layer in layers:
                adapter.weight(layer).data.copy_(base[layer])
            norm = sum(float(f.dense().norm()) for f in factors.values()) / len(factors)
            row = {"rule": rule, "threshold": float(threshold), "preserve_weight": float(weight),
                   **{k: metrics[k] for k in METRICS}, "mean_update_norm": norm}
            result["rows"].append(row)
            print(f"{rule} | {threshold} | {weight} | " + " | ".join(f"{metrics[k]:.3f}" for k in METRICS)
                  + f" | {norm:.1f}", flush=True)
    finally:
        alphaedit.compute_target_values = original  # type: ignore[assignment]
    assert all(torch.equal(adapter.weight(layer), w) for layer, w in base.items())
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
