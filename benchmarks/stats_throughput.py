"""How fast are key statistics? Our one-pass collection against the forward passes it cannot beat.

Side by side in one run, on the same pre-tokenised batches of real text (phases interleaved in every
repeat, so that load from other processes hits them alike):

    (a) a plain forward of the whole model,
    (b) a forward truncated right after the last edit layer (the physical limit of a one-pass collection),
    (c) ``collect_key_statistics`` for all edit layers (hooks, masking, float64 second moments),
    (c_text) the same from the text file, tokenisation included (run once).

Peak memory of each phase is measured in a fresh process (resident memory above the loaded model, sampled
every millisecond), and for (c) at two token counts, to show that it grows with d² per layer, never with
the number of tokens. Prints a table and writes JSON.

Usage (the issue's setting is --tokens 200000; on a shared 2-core CPU a short run is kinder):
    .venv/bin/python benchmarks/stats_throughput.py --tokens 8192 --repeats 3 --json stats_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "text" / "enwiki_sample_gensim.txt"
#: EasyEdit's MEMIT statistics on the development CPU: ~100 s per layer for ~250k tokens (the issue).
REFERENCE_SECONDS_PER_LAYER = 100.0
REFERENCE_TOKENS = 250_000


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return its result and the peak resident memory above the level before it (bytes)."""
    base, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return result, max(peak[0], _rss_bytes()) - base


def make_batches(tokenizer: Any, text: Path, tokens: int, window: int, batch_size: int) -> list[tuple[Any, Any]]:
    from lightning_kedit.text_windows import text_windows, window_batches

    windows = text_windows(tokenizer, text, window, max_tokens=tokens)
    return list(window_batches(windows, batch_size, tokenizer.pad_token_id or 0))


def phases(model: Any, tokenizer: Any, layers: list[int], batches: list[tuple[Any, Any]], tokens: int) -> dict:
    from lightning_kedit.hooks import run_until
    from lightning_kedit.models import ModelAdapter
    from lightning_kedit.statistics import collect_key_statistics

    stop = ModelAdapter.for_model(model).mlp_out(layers[-1])

    def forward(until: Any) -> None:
        with torch.no_grad():
            for ids, mask in batches:
                run_until(model, until, input_ids=ids, attention_mask=mask, use_cache=False)

    return {
        "a_full_forward": lambda: forward(None),
        "b_truncated_forward": lambda: forward(stop),
        "c_collection": lambda: collect_key_statistics(model, tokenizer, layers, batches, max_tokens=tokens),
    }


def probe(args: argparse.Namespace) -> None:
    """Child process: run one phase once and print its peak extra memory as JSON."""
    from lightning_kedit import load_model

    torch.set_num_threads(args.threads or torch.get_num_threads())
    model, tokenizer = load_model(args.model)
    batches = make_batches(tokenizer, Path(args.text), args.tokens, args.window, args.batch_size)
    fn = phases(model, tokenizer, args.layer_list, batches, args.tokens)[args.probe]
    _, extra = peak_extra_memory(fn)
    print(json.dumps({"phase": args.probe, "tokens": args.tokens, "peak_extra_bytes": extra}))


def run_probe(args: argparse.Namespace, phase: str, tokens: int) -> int:
    command = [sys.executable, __file__, "--probe", phase, "--tokens", str(tokens), "--model", args.model]
    command += ["--text", str(args.text), "--layers", args.layers, "--window", str(args.window)]
    command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--layers", default="4-8")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--memory-tokens", default="4096,16384", help="two token counts for the memory probes")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from lightning_kedit.cli.stats import parse_layers

    args.layer_list = parse_layers(args.layers, 10_000)
    if args.probe:
        probe(args)
        return {}

    from lightning_kedit import load_model
    from lightning_kedit.models import ModelAdapter
    from lightning_kedit.statistics import collect_key_statistics

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    adapter = ModelAdapter.for_model(model)
    start = time.perf_counter()
    batches = make_batches(tokenizer, args.text, args.tokens, args.window, args.batch_size)
    tokenize_seconds = time.perf_counter() - start
    tokens = sum(int(mask.sum()) for _, mask in batches)
    runs = phases(model, tokenizer, args.layer_list, batches, tokens)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    collect_key_statistics(model, tokenizer, args.layer_list, args.text, max_tokens=tokens, window=args.window)
    times["c_text_end_to_end"] = [time.perf_counter() - start]

    small, large = (int(x) for x in args.memory_tokens.split(","))
    memory = {name: run_probe(args, name, small) for name in runs}
    memory["c_collection_large"] = run_probe(args, "c_collection", large)

    median = {name: statistics.median(values) for name, values in times.items()}
    last = args.layer_list[-1]
    results: dict[str, Any] = {
        "model": args.model,
        "layers": args.layer_list,
        "num_layers": adapter.num_layers,
        "tokens": tokens,
        "window": args.window,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "tokenize_seconds": tokenize_seconds,
        "seconds": times,
        "median_seconds": median,
        "tokens_per_second": {name: tokens / value for name, value in median.items()},
        "ratio_c_over_b": median["c_collection"] / median["b_truncated_forward"],
        "ratio_c_over_a": median["c_collection"] / median["a_full_forward"],
        "ideal_ratio_c_over_a": (last + 1) / adapter.num_layers,
        "peak_extra_memory_mb": {name: value / 2**20 for name, value in memory.items()},
        "memory_tokens": [small, large],
    }
    per_second = results["tokens_per_second"]["c_collection"]
    ours = REFERENCE_TOKENS / per_second
    reference = REFERENCE_SECONDS_PER_LAYER * len(args.layer_list)
    results["projected_seconds_250k_tokens"] = ours
    results["speedup_vs_easyedit_reference"] = reference / ours

    print(
        f"SmolLM2 key statistics, layers {args.layers}, {tokens:,} tokens, {results['threads']} threads, "
        f"load average {results['load_average'][0]:.1f}, median of {args.repeats}"
    )
    print(f"{'phase':<22} {'seconds':>9} {'tokens/s':>9} {'/ (b)':>7} {'/ (a)':>7} {'peak MB':>8}")
    for name, value in median.items():
        mb = results["peak_extra_memory_mb"].get(name)
        print(
            f"{name:<22} {value:>9.2f} {tokens / value:>9.0f} {value / median['b_truncated_forward']:>7.3f} "
            f"{value / median['a_full_forward']:>7.3f} {'' if mb is None else f'{mb:8.0f}'}"
        )
    print(
        f"(c)/(b) = {results['ratio_c_over_b']:.3f} (target <= 1.15); (c)/(a) = {results['ratio_c_over_a']:.3f} "
        f"(ideal {last + 1}/{adapter.num_layers} = {results['ideal_ratio_c_over_a']:.3f})"
    )
    print(
        f"peak extra memory of (c): {results['peak_extra_memory_mb']['c_collection']:.0f} MB at {small:,} tokens, "
        f"{results['peak_extra_memory_mb']['c_collection_large']:.0f} MB at {large:,} tokens"
    )
    print(
        f"250k tokens, layers {args.layers}: ours {ours:.0f} s projected vs EasyEdit ~{reference:.0f} s "
        f"({results['speedup_vs_easyedit_reference']:.1f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
