"""How well does the constrained fine-tuning baseline (FT-L) edit SmolLM2, and at what cost?

Edits the first ``--n`` CounterFact cases in one batch with :func:`compute_finetune_delta` for each
``linf_bound:lr`` setting, applies the delta, measures the ``kedit eval`` figures (efficacy, paraphrase,
neighbourhood, perplexity on the first ``--ppl-tokens`` tokens of WikiText-2 test) and reverts. The first row
is the unedited model. Timings are single runs (the optimisation dominates and is deterministic).

Usage:
    python benchmarks/ft_baseline.py --n 100 --steps 25 --settings 5e-4:5e-4,2e-3:1e-3,1e-2:5e-3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.editing.finetune import compute_finetune_delta
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models import load_model
from lightning_kedit.requests import load_requests

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COLUMNS = ["efficacy", "paraphrase", "neighborhood", "score", "perplexity"]


def _settings(text: str) -> list[tuple[float, float]]:
    pairs = []
    for item in text.split(","):
        bound, lr = item.split(":")
        pairs.append((float(bound), float(lr)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default=str(DATA / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--layer", type=int, default=None, help="tuned layer (default: middle edit layer)")
    parser.add_argument("--settings", default="5e-4:5e-4,2e-3:1e-3,1e-2:5e-3", help="linf_bound:lr,...")
    parser.add_argument("--ppl-text", default=str(DATA / "text" / "wikitext2_test.txt"))
    parser.add_argument("--ppl-tokens", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ft_baseline.json"))
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2")
    requests = load_requests(args.requests, args.n)

    def figures() -> dict[str, Any]:
        return evaluate_requests(model, tokenizer, requests, batch_size=args.batch_size, ppl_text=args.ppl_text,
                                 ppl_tokens=args.ppl_tokens)

    rows: list[dict[str, Any]] = [{"setting": "unedited", **figures(), "seconds": None}]
    print(rows[-1], flush=True)
    for bound, lr in _settings(args.settings):
        start = time.perf_counter()
        delta = compute_finetune_delta(model, tokenizer, requests, layer=args.layer, steps=args.steps, lr=lr,
                                       linf_bound=bound, batch_size=args.batch_size)
        seconds = time.perf_counter() - start
        with delta.applied(model):
            rows.append({"setting": f"L∞ {bound:g}, lr {lr:g}", **figures(), "seconds": round(seconds, 1),
                         "layer": delta.hparams["layer"]})
        print(rows[-1], flush=True)
    report = {"model": "smollm2", "requests": args.requests, "n": args.n, "steps": args.steps,
              "threads": torch.get_num_threads(), "ppl_tokens": args.ppl_tokens, "rows": rows,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print(f"\nFT-L on the first {args.n} cases, one batch, {args.steps} steps, {report['threads']} threads, "
          f"peak RSS {report['peak_rss_mib']} MiB")
    print("| setting | " + " | ".join(COLUMNS) + " | FT seconds |\n|---|" + "---:|" * (len(COLUMNS) + 1))
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        print(f"| {row['setting']} | " + " | ".join(cells) + f" | {row['seconds']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
