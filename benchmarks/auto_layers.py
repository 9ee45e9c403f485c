"""Do measured edit layers beat the default ones? MEMIT with ``layers="auto"`` against the fixed default.

The automatic layers come from :func:`~lightning_kedit.tracing.choose_edit_layers`: the window of
consecutive layers with the largest average MLP indirect effect at the subject's last token, traced on
facts from a split *disjoint* from the edited cases (CounterFact train), so that the choice never sees
them. Both layer sets then edit the same CounterFact cases in one MEMIT batch, each with key statistics of
the bundled corpus for its own layers, and are scored by ``evaluate_requests`` (efficacy, paraphrase,
neighbourhood, score). The unedited model's scores are printed for reference. Prints a table, writes JSON.

Usage (the figures in docs/benchmarks/tracing.md):
    .venv/bin/python benchmarks/auto_layers.py --n 100 --trace-n 50 --json benchmarks/results/auto_layers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.editing import EditHyperParams, compute_edit
from lightning_kedit.editing.target_cache import TargetCache
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models import load_model
from lightning_kedit.requests import load_requests
from lightning_kedit.tracing import choose_edit_layers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "counterfact"
KEYS = ("efficacy", "paraphrase", "neighborhood", "score")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", default=str(DATA / "counterfact-val.json"), help="the edited cases")
    parser.add_argument("--trace-requests", default=str(DATA / "counterfact-train.json"), help="facts to trace")
    parser.add_argument("--n", type=int, default=100, help="edited cases (one MEMIT batch)")
    parser.add_argument("--trace-n", type=int, default=50, help="facts averaged to choose the layers")
    parser.add_argument("--window", type=int, default=None, help="number of edit layers (default: the default's)")
    parser.add_argument("--samples", type=int, default=10, help="noise draws per traced cell")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    cases = load_requests(args.requests, skip_invalid=True)[: args.n]
    facts = load_requests(args.trace_requests, skip_invalid=True)

    default = list(EditHyperParams.for_model(model, "memit").layers)
    start = time.perf_counter()
    auto = choose_edit_layers(
        model, tokenizer, facts, window=args.window or len(default), n=args.trace_n, samples=args.samples,
        progress=True,
    )
    choose_seconds = time.perf_counter() - start
    targets = TargetCache()  # the default layers' targets are shared with edit_quality.py and kedit bench
    rows: dict[str, dict[str, Any]] = {"unedited": {**evaluate_requests(model, tokenizer, cases), "layers": None}}
    for name, layers in (("default", default), ("auto", auto)):
        if name == "auto" and auto == default:  # the same edit: nothing to recompute
            rows["auto"] = dict(rows["default"])
            print("auto: the traced layers are the default ones", flush=True)
            continue
        start = time.perf_counter()
        delta = compute_edit(model, tokenizer, cases, method="memit", layers=layers, progress=True,
                             target_cache=targets)
        edit_seconds = time.perf_counter() - start
        with delta.applied(model):
            rows[name] = {**evaluate_requests(model, tokenizer, cases), "layers": layers, "seconds": edit_seconds}
        print(f"{name}: layers {layers}, " + ", ".join(f"{k} {rows[name][k]:.3f}" for k in KEYS), flush=True)

    print(f"\nMEMIT on {len(cases)} CounterFact cases ({args.model}); auto layers chosen in {choose_seconds:.0f} s")
    print(f"{'':<10}{'layers':<18}" + "".join(f"{k:>14}" for k in KEYS))
    for name, row in rows.items():
        print(f"{name:<10}{row['layers'] or '-'!s:<18}" + "".join(f"{row[k]:>14.3f}" for k in KEYS))
    if args.json:
        result = {
            "model": args.model,
            "requests": args.requests,
            "n": len(cases),
            "trace_requests": args.trace_requests,
            "trace_n": args.trace_n,
            "samples": args.samples,
            "choose_seconds": choose_seconds,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
