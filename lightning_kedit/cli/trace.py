"""``kedit trace``: causal tracing heatmaps for one prompt, or averaged curves over a request file.

Example:
    $ kedit trace --prompt "The Eiffel Tower is located in" --subject "Eiffel Tower" --out trace/
    $ kedit trace --requests ../shared/data/counterfact/counterfact-val.json --n 200 --out trace/ --json t.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kedit trace`` (``--model`` and ``--json`` are added by the command)."""
    one = parser.add_argument_group("one prompt")
    one.add_argument("--prompt", help="the text before the answer, holding the subject")
    one.add_argument("--subject", help="the part of the prompt to corrupt, as written there")
    one.add_argument("--answer", default=None, help="the expected continuation (default: the model's own)")
    many = parser.add_argument_group("averaged over facts")
    many.add_argument("--requests", metavar="FILE", help="a request file (CounterFact, zsRE, ... layouts)")
    many.add_argument("--n", type=int, default=200, help="how many facts to average over (default 200)")
    many.add_argument(
        "--include-unknown", action="store_true", help="also trace facts whose true answer the model does not predict"
    )
    many.add_argument(
        "--layers-window", type=int, default=5, help="size of the automatic edit-layer window reported (default 5)"
    )
    parser.add_argument("--kind", default="hidden,mlp,attn", help="comma-separated kinds (default hidden,mlp,attn)")
    parser.add_argument("--samples", type=int, default=10, help="noise draws per cell (default 10)")
    parser.add_argument("--noise", type=float, default=None, help="noise std (default 3x the embeddings' std)")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default: automatic)")
    parser.add_argument("--out", metavar="DIR", default=None, help="write the figures (PNG and SVG) here")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Trace one prompt (``--prompt/--subject``) or average over facts (``--requests``)."""
    single = args.prompt is not None or args.subject is not None
    if single == (args.requests is not None):
        raise KeditError("give either --prompt and --subject (one trace) or --requests FILE (the average)")
    if single and (args.prompt is None or args.subject is None):
        raise KeditError("--prompt and --subject go together; give both")
    kinds = tuple(kind.strip() for kind in args.kind.split(",") if kind.strip())

    from lightning_kedit.models import load_model

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    settings: dict[str, Any] = dict(
        kinds=kinds,
        noise=args.noise,
        samples=args.samples,
        seed=args.seed,
        window=args.window,
        batch_size=args.batch_size,
    )
    trace = _trace_one if single else _trace_many
    result = trace(model, tokenizer, args, settings)
    result["model"] = args.model
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _trace_one(model: Any, tokenizer: Any, args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    from lightning_kedit.tracing import causal_trace

    trace = causal_trace(model, tokenizer, args.prompt, args.subject, args.answer, **settings)
    print(f"answer {trace.answer!r}: p(clean) = {trace.clean_prob:.4f}, p(corrupted) = {trace.corrupted_prob:.4f}")
    subject = trace.last_subject_token
    for kind, effects in trace.effects.items():
        token, layer = divmod(int(effects.nan_to_num(float("-inf")).argmax()), effects.shape[1])
        best = int(effects[subject].argmax())
        print(
            f"{kind:<6}  largest effect {float(effects[token, layer]):+.4f} at token {token} "
            f"({trace.tokens[token]!r}), layer {layer}; at the last subject token: layer {best}"
        )
    result = trace.to_dict()
    if args.out:
        from lightning_kedit.tracing.plots import save_trace_figures

        result["figures"] = [str(p) for p in save_trace_figures(trace, Path(args.out))]
        print(f"figures in {args.out}")
    return result


def _trace_many(model: Any, tokenizer: Any, args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    from lightning_kedit.requests import load_requests
    from lightning_kedit.tracing import average_trace, select_edit_window

    if args.n < 1:
        raise KeditError(f"--n={args.n} must be a positive number of facts")
    requests = load_requests(args.requests, skip_invalid=True)
    traced = average_trace(
        model, tokenizer, requests, args.n, known_only=not args.include_unknown, progress=True, **settings
    )
    if traced.n == 0:
        raise KeditError(
            f"the model predicts none of the {traced.scanned} facts in {args.requests}; "
            "add --include-unknown to trace them anyway"
        )
    result = traced.to_dict()
    result["requests"] = str(args.requests)
    print(f"{traced.n} facts traced ({traced.scanned} scanned); mean indirect effect at the last subject token:")
    print("layer  " + "  ".join(f"{kind:>7}" for kind in traced.kinds))
    for layer in range(len(result["last_subject"][traced.kinds[0]])):
        print(f"{layer:>5}  " + "  ".join(f"{result['last_subject'][k][layer]:+.4f}" for k in traced.kinds))
    if "mlp" in traced.kinds:
        window = min(max(1, args.layers_window), len(result["last_subject"]["mlp"]))
        result["auto_layers"] = select_edit_window(traced.last_subject["mlp"], window)
        print(f"edit layers chosen from the MLP curve (window {window}): {result['auto_layers']}")
    if args.out:
        from lightning_kedit.tracing.plots import save_average_figure

        result["figures"] = [str(p) for p in save_average_figure(traced, Path(args.out))]
        print(f"figures in {args.out}")
    return result
