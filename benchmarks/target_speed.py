"""Target values on SmolLM2: float32 only against the bfloat16 phase plus float32 finish, side by side.

Both modes optimise δ for the same CounterFact requests in the same process, alternating, ``--repeats`` times;
the table gives the median seconds, the Adam steps, and the target probability as measured in float32 (the
bfloat16 mode reports the exact arithmetic's probability too, by construction).

Usage:
    python benchmarks/target_speed.py --n 32 --repeats 3 --out benchmarks/results/target_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="CounterFact validation requests (one batch of 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/target_speed.json")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lightning_kedit.editing import EditHyperParams, context_templates
    from lightning_kedit.editing.targets import compute_target_values
    from lightning_kedit.editing.upper_blocks import bfloat16_is_fast
    from lightning_kedit.models.loading import load_model
    from lightning_kedit.requests import load_requests

    model, tokenizer = load_model("smollm2")
    requests = load_requests(DATA / "counterfact" / "counterfact-val.json", args.n)
    hp = EditHyperParams.for_model(model, "memit")
    templates = context_templates(model, tokenizer, hp.prefix_lengths, seed=hp.seed)
    modes = {"float32": hp.replace(v_bfloat16=False), "bfloat16 + float32 finish": hp.replace(v_bfloat16=True)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
    for repeat in range(args.repeats):
        for name, setting in modes.items():
            tick = time.perf_counter()
            values = compute_target_values(model, tokenizer, requests, hp.layers[-1], templates, setting)
            runs[name].append({
                "seconds": time.perf_counter() - tick,
                "steps_mean": float(values.steps.float().mean()),
                "prob_mean": float(values.prob.mean()),
                "prob_min": float(values.prob.min()),
                "share_at_stop_prob": float((values.prob >= hp.stop_prob).float().mean()),
            })
            print(f"repeat {repeat} {name}: {runs[name][-1]}", flush=True)
    rows = []
    for name, done in runs.items():
        rows.append({"mode": name, "seconds_median": statistics.median(r["seconds"] for r in done),
                     **{k: done[-1][k] for k in ("steps_mean", "prob_mean", "prob_min", "share_at_stop_prob")}})
    base = rows[0]["seconds_median"]
    print(f"\n{args.n} requests, {len(templates)} prompts each + the KL prompt; CPU bfloat16 native: "
          f"{bfloat16_is_fast(torch.device('cpu'))}; {torch.get_num_threads()} threads; medians of {args.repeats}")
    print("| mode | seconds | speed-up | Adam steps (mean) | p(target) mean | min | share ≥ stop |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['seconds_median']:.1f} | {base / row['seconds_median']:.2f}× | "
              f"{row['steps_mean']:.1f} | {row['prob_mean']:.3f} | {row['prob_min']:.3f} | "
              f"{row['share_at_stop_prob']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "threads": torch.get_num_threads(), "rows": rows, "runs": runs},
                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
