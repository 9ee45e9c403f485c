"""``kedit eval``: edit-quality metrics of a model (optionally with an edit delta applied) on a request file.

Prints a table and returns the dict ``--json`` writes, with exactly the keys ``n, efficacy, paraphrase,
neighborhood, consistency, score, efficacy_prob, paraphrase_prob, neighborhood_prob, perplexity, model,
seconds`` (rates are fractions in [0, 1]; ``consistency`` is null when the requests have no consistency
prompts, ``perplexity`` when no ``--ppl-text`` is given; ``seconds`` is the evaluation time, model loading
excluded). See :mod:`lightning_kedit.evaluation.metrics` for the definitions.

Example:
    $ kedit eval --model smollm2 --requests ../shared/data/counterfact/counterfact-val.json --n 500 \\
        --ppl-text ../shared/data/text/wikitext2_test.txt --json out.json
    $ kedit eval --requests edits.json --delta edit.safetensors      # the edited model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "format_table", "run"]

#: The rows of the printed table: JSON key -> label.
_ROWS = {
    "efficacy": "efficacy",
    "paraphrase": "paraphrase",
    "neighborhood": "neighborhood",
    "consistency": "consistency",
    "score": "score (harmonic mean)",
    "efficacy_prob": "efficacy (probability)",
    "paraphrase_prob": "paraphrase (probability)",
    "neighborhood_prob": "neighborhood (probability)",
    "perplexity": "perplexity",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit eval``."""
    parser.add_argument(
        "--requests", metavar="FILE", default=None,
        help="edit requests (CounterFact, zsRE, MQuAKE, KnowEdit or kedit JSON/JSONL; default: the bundled demo)",
    )
    parser.add_argument("--n", type=int, default=None, metavar="N", help="evaluate only the first N records")
    parser.add_argument("--delta", metavar="FILE", default=None, help="apply this edit delta (kedit edit --out)")
    parser.add_argument("--force", action="store_true", help="apply --delta even if made for other base weights")
    parser.add_argument("--ppl-text", metavar="FILE", default=None, help="a text file to measure perplexity on")
    parser.add_argument(
        "--ppl-tokens", type=int, default=20000, metavar="N", help="tokens of --ppl-text to score (default: 20000)"
    )
    parser.add_argument("--batch-size", type=int, default=32, metavar="B", help="sequences per forward (default: 32)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown off a terminal)")


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad options before the model is loaded."""
    if args.n is not None and args.n < 1:
        raise KeditError(f"--n must be a positive number of records, got {args.n}")
    if args.batch_size < 1:
        raise KeditError(f"--batch-size must be positive, got {args.batch_size}")
    if args.ppl_tokens < 2:
        raise KeditError(f"--ppl-tokens must be at least 2, got {args.ppl_tokens}")
    for option, value in (("--requests", args.requests), ("--ppl-text", args.ppl_text), ("--delta", args.delta)):
        if value is not None and not Path(value).is_file():
            raise KeditError(f"{option} {value!r} is not a file; check the path")


def _load_requests(path: str | None, n: int | None) -> list[Any]:
    from lightning_kedit.requests import bundled_requests, load_requests

    if path is not None:
        return load_requests(path, n)
    requests = bundled_requests()
    if n is not None and n > len(requests):
        raise KeditError(f"--n {n} exceeds the {len(requests)} bundled requests; pass --n <= {len(requests)}")
    return requests[:n]


def _apply_delta(model: Any, path: str, force: bool) -> None:
    try:
        from lightning_kedit.editing import EditDelta
    except ImportError as err:
        raise KeditError(
            f"--delta needs lightning_kedit.editing, which is not available in this installation ({err}); "
            "evaluate without --delta"
        ) from err
    EditDelta.load(path).apply(model, force=force)


def format_table(result: dict[str, Any]) -> str:
    """The metrics as a two-column text table (``-`` where a metric does not apply).

    Example:
        >>> print(format_table({"n": 2, "efficacy": 0.5, "perplexity": None}))
        requests                          2
        efficacy                     0.5000
        perplexity                        -
    """
    width = max(len(label) for label in _ROWS.values())
    lines = [f"{'requests':<{width}} {result['n']:>8}"]
    for key, label in _ROWS.items():
        if key not in result:
            continue
        value = result[key]
        text = "-" if value is None else f"{value:.2f}" if key == "perplexity" else f"{value:.4f}"
        lines.append(f"{label:<{width}} {text:>8}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model and requests, apply ``--delta`` if given, evaluate, print the table, return the dict."""
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests
    from lightning_kedit.models import load_model

    _check_arguments(args)
    requests = _load_requests(args.requests, args.n)
    model, tokenizer = load_model(args.model)
    if args.delta is not None:
        _apply_delta(model, args.delta, args.force)
    progress = sys.stderr.isatty() and not args.no_progress
    start = time.perf_counter()
    result = evaluate_requests(
        model, tokenizer, requests, batch_size=args.batch_size, ppl_text=args.ppl_text,
        ppl_tokens=args.ppl_tokens, progress=progress,
    )
    result["model"] = str(args.model)
    result["seconds"] = round(time.perf_counter() - start, 3)
    print(format_table(result))
    print(f"{len(requests)} requests evaluated in {result['seconds']:.1f} s")
    return result
