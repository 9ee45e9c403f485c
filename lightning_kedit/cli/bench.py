"""``kedit bench``: success by number of edits, as a table and a plot, resumable.

Example:
    $ kedit bench --model smollm2 --requests ../shared/data/counterfact/counterfact-val.json \\
        --methods memit,rome-seq,ft --n 1,10,100 --out bench/smollm2
    $ kedit bench --requests facts.json --methods memit-seq --batch-size 10 --n 10,100 --out bench/seq \\
        --set v_steps=10 --ppl-text ../shared/data/text/wikitext2_test.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "parse_overrides", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit bench``."""
    parser.add_argument("--requests", required=True, metavar="FILE", help="edit requests (any supported layout)")
    parser.add_argument(
        "--methods", default="memit,rome-seq,ft", metavar="M,M",
        help="batch methods (memit, rome, ft, alphaedit, lifelong) and sequential ones (rome-seq, memit-seq, "
        "ft-seq, alphaedit-seq, lifelong-seq); default: memit,rome-seq,ft",
    )
    parser.add_argument("--n", default="1,10,100", metavar="N,N", help="numbers of edits (default: 1,10,100)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (finished cells are kept)")
    parser.add_argument("--stats", default=None, metavar="FILE", help="key statistics file (default: cached)")
    parser.add_argument("--ppl-text", default=None, metavar="FILE", help="text for perplexity (default: none)")
    parser.add_argument("--ppl-tokens", type=int, default=20000, metavar="T", help="perplexity tokens (default: 20000)")
    parser.add_argument("--sequential", action="store_true", help="run every listed method sequentially (-seq)")
    parser.add_argument(
        "--batch-size", type=int, default=100, metavar="B",
        help="facts per edit of the sequential methods, ROME excepted (default: 100)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a hyper-parameter of every method, e.g. --set v_steps=10 (repeatable; JSON values)",
    )
    parser.add_argument("--eval-batch-size", type=int, default=32, metavar="B", help="sequences per forward (32)")
    parser.add_argument("--no-baseline", action="store_true", help="do not evaluate the unedited model")
    parser.add_argument("--target-cache", default=None, metavar="DIR", help="target-value cache folder")
    parser.add_argument("--no-target-cache", action="store_true", help="neither read nor write cached targets")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--verbose", action="store_true", help="also the editor's own progress")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["v_steps=10", "layers=[4,5]"]`` as ``{"v_steps": 10, "layers": [4, 5]}`` (JSON values, else strings).

    Example:
        >>> parse_overrides(["v_steps=10", "v_lr=0.2"])
        {'v_steps': 10, 'v_lr': 0.2}
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KeditError(f"--set {item!r} is not KEY=VALUE; give e.g. --set v_steps=10")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Check every input, load the model, run the missing cells and print the success table."""
    from lightning_kedit.bench import parse_counts, parse_methods, run_bench
    from lightning_kedit.bench.report import success_table
    from lightning_kedit.editing.target_cache import TargetCache
    from lightning_kedit.models.loading import load_model
    from lightning_kedit.requests import load_requests

    methods = parse_methods(args.methods)
    if args.sequential:
        methods = parse_methods([m.name if m.sequential else f"{m.name}-seq" for m in methods])
    counts = parse_counts(args.n)
    overrides = parse_overrides(args.overrides)
    for name, value in (("--batch-size", args.batch_size), ("--eval-batch-size", args.eval_batch_size),
                        ("--ppl-tokens", args.ppl_tokens)):
        if value < 1:
            raise KeditError(f"{name} must be a positive integer, got {value}")
    for name, path in (("--requests", args.requests), ("--ppl-text", args.ppl_text), ("--stats", args.stats)):
        if path is not None and not Path(path).is_file():
            raise KeditError(f"{name} {path}: no such file")
    requests = load_requests(args.requests)
    if max(counts) > len(requests):
        raise KeditError(
            f"--n {max(counts)} is larger than the {len(requests)} requests in {args.requests}; "
            f"give numbers of edits up to {len(requests)}"
        )
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    results = run_bench(
        model, tokenizer, requests, methods=[m.name for m in methods], counts=counts, out_dir=args.out,
        model_name=str(args.model), requests_name=str(args.requests), statistics=args.stats, hparams=overrides,
        batch_size=args.batch_size, baseline=not args.no_baseline, ppl_text=args.ppl_text,
        ppl_tokens=args.ppl_tokens, eval_batch_size=args.eval_batch_size,
        target_cache=TargetCache(args.target_cache, enabled=not args.no_target_cache),
        progress=not args.quiet, verbose=args.verbose,
    )
    print(success_table(results))
    print(f"\nwrote {results.path}, {results.folder / 'results.md'} and {results.folder / 'success_vs_edits.png'}",
          file=sys.stderr)
    return {**results.to_dict(), "out": str(results.folder), "seconds": round(time.perf_counter() - start, 3)}
