"""``kedit stats``: key statistics (the second moment of MLP keys) for all edit layers in one pass.

Example:
    $ kedit stats --model smollm2 --text ../shared/data/text/wikitext2_valid.txt --layers 4,5,6,7,8 \\
        --tokens 100000 --out stats.safetensors
    $ kedit stats --layers auto --json stats.json      # bundled corpus, cached under $KEDIT_CACHE/stats
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "parse_layers", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit stats``."""
    parser.add_argument(
        "--text", nargs="+", metavar="FILE", default=None, help="text files (default: the bundled Wikipedia excerpt)"
    )
    parser.add_argument("--layers", default="auto", help="edit layers: '4,5,6,7,8', '4-8' or 'auto' (default: auto)")
    parser.add_argument("--tokens", type=int, default=100_000, metavar="N", help="tokens per layer (default: 100000)")
    parser.add_argument("--window", type=int, default=256, metavar="L", help="tokens per window (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="B", help="windows per forward (default: 8)")
    parser.add_argument("--skip-bos", action="store_true", help="leave BOS tokens out of the statistics")
    parser.add_argument(
        "--products",
        choices=("float64", "float32"),
        default="float64",
        help="dtype of each batch's k kᵀ products, summed in float64: float64 is exact, float32 faster",
    )
    parser.add_argument(
        "--out", default=None, metavar="FILE", help="output .safetensors (default: the cache, reused when present)"
    )
    parser.add_argument("--force", action="store_true", help="collect again and overwrite an existing file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_layers(text: str, num_layers: int) -> list[int]:
    """``'4,5,6'`` or ``'4-8'`` (or a mix, ``'2,4-6'``) as a sorted list of layer indices.

    Example:
        >>> parse_layers("2,4-6", 30)
        [2, 4, 5, 6]
    """
    layers: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                start, stop = part.split("-", 1)
                layers.update(range(int(start), int(stop) + 1))
            else:
                layers.add(int(part))
    except ValueError as err:
        raise KeditError(f"--layers {text!r} is not a list of layer indices like '4,5,6,7,8', '4-8' or 'auto'") from err
    outside = sorted(layer for layer in layers if not 0 <= layer < num_layers)
    if not layers or outside:
        raise KeditError(
            f"--layers {text!r} has layers outside the model: {outside}; it has layers 0..{num_layers - 1}"
        )
    return sorted(layers)


def _auto_layers(model: Any, tokenizer: Any, default: list[int]) -> tuple[list[int], str]:
    try:
        from lightning_kedit.tracing import choose_edit_layers
    except ImportError:
        return default, "the adapter's default layers (causal tracing is not available)"
    return list(choose_edit_layers(model, tokenizer, window=len(default))), "chosen by causal tracing"


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Collect (or reuse) the statistics, print a summary and return it for ``--json``."""
    import torch

    from lightning_kedit.models import ModelAdapter, load_model
    from lightning_kedit.models.fingerprint import model_fingerprint
    from lightning_kedit.statistics import collect_key_statistics, load_or_collect_statistics
    from lightning_kedit.statistics.collection import statistics_cache_path

    for name in ("tokens", "window", "batch_size"):
        if getattr(args, name) < 1:
            raise KeditError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.force:
        raise KeditError(f"{str(out)!r} exists; pass --force to overwrite it or choose another --out")
    model, tokenizer = load_model(args.model)
    adapter = ModelAdapter.for_model(model)
    note = "as given"
    if args.layers.strip().lower() == "auto":
        layers, note = _auto_layers(model, tokenizer, adapter.default_layers())
    else:
        layers = parse_layers(args.layers, adapter.num_layers)
    settings = {
        "max_tokens": args.tokens,
        "window": args.window,
        "skip_bos": args.skip_bos,
        "product_dtype": getattr(torch, args.products),
    }
    progress = not args.no_progress
    start = time.perf_counter()
    if out is None:
        out = statistics_cache_path(model, tokenizer, layers, args.text, **settings)
        cached = out.is_file() and not args.force
        stats = load_or_collect_statistics(
            model,
            tokenizer,
            layers,
            source=args.text,
            batch_size=args.batch_size,
            progress=progress,
            force=args.force,
            path=out,
            **settings,
        )
    else:
        cached = False
        stats = collect_key_statistics(
            model, tokenizer, layers, args.text, batch_size=args.batch_size, progress=progress, **settings
        )
        stats.save(out, model_fingerprint(model, tokenizer, layers), source=stats.source or "")
    seconds = time.perf_counter() - start
    tokens = stats.count(layers[0])
    result: dict[str, Any] = {
        "model": args.model,
        "layers": layers,
        "layers_note": note,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_second": None if cached else round(tokens / max(seconds, 1e-9), 1),
        "source": stats.source,
        "cached": cached,
        "path": str(out),
    }
    rows = [
        ("layers", f"{','.join(map(str, layers))} ({note})"),
        ("tokens", f"{tokens:,}"),
        ("seconds", f"{seconds:.1f}" + (" (read from the cache)" if cached else "")),
        ("tokens/s", "-" if cached else f"{tokens / max(seconds, 1e-9):,.0f}"),
        ("source", str(stats.source)),
        ("output", str(out)),
    ]
    for key, value in rows:
        print(f"{key:<9} {value}")
    return result
