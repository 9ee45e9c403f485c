"""The lifelong method on SmolLM2-135M: one batch of CounterFact facts under several settings.

Question: how much of a batch does ``method="lifelong"`` write, at what perplexity, and how fast? Each setting
edits the first ``--n`` CounterFact train facts from the unedited weights (one batch, no history), evaluates the
first ``--eval`` of them (efficacy, paraphrase, neighbourhood) and the perplexity of ``--ppl-tokens`` tokens of
WikiText-2, then reverts. Rows go to ``--out`` after every setting.

A setting is ``step:ridge[:positions[:preserve_weight[:rounds]]]``: ``η``, ``λ``, where the features are read
(``subject`` or ``answer``), ``λ₀`` of the ``λ₀ C`` term (0: none) and the closed-form rounds per batch; the
parts left out take the model's defaults (``EditHyperParams.for_model(model, "lifelong")``).

Run (heavy: under the shared lock):
    flock /tmp/kedit-heavy.lock python benchmarks/lifelong_one_batch.py \\
        --settings 1:1:answer:0,4:1:subject:0,4:1:answer:4000,1:1:subject:4000,4:1:subject:4000,16:1:subject:4000 \\
        --out benchmarks/results/lifelong_one_batch.json
    flock /tmp/kedit-heavy.lock python benchmarks/lifelong_one_batch.py \
        --settings 4:1:subject:4000:1,4:1:subject:4000:2,4:1:subject:4000:3,4:1:subject:4000:4,2:1:subject:4000:3 \
        --out benchmarks/results/lifelong_one_batch_rounds.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_kedit.editing import EditHyperParams, compute_edit, resolve_statistics
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models.loading import load_model
from lightning_kedit.requests import load_requests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KEEP = ("efficacy", "paraphrase", "neighborhood", "perplexity")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="1:1:answer:0,4:1:subject",
                        help="comma-separated step:ridge[:positions[:preserve_weight[:rounds]]]")
    parser.add_argument("--grad-scaling", choices=("feature", "global"), default="feature")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--eval", type=int, default=50)
    parser.add_argument("--ppl-tokens", type=int, default=2000)
    parser.add_argument("--out", default="benchmarks/results/lifelong_one_batch.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model("smollm2")
    requests = load_requests(DATA / "counterfact" / "counterfact-train.json", n=args.n)
    ppl_text = str(DATA / "text" / "wikitext2_test.txt")
    base = EditHyperParams.for_model(model, "lifelong")
    out = Path(args.out)
    rows = []
    unedited = evaluate_requests(model, tok, requests[: args.eval], ppl_text=ppl_text, ppl_tokens=args.ppl_tokens)
    rows.append({"setting": "unedited", **{k: unedited[k] for k in KEEP}})
    print(rows[-1], flush=True)
    for setting in args.settings.split(","):
        parts = setting.split(":")
        extra = {**base.extra, "step": float(parts[0]), "ridge": float(parts[1]), "grad_scaling": args.grad_scaling}
        if len(parts) > 2:
            extra["positions"] = parts[2]
        if len(parts) > 3:
            extra["preserve_weight"] = float(parts[3])
        if len(parts) > 4:
            extra["rounds"] = int(parts[4])
        hp = base.replace(extra=extra)
        if hp.uses_key_statistics("lifelong"):  # collected (or read from the cache) outside the edit's time
            resolve_statistics(model, tok, hp.layers)
        start = time.perf_counter()
        delta = compute_edit(model, tok, requests, method="lifelong", hparams=hp)
        seconds = time.perf_counter() - start
        with delta.applied(model):
            metrics = evaluate_requests(model, tok, requests[: args.eval], ppl_text=ppl_text,
                                        ppl_tokens=args.ppl_tokens)
        rows.append({"setting": setting, "step": extra["step"], "ridge": extra["ridge"],
                     "positions": extra["positions"], "preserve_weight": extra["preserve_weight"],
                     "rounds": extra["rounds"], "lambda_relative": hp.lambda_relative,
                     "grad_scaling": args.grad_scaling,
                     "edit_s": round(seconds, 1), **{k: metrics[k] for k in KEEP}})
        print(rows[-1], flush=True)
        out.write_text(json.dumps({"setup": vars(args), "layers": list(base.layers), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
