"""How fast is ``kedit eval`` compared with a plain forward over the same tokens, and what does it measure?

Runs the edit metrics of ``kedit eval`` on SmolLM2 (unedited) over CounterFact requests and reports their
figures, then times the scoring that ``kedit eval`` does against plain forwards
(``model(input_ids, attention_mask)``, full logits, nothing read back) over

- the same sequences in the same batches (the tokens ``kedit eval`` feeds the model: pairs that share a
  prompt share one sequence), and
- one sequence per (prompt, answer) pair (what a scorer without prompt sharing would feed).

``ratio`` = time of the plain forward / time of the scoring (= scoring throughput / plain-forward throughput
over the same tokens; the target is at least 0.8). Timings are medians of ``--repeats`` interleaved runs.

Usage:
    python benchmarks/eval_throughput.py --n 500 --timing-n 100 --repeats 3 --json eval_throughput.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.evaluation.request_evaluation import evaluate_requests, score_requests
from lightning_kedit.evaluation.scoring import _batches, _plan_sequences, encode_pairs
from lightning_kedit.models import load_model
from lightning_kedit.requests import load_requests
from lightning_kedit.token_batches import padded_batch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def pairs_of(requests: list[Any]) -> tuple[list[str], list[str]]:
    """The (prompt, answer) pairs ``score_requests`` scores, in its order."""
    prompts, answers = [], []
    for r in requests:
        items = [(r.prompt_text, r.target_new)]
        items += [(r.prompt_text, r.target_true)] if r.target_true is not None else []
        items += [(p, r.target_new) for p in r.paraphrase_prompts]
        items += [(p, r.target_true) for p in r.paraphrase_prompts if r.target_true is not None]
        items += [(n.prompt, n.answer) for n in r.neighborhood] + [(n.prompt, r.target_new) for n in r.neighborhood]
        items += [(c.prompt, c.answer) for c in r.consistency]
        for prompt, answer in items:
            prompts.append(prompt)
            answers.append(answer)
    return prompts, answers


@torch.inference_mode()
def plain_forward(model: torch.nn.Module, sequences: list[tuple[int, ...]], batch_size: int, pad_id: int) -> float:
    """Seconds for plain batched forwards over ``sequences`` (sorted by length, right-padded)."""
    start = time.perf_counter()
    for batch in _batches([len(s) for s in sequences], batch_size):
        ids, mask = padded_batch([sequences[i] for i in batch], pad_id)
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return time.perf_counter() - start


def timing(model: torch.nn.Module, tokenizer: Any, timed: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved runs of the scoring and of plain forwards over the same sequences; the table of medians."""
    prompts, answers = pairs_of(timed)
    pairs = encode_pairs(tokenizer, prompts, answers)
    shared, _ = _plan_sequences(pairs)
    unshared = [tuple(ids) for ids, _ in pairs]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scoring, plain = "kedit eval scoring", "plain forward, same sequences"
    per_pair = "plain forward, one sequence per pair"
    times: dict[str, list[float]] = {scoring: [], plain: []}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        score_requests(model, tokenizer, timed, batch_size=args.batch_size)
        times[scoring].append(time.perf_counter() - start)
        times[plain].append(plain_forward(model, shared, args.batch_size, pad_id))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
              flush=True)
    if args.unshared:
        times[per_pair] = [plain_forward(model, unshared, args.batch_size, pad_id)]
    tokens = {scoring: sum(map(len, shared)), plain: sum(map(len, shared)), per_pair: sum(map(len, unshared))}
    reference = statistics.median(times[scoring])
    rows = []
    for name, values in times.items():
        median = statistics.median(values)
        rows.append({"run": name, "runs": len(values), "tokens": tokens[name], "median_s": round(median, 3),
                     "tokens_per_s": round(tokens[name] / median, 1), "ratio": round(median / reference, 3)})
    print(f"\n{len(timed)} requests, {len(pairs)} pairs, {len(shared)} sequences, "
          f"{torch.get_num_threads()} threads")
    print("| run | runs | tokens | median s | tokens/s | its time / scoring time |\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['runs']} | {row['tokens']} | {row['median_s']} | {row['tokens_per_s']} | "
              f"{row['ratio']} |")
    return {"timing_n": len(timed), "pairs": len(pairs), "sequences": len(shared), "rows": rows,
            "runs": {k: [round(v, 3) for v in vs] for k, vs in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", default=str(DATA / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--ppl-text", default=str(DATA / "text" / "wikitext2_test.txt"))
    parser.add_argument("--ppl-tokens", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timing-n", type=int, default=None, help="requests in the timing runs (default: --n)")
    parser.add_argument("--skip-figures", action="store_true", help="only the timing runs")
    parser.add_argument("--skip-timing", action="store_true", help="only the figures")
    parser.add_argument("--unshared", action="store_true",
                        help="also time (once) a plain forward over one sequence per pair (slow)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2")
    requests = load_requests(args.requests, args.n)
    report: dict[str, Any] = {"model": "smollm2", "requests": args.requests, "n": args.n,
                              "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    if not args.skip_figures:
        start = time.perf_counter()
        figures = evaluate_requests(model, tokenizer, requests, batch_size=args.batch_size, ppl_text=args.ppl_text,
                                    ppl_tokens=args.ppl_tokens)
        report["figures"] = figures
        report["eval_seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(figures, indent=1), f"\nkedit eval metrics in {report['eval_seconds']} s", flush=True)

    if not args.skip_timing:
        report.update(timing(model, tokenizer, requests[: args.timing_n or args.n], args))
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(f"peak RSS {report['peak_rss_mib']} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
