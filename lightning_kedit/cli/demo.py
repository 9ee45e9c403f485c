"""``kedit demo``: the README's first command — edit the embedded SmolLM2 with 10 bundled facts, then revert.

Loads the model, gets key statistics of the bundled Wikipedia excerpt (collected once, then cached), writes the
10 bundled CounterFact facts with MEMIT in one batch, and shows for each fact the model's greedy answer and
the new answer's probability before and after, on the edit prompt, a paraphrase and a neighbour prompt; then
the edit metrics and the time of each phase. The model is reverted at the end (bit-exact).

Example:
    $ kedit demo
    $ kedit demo --json demo.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["add_arguments", "greedy_completions", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit demo``."""
    parser.add_argument("--tokens", type=int, default=4, metavar="N", help="tokens of each greedy answer")
    parser.add_argument("--progress", action="store_true", help="print progress to stderr")


@torch.no_grad()
def greedy_completions(model: nn.Module, tokenizer: Any, prompts: Sequence[str], tokens: int = 4) -> list[str]:
    """The greedy continuation of each prompt (``tokens`` tokens, one batch, right-padded).

    Example:
        >>> greedy_completions(model, tokenizer, ["The capital of France is"])  # doctest: +SKIP
        [' Paris, and the']
    """
    device = next(model.parameters()).device
    rows = [list(tokenizer(p)["input_ids"]) for p in prompts]
    lengths = torch.tensor([len(r) for r in rows])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), int(lengths.max()) + tokens), int(pad), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    width = int(lengths.max())
    for _ in range(tokens):
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        logits = model(input_ids=ids[:, :width].to(device), attention_mask=mask.to(device), use_cache=False).logits
        nxt = logits[torch.arange(len(rows)), (lengths - 1).to(device)].argmax(-1).cpu()
        ids[torch.arange(len(rows)), lengths] = nxt
        lengths = lengths + 1
        width = int(lengths.max())
    return [tokenizer.decode(ids[i, len(r) : len(r) + tokens]) for i, r in enumerate(rows)]


def _probes(requests: Sequence[Any]) -> list[tuple[int, str, str, str]]:
    """(request index, kind, prompt, answer whose probability is shown) for each shown prompt."""
    probes = []
    for i, r in enumerate(requests):
        probes.append((i, "edit", r.prompt_text, r.target_new))
        if r.paraphrase_prompts:
            probes.append((i, "paraphrase", r.paraphrase_prompts[0], r.target_new))
        if r.neighborhood:
            probes.append((i, "neighbour", r.neighborhood[0].prompt, r.neighborhood[0].answer))
    return probes


def _look(model: nn.Module, tokenizer: Any, probes: list[tuple[int, str, str, str]], tokens: int) -> list[Any]:
    from lightning_kedit.evaluation.scoring import answer_log_probs

    texts = greedy_completions(model, tokenizer, [p[2] for p in probes], tokens)
    log_probs, _ = answer_log_probs(model, tokenizer, [p[2] for p in probes], [p[3] for p in probes])
    return [(text, float(lp.exp())) for text, lp in zip(texts, log_probs, strict=True)]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Edit, show, measure, revert."""
    from lightning_kedit.editing.editor import compute_edit
    from lightning_kedit.editing.hparams import EditHyperParams
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests
    from lightning_kedit.models.loading import load_model
    from lightning_kedit.requests import bundled_requests
    from lightning_kedit.statistics import load_or_collect_statistics

    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    model, tokenizer = load_model(args.model)
    requests = bundled_requests()
    hp = EditHyperParams.for_model(model, "memit")
    seconds["load"] = time.perf_counter() - tick
    tick = time.perf_counter()
    statistics = load_or_collect_statistics(model, tokenizer, list(hp.layers), progress=args.progress)
    seconds["statistics"] = time.perf_counter() - tick
    probes = _probes(requests)
    before = _look(model, tokenizer, probes, args.tokens)
    metrics_before = evaluate_requests(model, tokenizer, requests)
    delta = compute_edit(model, tokenizer, requests, method="memit", hparams=hp, statistics=statistics,
                         progress=args.progress, timings=seconds)
    tick = time.perf_counter()
    delta.apply(model)
    seconds["apply"] = time.perf_counter() - tick
    try:
        after = _look(model, tokenizer, probes, args.tokens)
        metrics_after = evaluate_requests(model, tokenizer, requests)
    finally:
        report = delta.revert(model)
    rows = []
    print(f"MEMIT: {len(requests)} facts written at once into layers {list(hp.layers)} of {args.model}\n")
    for (i, kind, prompt, answer), (text0, p0), (text1, p1) in zip(probes, before, after, strict=True):
        if kind == "edit":
            r = requests[i]
            print(f"[{r.case_id}] {r.subject}: {r.target_true} -> {r.target_new}")
        print(f"  {kind:<10} {prompt!r}")
        print(f"  {'':<10} before {text0!r:<28} p({answer})={p0:.3f}")
        print(f"  {'':<10} after  {text1!r:<28} p({answer})={p1:.3f}")
        rows.append({"case_id": requests[i].case_id, "kind": kind, "prompt": prompt, "answer": answer,
                     "before": text0, "after": text1, "prob_before": p0, "prob_after": p1})
    print(f"\n{'metric':<14}{'before':>8}{'after':>8}")
    for key in ("efficacy", "paraphrase", "neighborhood", "score"):
        if metrics_before.get(key) is not None:
            print(f"{key:<14}{metrics_before[key]:>8.2f}{metrics_after[key]:>8.2f}")
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    print(f"reverted ({'bit-exact' if getattr(report, 'exact', True) else 'approximately'})")
    return {"model": args.model, "layers": list(hp.layers), "rows": rows, "before": metrics_before,
            "after": metrics_after, "seconds": seconds}
