"""How fast are key statistics? Our one-pass collection against the forward passes it cannot beat.

Side by side in one run, on the same pre-tokenised batches of real text (phases interleaved in every
repeat, so that load from other processes hits them alike):

    (a) a plain forward of the whole model,
    (b) a forward truncated right after the last edit layer (the issue's physical limit of a one-pass collection),
    (b_keys) a forward stopped when the last projection is called (its input is the last keys; the tight limit),
    (c) ``collect_key_statistics`` for all edit layers (hooks, masking, exact float64 second moments),
    (c_float32_products) the same with each batch's products in float32, summed in float64,
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
from collections.abc import Callable, Iterable
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
    from lightning_kedit.evaluation.text_windows import text_windows, window_batches

    windows = text_windows(tokenizer, text, window, max_tokens=tokens)
    return list(window_batches(windows, batch_size, tokenizer.pad_token_id or 0))


def phases(model: Any, tokenizer: Any, layers: list[int], batches: Iterable[tuple[Any, Any]], tokens: int) -> dict:
    from lightning_kedit.models import ModelAdapter
    from lightning_kedit.models.forward_hooks import run_until
    from lightning_kedit.statistics import collect_key_statistics

    stop = ModelAdapter.for_model(model).mlp_out(layers[-1])

    def forward(until: Any, before: bool = False) -> None:
        with torch.no_grad():
            for ids, mask in batches:
                run_until(model, until, before=before, input_ids=ids, attention_mask=mask, use_cache=False)

    return {
        "a_full_forward": lambda: forward(None),
        "b_truncated_forward": lambda: forward(stop),
        "b_stopped_at_keys": lambda: forward(stop, before=True),
        "c_collection": lambda: collect_key_statistics(model, tokenizer, layers, batches, max_tokens=tokens),
        "c_float32_products": lambda: collect_key_statistics(
            model, tokenizer, layers, batches, max_tokens=tokens, product_dtype=torch.float32
        ),
    }


def traced_batches(batches: list[tuple[Any, Any]], trace: list[int]) -> Any:
    """Yield ``batches``, recording the resident memory each time the next one is asked for."""
    for batch in batches:
        trace.append(_rss_bytes())
        yield batch
    trace.append(_rss_bytes())


def probe(args: argparse.Namespace) -> None:
    """Child process: run one phase once; print its peak extra memory (and, for (c), RSS per batch) as JSON."""
    from lightning_kedit import load_model
    from lightning_kedit.statistics import collect_key_statistics

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    batches = make_batches(tokenizer, Path(args.text), args.tokens, args.window, args.batch_size)
    trace: list[int] = []
    if args.probe == "c_collection":

        def fn() -> Any:
            source = traced_batches(batches, trace)
            return collect_key_statistics(model, tokenizer, args.layer_list, source, max_tokens=args.tokens)

    else:  # the forward passes iterate their batches once: trace them the same way
        fn = phases(model, tokenizer, args.layer_list, traced_batches(batches, trace), args.tokens)[args.probe]
    base = _rss_bytes()
    _, extra = peak_extra_memory(fn)
    print(json.dumps({"peak_extra_bytes": extra, "rss_per_batch": [value - base for value in trace]}))


def run_probe(args: argparse.Namespace, phase: str, tokens: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--probe", phase, "--tokens", str(tokens), "--model", args.model]
    command += ["--text", str(args.text), "--layers", args.layers, "--window", str(args.window)]
    command += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (all threads of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


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
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, cpu_seconds = timed(fn)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    text_run = lambda: collect_key_statistics(  # noqa: E731
        model, tokenizer, args.layer_list, args.text, max_tokens=tokens, window=args.window
    )
    seconds, cpu_seconds = timed(text_run)
    wall["c_text_end_to_end"], cpu["c_text_end_to_end"] = [seconds], [cpu_seconds]

    small, large = (int(x) for x in args.memory_tokens.split(","))
    probes = {name: run_probe(args, name, small) for name in ("a_full_forward", "b_truncated_forward", "c_collection")}
    probes["c_collection_large"] = run_probe(args, "c_collection", large)

    median = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    last = args.layer_list[-1]
    ideal = (last + 1) / adapter.num_layers

    def ratio(phase: str, reference: str) -> dict[str, float]:
        return {"wall": median[phase] / median[reference], "cpu": median_cpu[phase] / median_cpu[reference]}

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
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "median_wall_seconds": median,
        "median_cpu_seconds": median_cpu,
        "tokens_per_second": {name: tokens / value for name, value in median.items()},
        "ratio_c_over_b": ratio("c_collection", "b_truncated_forward"),
        # Paired within each repeat, so that drift between repeats (up to 25 % on a shared VM) cancels.
        "ratio_c_over_b_per_repeat": {
            name: statistics.median(x / y for x, y in zip(cpu[name], cpu["b_truncated_forward"], strict=True))
            for name in ("c_collection", "c_float32_products", "b_stopped_at_keys")
        },
        "ratio_c_over_b_keys": ratio("c_collection", "b_stopped_at_keys"),
        "ratio_c_float32_products_over_b": ratio("c_float32_products", "b_truncated_forward"),
        "ratio_c_over_a": ratio("c_collection", "a_full_forward"),
        "ideal_ratio_c_over_a": ideal,
        "peak_extra_memory_mb": {name: probe["peak_extra_bytes"] / 2**20 for name, probe in probes.items()},
        "collection_rss_per_batch_mb": {
            str(small): [value / 2**20 for value in probes["c_collection"]["rss_per_batch"]],
            str(large): [value / 2**20 for value in probes["c_collection_large"]["rss_per_batch"]],
        },
        "memory_tokens": [small, large],
    }
    # The reference method: one forward pass per edit layer, either of the whole model (as the issue
    # describes EasyEdit) or stopped at that layer (rome's layer_stats; estimated from (b) by blocks run).
    per_layer_full = len(args.layer_list) * median_cpu["a_full_forward"]
    per_layer_truncated = sum((layer + 1) / (last + 1) for layer in args.layer_list) * median_cpu["b_truncated_forward"]
    results["speedup_vs_full_forward_per_layer"] = per_layer_full / median_cpu["c_collection"]
    results["speedup_vs_truncated_forward_per_layer_estimate"] = per_layer_truncated / median_cpu["c_collection"]
    ours = REFERENCE_TOKENS / results["tokens_per_second"]["c_collection"]
    reference = REFERENCE_SECONDS_PER_LAYER * len(args.layer_list)
    results["projected_seconds_250k_tokens"] = ours
    results["speedup_vs_easyedit_reference_seconds"] = reference / ours
    report(results, adapter.num_layers)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def report(results: dict[str, Any], num_layers: int) -> None:
    """Print the table and the headline ratios."""
    wall, cpu = results["median_wall_seconds"], results["median_cpu_seconds"]
    layers, tokens = results["layers"], results["tokens"]
    print(
        f"{results['model']} key statistics, layers {layers[0]}-{layers[-1]}, {tokens:,} tokens, "
        f"{results['threads']} threads, load average {results['load_average'][0]:.1f}, median of {results['repeats']}"
    )
    header = f"{'phase':<22} {'wall s':>8} {'tokens/s':>9} {'cpu s':>8} {'cpu/(b)':>8} {'cpu/(a)':>8} {'peak MB':>8}"
    print(header)
    for name in wall:
        mb = results["peak_extra_memory_mb"].get(name)
        print(
            f"{name:<22} {wall[name]:>8.2f} {tokens / wall[name]:>9.0f} {cpu[name]:>8.2f} "
            f"{cpu[name] / cpu['b_truncated_forward']:>8.3f} {cpu[name] / cpu['a_full_forward']:>8.3f} "
            f"{'' if mb is None else f'{mb:8.0f}'}"
        )
    b, a = results["ratio_c_over_b"], results["ratio_c_over_a"]
    print(f"(c)/(b) = {b['cpu']:.3f} cpu, {b['wall']:.3f} wall (target <= 1.15)")
    b32, keys = results["ratio_c_float32_products_over_b"], results["ratio_c_over_b_keys"]
    print(f"(c32)/(b) = {b32['cpu']:.3f} cpu, {b32['wall']:.3f} wall; (c)/(b_keys) = {keys['cpu']:.3f} cpu")
    paired = results["ratio_c_over_b_per_repeat"]
    print("median of the per-repeat CPU ratios to (b): " + ", ".join(f"{k} {v:.3f}" for k, v in paired.items()))
    print(
        f"(c)/(a) = {a['cpu']:.3f} cpu, {a['wall']:.3f} wall (ideal {layers[-1] + 1}/{num_layers} = "
        f"{results['ideal_ratio_c_over_a']:.3f})"
    )
    small, large = results["memory_tokens"]
    peak = results["peak_extra_memory_mb"]
    print(
        f"peak extra memory of (c): {peak['c_collection']:.0f} MB at {small:,} tokens, "
        f"{peak['c_collection_large']:.0f} MB at {large:,} tokens"
    )
    trace = results["collection_rss_per_batch_mb"][str(large)]
    print(
        "resident memory above the loaded model before each batch of (c), MB: "
        + " ".join(f"{value:.0f}" for value in trace)
    )
    print(
        f"one forward per layer (the reference method), in this run: whole model "
        f"{results['speedup_vs_full_forward_per_layer']:.1f}x the cost of (c) (ideal "
        f"{len(layers) * num_layers / (layers[-1] + 1):.1f}x), stopped at each layer ~"
        f"{results['speedup_vs_truncated_forward_per_layer_estimate']:.1f}x"
    )
    print(
        f"250k tokens: ours {results['projected_seconds_250k_tokens']:.0f} s projected at this run's speed, "
        f"EasyEdit ~{REFERENCE_SECONDS_PER_LAYER * len(layers):.0f} s as measured for the issue"
    )


if __name__ == "__main__":
    main()
