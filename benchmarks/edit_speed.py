"""End-to-end MEMIT edit time on SmolLM2 with statistics cached: keys, targets, solve, apply, peak memory.

Each size runs in a fresh process (peak RSS is per process); the load average of the shared machine is
recorded beside each time, since the CPU is shared. The 1,000-edit figure is projected from the measured
per-request cost of the targets (which dominates) unless ``--sizes`` includes 1000.

Usage:
    python benchmarks/edit_speed.py --sizes 10,100 --out benchmarks/results/edit_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(n: int, stats_tokens: int) -> dict[str, Any]:
    """One edit of the first ``n`` CounterFact cases, timed by phase (statistics and prefixes cached)."""
    import torch

    from lightning_kedit.editing import EditHyperParams, compute_edit, context_templates
    from lightning_kedit.models.loading import load_model
    from lightning_kedit.requests import load_requests
    from lightning_kedit.statistics import load_or_collect_statistics

    model, tokenizer = load_model("smollm2")
    requests = load_requests(DATA / "counterfact" / "counterfact-val.json", n)
    hp = EditHyperParams.for_model(model, "memit")
    stats = load_or_collect_statistics(model, tokenizer, list(hp.layers),
                                       source=DATA / "text" / "enwiki_sample_gensim.txt", max_tokens=stats_tokens)
    context_templates(model, tokenizer, hp.prefix_lengths, seed=hp.seed)  # cached once per model
    load_before = os.getloadavg()[0]
    timings: dict[str, float] = {}
    start = time.perf_counter()
    delta = compute_edit(model, tokenizer, requests, hparams=hp, statistics=stats, timings=timings)
    tick = time.perf_counter()
    delta.apply(model)
    timings["apply"] = time.perf_counter() - tick
    total = time.perf_counter() - start
    return {
        "n": n,
        "seconds": round(total, 1),
        "per_request": round(total / n, 2),
        "phases": {k: round(v, 1) for k, v in timings.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100")
    parser.add_argument("--stats-tokens", type=int, default=100_000)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 is much faster on a CPU shared with other jobs)")
    parser.add_argument("--out", default="benchmarks/results/edit_speed.json")
    args = parser.parse_args(argv)
    if args.one is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure(args.one, args.stats_tokens)))
        return 0
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--stats-tokens", str(args.stats_tokens),
                               *(["--threads", str(args.threads)] if args.threads else [])],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    largest = max(rows, key=lambda r: r["n"])
    projection = {"n": 1000, "seconds_projected": round(largest["per_request"] * 1000, 0), "from_n": largest["n"]}
    print("\n| edits | seconds | s/request | keys | targets | solve | apply | peak RSS MB | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["phases"]
        print(f"| {r['n']} | {r['seconds']} | {r['per_request']} | {p.get('keys')} | {p.get('targets')} | "
              f"{p.get('solve')} | {p.get('apply')} | {r['peak_rss_mb']:.0f} | {r['load_average']} |")
    print(f"projected 1000 edits: {projection['seconds_projected']:.0f} s (linear in the targets' per-request cost)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "projection": projection}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
