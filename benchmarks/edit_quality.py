"""Edit quality on SmolLM2 + CounterFact: MEMIT λ sweep (one batch), ROME single edits, FT baseline.

Target values do not depend on λ, the statistics, the bare prompt's weight or the edit layers below the last one,
so the MEMIT sweep (λ × ``--bare-weights`` × ``--layer-sets``) optimises them once (through the user's
``TargetCache``) and re-solves per setting. Each setting is applied, evaluated (efficacy,
paraphrase, neighbourhood, perplexity on the first ``--ppl-tokens`` tokens of WikiText-2 test in 512-token
windows) and reverted.

Usage:
    python benchmarks/edit_quality.py --n 100 --lambdas 15000,4000,1000 --relative 5,20 --rome 50 --ft \\
        --out benchmarks/results/edit_quality.json
    python benchmarks/edit_quality.py --n 100 --lambdas 8000,4000 --layer-sets 4-8,3-8,2-8 --bare-weights uniform,0.5
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _evaluate(model: Any, tokenizer: Any, requests: list[Any], ppl_tokens: int) -> dict[str, Any]:
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests

    ppl_text = DATA / "text" / "wikitext2_test.txt" if ppl_tokens else None
    return evaluate_requests(model, tokenizer, requests, ppl_text=ppl_text, ppl_tokens=ppl_tokens)


class _Precomputed:
    """Stands in for a TargetCache: the target values of the requests, computed once at the last edit layer."""

    def __init__(self, values: Any) -> None:
        self.values = values

    def lookup_or_compute(self, model: Any, tokenizer: Any, requests: Any, layer: int, *rest: Any) -> Any:
        assert layer == self.values.layer and len(requests) == self.values.delta.shape[0]
        return self.values


def _row(name: str, metrics: dict[str, Any], seconds: float) -> dict[str, Any]:
    keys = ("efficacy", "paraphrase", "neighborhood", "perplexity")
    return {"setting": name, **{k: metrics.get(k) for k in keys}, "seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--lambdas", default="15000,4000,1000", help="absolute λ values (C = E[k kᵀ])")
    parser.add_argument("--relative", default="", help="λ values relative to mean(diag C)")
    parser.add_argument("--bare-weights", default="default",
                        help="shares of the bare prompt in the averaged keys to cross with λ ('uniform': all "
                             "templates alike; 'default': the model's default)")
    parser.add_argument("--layer-sets", default="default",
                        help="edit layer ranges ending at the default's last layer, e.g. 4-8,3-8 (they share the "
                             "target values); 'default': the model's default")
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--ppl-tokens", type=int, default=20_000)
    parser.add_argument("--v-steps", type=int, default=None)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 phase of the target values (default: where the CPU runs bfloat16 natively)")
    parser.add_argument("--rome", type=int, default=0, help="ROME single edits on the first N cases")
    parser.add_argument("--ft", action="store_true", help="also the FT baseline on the batch")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is much faster on a CPU shared with other jobs)")
    parser.add_argument("--out", default="benchmarks/results/edit_quality.json")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from lightning_kedit.editing import EditHyperParams, compute_edit, context_templates, memit_updates
    from lightning_kedit.editing.delta import EditDelta
    from lightning_kedit.editing.target_cache import TargetCache
    from lightning_kedit.editing.targets import compute_target_values
    from lightning_kedit.models.loading import load_model
    from lightning_kedit.requests import load_requests
    from lightning_kedit.statistics import load_or_collect_statistics

    model, tokenizer = load_model("smollm2")
    requests = load_requests(DATA / "counterfact" / "counterfact-val.json", args.n)
    hp = EditHyperParams.for_model(model, "memit").replace(v_steps=args.v_steps, v_bfloat16=args.bf16)
    layer_sets = {"default": hp.layers}
    for spec in args.layer_sets.split(","):
        if spec != "default":
            first, last = (int(x) for x in spec.split("-"))
            if last != hp.layers[-1]:
                parser.error(f"--layer-sets {spec}: must end at the default's last layer {hp.layers[-1]}")
            layer_sets[spec] = tuple(range(first, last + 1))
    stats_layers = sorted({layer for spec in args.layer_sets.split(",") for layer in layer_sets[spec]})
    corpus = DATA / "text" / "enwiki_sample_gensim.txt"
    stats = load_or_collect_statistics(model, tokenizer, stats_layers, source=corpus, max_tokens=args.stats_tokens)
    rows = []
    tick = time.perf_counter()
    rows.append(_row("unedited", _evaluate(model, tokenizer, requests, args.ppl_tokens), time.perf_counter() - tick))
    print(rows[-1], flush=True)

    tick = time.perf_counter()
    templates = context_templates(model, tokenizer, hp.prefix_lengths, seed=hp.seed)
    cache = TargetCache()  # δ does not depend on λ: optimised once, shared with `kedit bench` runs
    values = compute_target_values(model, tokenizer, requests, hp.layers[-1], templates, hp, progress=True,
                                   target_cache=cache)
    target_seconds = time.perf_counter() - tick
    print(f"targets: {target_seconds:.0f} s, mean prob {float(values.prob.mean()):.3f}", flush=True)
    settings = []
    for spec, bare in itertools.product(args.layer_sets.split(","), args.bare_weights.split(",")):
        weighted = hp.replace(layers=layer_sets[spec])
        if bare != "default":
            weighted = dataclasses.replace(weighted, bare_weight=None if bare == "uniform" else float(bare))
        tag = ("" if spec == "default" else f", layers {spec}") + ("" if bare == "default" else f", bare {bare}")
        settings += [(f"memit λ={x}{tag}", weighted.replace(mom2_weight=float(x), lambda_relative=False))
                     for x in args.lambdas.split(",") if x]
        settings += [(f"memit λ={x}·mean(diag C){tag}", weighted.replace(mom2_weight=float(x), lambda_relative=True))
                     for x in args.relative.split(",") if x]
    precomputed = _Precomputed(values)  # δ depends on the last layer only: every layer set reuses it
    for name, setting in settings:
        tick = time.perf_counter()
        factors, _ = memit_updates(model, tokenizer, requests, stats, setting, templates=templates,
                                   target_cache=precomputed)  # type: ignore[arg-type]
        delta = EditDelta.from_model(model, factors, method="memit", hparams=setting.to_dict())
        with delta.applied(model):
            metrics = _evaluate(model, tokenizer, requests, args.ppl_tokens)
        rows.append(_row(name, metrics, time.perf_counter() - tick + target_seconds))
        print(rows[-1], flush=True)

    if args.rome:
        tick = time.perf_counter()
        rome_hp = EditHyperParams.for_model(model, "rome")
        rome_stats = load_or_collect_statistics(model, tokenizer, list(rome_hp.layers),
                                                source=DATA / "text" / "enwiki_sample_gensim.txt",
                                                max_tokens=args.stats_tokens)
        totals: dict[str, float] = {}
        for request in requests[: args.rome]:
            delta = compute_edit(model, tokenizer, [request], method="rome", hparams=rome_hp, statistics=rome_stats)
            with delta.applied(model):
                one = _evaluate(model, tokenizer, [request], 0)
            for key in ("efficacy", "paraphrase", "neighborhood"):
                totals[key] = totals.get(key, 0.0) + float(one[key] or 0.0) / args.rome
        base = _evaluate(model, tokenizer, requests[: args.rome], 0)
        rows.append(_row(f"rome ×{args.rome} single", totals, time.perf_counter() - tick))
        rows.append(_row(f"unedited (first {args.rome})", base, 0.0))
        print(rows[-2:], flush=True)

    if args.ft:
        tick = time.perf_counter()
        delta = compute_edit(model, tokenizer, requests, method="ft")
        with delta.applied(model):
            rows.append(_row("ft", _evaluate(model, tokenizer, requests, args.ppl_tokens), time.perf_counter() - tick))
        print(rows[-1], flush=True)

    print("\n| setting | efficacy | paraphrase | neighbourhood | perplexity | seconds |\n|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
                 for k in ("efficacy", "paraphrase", "neighborhood", "perplexity")]
        print(f"| {row['setting']} | {' | '.join(cells)} | {row['seconds']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n": args.n, "stats_tokens": args.stats_tokens, "load": os.getloadavg(),
                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
