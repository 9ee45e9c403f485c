"""After a long run of sequential ROME edits, are the early edits kept, and how much of the success is damage?

Reads the edited weights a sequential ``kedit bench`` run saved (``OUT/state/rome-seq.safetensors``), puts them
into SmolLM2 and scores slices of the request file with the unedited and the edited weights:

- the first, middle and last ``--slice`` facts of the run (edited long ago, midway, just now);
- the next ``--slice`` facts after the run, which were never edited: any success there is not an edit
  taking hold but the model's preference between the two answers drifting, i.e. damage.

Prints a table and writes JSON (``--json``). The state must be for this model: its recorded hash of the
unedited layer is checked against the loaded weights.

Usage:
    python benchmarks/rome_seq_retention.py --state out/svse/state/rome-seq.safetensors \\
        --requests ../shared/data/counterfact/counterfact-val.json --json benchmarks/results/rome_seq_retention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.bench import read_sequential_state
from lightning_kedit.editing.weight_edits import temporary_updates
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import weights_hash
from lightning_kedit.models.loading import load_model
from lightning_kedit.requests import load_requests

RATES = ("efficacy", "paraphrase", "neighborhood", "efficacy_prob")


def read_state(path: Path) -> tuple[dict[str, str], dict[int, torch.Tensor]]:
    """The metadata and the edited weight of each layer of a sequential bench state."""
    if not path.is_file():
        raise SystemExit(f"--state {path} does not exist; give the state file a sequential `kedit bench` run wrote")
    read = read_sequential_state(path)
    meta, weights = read if read is not None else ({}, {})
    if "edits" not in meta or "base" not in meta or not weights:
        raise SystemExit(f"--state {path} is not a `kedit bench` sequential state (no edits/base metadata)")
    return meta, weights


def slices(edits: int, size: int, available: int) -> dict[str, tuple[int, int]]:
    """Named ``[start, stop)`` ranges: first, middle and last edited facts, and the never-edited ones after."""
    middle = max(0, edits // 2 - size // 2)
    ranges = {"first edited": (0, min(size, edits)), "middle edited": (middle, min(middle + size, edits)),
              "last edited": (max(0, edits - size), edits)}
    if available > edits:
        ranges["never edited"] = (edits, min(edits + size, available))
    return ranges


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state", required=True, help="OUT/state/rome-seq.safetensors of a kedit bench run")
    parser.add_argument("--requests", required=True, help="the request file the run edited, in the same order")
    parser.add_argument("--slice", type=int, default=100, help="facts per slice (default 100)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    if args.slice < 1:
        raise SystemExit(f"--slice must be >= 1, got {args.slice}")
    meta, weights = read_state(Path(args.state))
    edits = int(meta["edits"])
    requests = load_requests(args.requests)
    if len(requests) < edits:
        raise SystemExit(f"--requests {args.requests} holds {len(requests)} facts but the state made {edits} edits")
    model, tokenizer = load_model("smollm2")
    adapter = ModelAdapter.for_model(model)
    base = {int(layer): h for layer, h in json.loads(meta["base"]).items()}
    for layer, expected in base.items():
        if weights_hash(adapter.weight(layer)) != expected:
            raise SystemExit(f"--state {args.state} was made on other weights (layer {layer} differs); "
                             "give the state of a run on this model")
    ranges = slices(edits, args.slice, len(requests))
    rows: list[dict[str, Any]] = []

    def score(label: str) -> None:
        for name, (start, stop) in ranges.items():
            metrics = evaluate_requests(model, tokenizer, requests[start:stop])
            rows.append({"weights": label, "facts": name, "start": start, "stop": stop,
                         **{k: metrics[k] for k in RATES}})
            print(f"{label:>18} | {name:>13} [{start}:{stop}) | " +
                  " | ".join(f"{k} {metrics[k]:.3f}" for k in RATES), flush=True)

    score("unedited")
    with temporary_updates(adapter, list(weights)):  # the unedited weights come back on exit
        with torch.no_grad():
            for layer, w in weights.items():
                adapter.weight(layer).copy_(w)
        score(f"after {edits} edits")
    if args.json:
        Path(args.json).write_text(json.dumps({"state": str(args.state), "edits": edits, "requests": args.requests,
                                               "layers": sorted(weights), "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
