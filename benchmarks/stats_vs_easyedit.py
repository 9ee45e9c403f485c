"""Key statistics against the reference: EasyEdit's own ``layer_stats`` and ours, side by side on one CPU.

The issue measured EasyEdit's MEMIT statistics at about 100 s per edit layer for 2,000 Wikipedia samples of
at most 128 tokens. This script runs EasyEdit's real code (imported from a checkout given with
``--easyedit``; nothing of it is copied here) and ``collect_key_statistics`` over the very same token
sequences, in one process, and prints seconds, tokens/s and the agreement of the two second moments.

EasyEdit is run as its MEMIT does (``layer_stats(..., to_collect=["mom2"], precision=mom2_dtype)``, one
call per edit layer), with ``batch_tokens=128`` so that samples are cut at 128 tokens as in the issue, and
``force_recompute=True`` so that nothing is cached. Its package ``__init__`` pulls in every editor and its
dependencies, so only the six modules ``layer_stats`` needs are loaded, under their own package names;
``datasets.load_dataset`` (a hub download) is replaced by the local samples.

Usage:
    git clone https://github.com/zjunlp/EasyEdit /tmp/EasyEdit   # or any checkout
    .venv/bin/python benchmarks/stats_vs_easyedit.py --easyedit /tmp/EasyEdit --samples 2000 \\
        --json benchmarks/results/stats_vs_easyedit.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "text" / "enwiki_sample_gensim.txt"
PACKAGES = ("easyeditor", "easyeditor.util", "easyeditor.models", "easyeditor.models.rome")


def read_samples(text: Path, count: int) -> list[str]:
    """The first ``count`` paragraphs of ``text`` (article headings ``= Title =`` and blank lines left out)."""
    lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines()]
    samples = [line for line in lines if line and not line.startswith("=")][:count]
    if len(samples) < count:
        raise SystemExit(f"--samples {count}: {text} holds only {len(samples)} paragraphs; ask for fewer")
    return samples


def import_layer_stats(checkout: Path, samples: list[str]) -> Any:
    """EasyEdit's ``layer_stats`` module, loaded without the package ``__init__`` and fed ``samples``."""
    root = checkout / "easyeditor"
    if not (root / "models" / "rome" / "layer_stats.py").is_file():
        raise SystemExit(
            f"--easyedit {checkout}: no easyeditor/models/rome/layer_stats.py there; give an EasyEdit checkout"
        )
    for name in PACKAGES:
        package = types.ModuleType(name)
        package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = package
    if importlib.util.find_spec("datasets") is None:  # only its name is imported: the loader is replaced below
        sys.modules["datasets"] = types.ModuleType("datasets")
        sys.modules["datasets"].load_dataset = None  # type: ignore[attr-defined]
    module = importlib.import_module("easyeditor.models.rome.layer_stats")
    module.load_dataset = lambda *args, **kwargs: {"train": [{"text": text} for text in samples]}
    return module


def token_batches(tokenizer: Any, samples: list[str], max_length: int, batch_tokens: int) -> list[tuple[Any, Any]]:
    """The samples tokenised as EasyEdit does (``encode``, cut at ``max_length``), packed by length, padded."""
    from lightning_kedit.evaluation.text_windows import window_batches

    sequences = sorted((tokenizer.encode(text, truncation=True, max_length=max_length) for text in samples), key=len)
    groups: list[list[list[int]]] = [[]]
    for ids in sequences:
        if groups[-1] and len(ids) * (len(groups[-1]) + 1) > batch_tokens:
            groups.append([])
        groups[-1].append(ids)
    pad_id = tokenizer.pad_token_id or 0
    return [next(window_batches(group, len(group), pad_id)) for group in groups]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--easyedit", type=Path, required=True, help="an EasyEdit checkout (the repository root)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--layers", default="4-8")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=128, help="EasyEdit's batch_tokens: samples are cut here")
    parser.add_argument("--precision", default="float32", help="EasyEdit's mom2_dtype (its MEMIT default)")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batch for ours")
    parser.add_argument("--easyedit-commit", default=None, help="record this commit (for an exported tree)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from lightning_kedit import load_model
    from lightning_kedit.cli.stats import parse_layers
    from lightning_kedit.models import ModelAdapter
    from lightning_kedit.statistics import collect_key_statistics

    samples = read_samples(args.text, args.samples)  # bad input is refused before the model loads
    layer_stats = import_layer_stats(args.easyedit, samples)
    model, tokenizer = load_model(args.model)
    adapter = ModelAdapter.for_model(model)
    layers = parse_layers(args.layers, adapter.num_layers)
    batches = token_batches(tokenizer, samples, args.max_length, args.batch_tokens)
    tokens = sum(int(mask.sum()) for _, mask in batches)

    reference: dict[int, Any] = {}
    reference_seconds: dict[int, float] = {}
    stats_dir = ROOT / "out" / "easyedit_stats"
    for layer in layers:
        start = time.perf_counter()
        stat = layer_stats.layer_stats(
            model, tokenizer, adapter.weight_name(layer).removesuffix(".weight"), str(stats_dir), "wikipedia", ["mom2"],
            model_name=args.model, sample_size=len(samples), precision=args.precision,
            batch_tokens=args.max_length, progress=lambda loader, total=None: loader, force_recompute=True,
        )  # fmt: skip
        reference_seconds[layer] = time.perf_counter() - start
        reference[layer] = stat.mom2.moment().double()
        print(f"EasyEdit layer {layer}: {reference_seconds[layer]:.1f} s", flush=True)

    start = time.perf_counter()
    ours = collect_key_statistics(model, tokenizer, layers, batches, max_tokens=tokens)
    ours_seconds = time.perf_counter() - start
    second = ours.compute()
    difference = {
        layer: float((second[layer] - reference[layer]).norm() / second[layer].norm()) for layer in layers
    }
    easyedit_total = sum(reference_seconds.values())
    results = {
        "model": args.model,
        "layers": layers,
        "samples": len(samples),
        "tokens": tokens,
        "easyedit_commit": args.easyedit_commit or _commit(args.easyedit),
        "easyedit_precision": args.precision,
        "easyedit_batch_tokens": args.max_length,
        "easyedit_seconds_per_layer": reference_seconds,
        "easyedit_seconds": easyedit_total,
        "easyedit_tokens_per_s_per_layer": tokens * len(layers) / easyedit_total,
        "ours_seconds": ours_seconds,
        "ours_tokens_per_s": tokens / ours_seconds,
        "speedup": easyedit_total / ours_seconds,
        "relative_difference": difference,
        "threads": torch.get_num_threads(),
    }
    print(f"\n{len(samples)} samples, {tokens:,} tokens, layers {layers[0]}-{layers[-1]}, {results['threads']} threads")
    print("| method | seconds | tokens/s (per layer) |")
    print("| --- | ---: | ---: |")
    per_layer = results["easyedit_tokens_per_s_per_layer"]
    print(f"| EasyEdit layer_stats, one call per layer | {easyedit_total:.1f} | {per_layer:,.0f} |")
    print(f"| ours, one pass for all layers | {ours_seconds:.1f} | {tokens * len(layers) / ours_seconds:,.0f} |")
    print(f"speed-up {results['speedup']:.2f}x; largest relative difference of C: {max(difference.values()):.2e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return results


def _commit(checkout: Path) -> str | None:
    """The checkout's commit, when it is a git repository (an exported tree has none: say it in the docs)."""
    done = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True
    )
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != checkout.resolve():
        return None  # not a repository of its own (an exported tree, or a folder inside another repository)
    return lines[1]


if __name__ == "__main__":
    main()
