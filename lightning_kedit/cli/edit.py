"""``kedit edit``: compute an edit (MEMIT, ROME or FT) and save it as a small reversible delta.

Prints the edit metrics before and after the edit and the seconds spent in each phase (keys, targets, solve,
apply). The model files are never changed; apply the delta with ``kedit eval --delta`` or ``kedit export``.

Example:
    $ kedit edit --requests ../shared/data/counterfact/counterfact-val.json --n 100 --method memit \\
        --out edit.safetensors
    $ kedit edit --requests facts.json --method rome --layers 5 --v-steps 20 --out rome.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lightning_kedit.cli.hparam_options import add_hparam_arguments, given_hparams
from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "hparams_from_args", "run"]

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit edit``."""
    parser.add_argument("--requests", required=True, metavar="FILE", help="edit requests (any supported layout)")
    parser.add_argument("--n", type=int, default=None, metavar="N", help="use the first N requests")
    parser.add_argument("--method", choices=("memit", "rome", "ft", "lifelong"), default="memit",
                        help="default: memit (lifelong: one gradient per fact and a ridge solve, editing/lifelong.py)")
    parser.add_argument(
        "--layers", default=None, help="edit layers: '4,5,6', '4-8' or 'auto' (by causal tracing); default: per model"
    )
    parser.add_argument("--stats", default=None, metavar="FILE",
                        help="key statistics file (kedit stats --out); default: cached, from the bundled corpus")
    parser.add_argument("--out", required=True, metavar="DELTA", help="where to write the delta (.safetensors)")
    parser.add_argument("--with-base", action="store_true", help="store the base weights for a bit-exact revert")
    parser.add_argument("--lambda-relative", action="store_true", default=None,
                        help="λ multiplies C / mean(diag C) instead of C")
    add_hparam_arguments(parser)
    parser.add_argument("--bf16", dest="v_bfloat16", action=argparse.BooleanOptionalAction, default=None,
                        help="optimise target values through bfloat16 copies of the upper layers first, then finish "
                             "in float32 (default: when the CPU or GPU multiplies bfloat16 natively)")
    parser.add_argument("--no-eval", action="store_true", help="skip the before/after metrics")
    parser.add_argument("--force", action="store_true",
                        help="save the edit even when the damage guard rejects it (the warning is still printed)")
    parser.add_argument("--max-ppl-rise", type=float, default=0.10, metavar="R",
                        help="damage guard: largest relative perplexity rise on its probe (default: 0.10 = +10%%)")
    parser.add_argument("--max-neighborhood-drop", type=float, default=0.10, metavar="D",
                        help="damage guard: largest fall of the neighbourhood probability (default: 0.10)")
    parser.add_argument("--progress", action="store_true", help="print progress to stderr")


def hparams_from_args(model: Any, args: argparse.Namespace, tokenizer: Any = None, requests: Any = None) -> Any:
    """The method's per-model defaults with the options given on the command line applied.

    ``--layers auto`` measures the layers by causal tracing on ``requests`` (needs ``tokenizer``).
    """
    from lightning_kedit.cli.stats import parse_layers
    from lightning_kedit.editing.hparams import EditHyperParams
    from lightning_kedit.models.adapters import ModelAdapter

    layers = None
    if args.layers == "auto":
        from lightning_kedit.editing.edit_inputs import auto_edit_layers

        layers = auto_edit_layers(model, tokenizer, requests, args.method)
    elif args.layers is not None:
        layers = parse_layers(args.layers, ModelAdapter.for_model(model).num_layers)
    hp = EditHyperParams.for_model(model, args.method, layers)
    changes = given_hparams(args)
    changes["lambda_relative"] = args.lambda_relative
    changes["v_bfloat16"] = args.v_bfloat16
    return hp.with_overrides(changes)  # --lambda without --lambda-relative is absolute


def _table(before: dict[str, Any] | None, after: dict[str, Any] | None, seconds: dict[str, float]) -> str:
    lines = []
    if before is not None and after is not None:
        lines += [f"{'metric':<14}{'before':>10}{'after':>10}"]
        for key in ("efficacy", "paraphrase", "neighborhood", "score"):
            if before.get(key) is not None:
                lines.append(f"{key:<14}{before[key]:>10.3f}{after[key]:>10.3f}")
    lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load, compute the edit, guard against damage, report before/after, save the delta.

    Nothing is written on failure, nor when the damage guard rejects the edit (without ``--force``).
    """
    import sys

    from lightning_kedit.editing.damage_guard import DamageGuard, EditRejectedError
    from lightning_kedit.editing.editor import compute_edit
    from lightning_kedit.models.loading import load_model
    from lightning_kedit.requests import load_requests

    start = time.perf_counter()
    if args.n is not None and args.n < 1:
        raise KeditError(f"--n must be >= 1, got {args.n}")
    if not Path(args.requests).is_file():
        raise KeditError(f"--requests {args.requests!r} is not a file; give an edit request file")
    if args.stats is not None and not Path(args.stats).is_file():
        raise KeditError(f"--stats {args.stats!r} is not a file; make one with `kedit stats --out FILE`")
    guard = DamageGuard(max_perplexity_rise=args.max_ppl_rise, max_neighborhood_drop=args.max_neighborhood_drop)
    requests = load_requests(args.requests, args.n)
    if not requests:
        raise KeditError(f"--requests {args.requests!r} holds no edit request")
    model, tokenizer = load_model(args.model)
    hp = hparams_from_args(model, args, tokenizer, requests)
    seconds: dict[str, float] = {"load": time.perf_counter() - start}
    before = after = None
    if not args.no_eval:
        from lightning_kedit.evaluation.request_evaluation import evaluate_requests

        before = evaluate_requests(model, tokenizer, requests)
    delta = compute_edit(model, tokenizer, requests, method=args.method, hparams=hp, statistics=args.stats,
                         progress=args.progress, timings=seconds)
    report = guard.measure(model, tokenizer, delta, requests)
    seconds["guard"] = report.seconds
    if not report.passed:
        if not args.force:
            raise EditRejectedError(report)
        print(f"kedit edit: warning (--force): {report.message}", file=sys.stderr)
    if not args.no_eval:
        tick = time.perf_counter()
        delta.apply(model)
        seconds["apply"] = time.perf_counter() - tick
        try:
            after = evaluate_requests(model, tokenizer, requests)
        finally:
            delta.revert(model)
    path = delta.save(args.out, with_base=args.with_base)
    seconds["total"] = time.perf_counter() - start
    print(f"{args.method} edit of {len(requests)} request(s) at layers {list(hp.layers)} -> {path}")
    print(_table(before, after, seconds))
    if report.passed:
        print(report.message)
    return {
        "method": args.method,
        "n": len(requests),
        "layers": list(hp.layers),
        "hparams": hp.to_dict(),
        "out": str(path),
        "before": before,
        "after": after,
        "guard": report.to_dict(),
        "seconds": seconds,
    }
