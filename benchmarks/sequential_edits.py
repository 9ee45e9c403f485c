"""Sequential CounterFact edits on SmolLM2: efficacy, paraphrase, neighbourhood, score and perplexity per batch.

Question: when facts are written in batches one after another, each on the model the previous ones left, how do
sequential MEMIT, ROME and AlphaEdit hold up as edits accumulate?

For each method the script writes ``--n`` requests in batches of ``--batch-size`` with
:func:`lightning_kedit.editing.edit_sequentially`; after every batch the callback evaluates all requests
written so far (:func:`lightning_kedit.evaluation.request_evaluation.evaluate_requests`) and the perplexity of the first
``--ppl-tokens`` tokens of ``--ppl-text``. The unedited model is evaluated on the same request prefixes. At the
end the whole sequence is reverted with ``history.revert(model, len(history))`` and the weights are checked
bit-exact. Each method's row also holds ``first_batch_efficacy`` (retention: the efficacy of the first batch's
facts on the model as it is now) and the setup its summed edit seconds (``<method>_edit_seconds``, evaluation
excluded), and ``peak_rss_gb`` the process's peak resident memory. Rows go to a JSON file after every batch
(a killed run keeps what it measured), a table to stdout, and a PNG of the curves when matplotlib is installed.

Long sequences: ``--eval-sample S`` evaluates, at each checkpoint, a fixed sample of at most ``S`` of the facts
written so far (the first of one seeded permutation of all ``--n``), the unedited rows on the same samples.
``--field-metrics`` adds zsRE as the lifelong-editing literature measures it
(:func:`lightning_kedit.evaluation.field_metrics.field_scores`: token accuracy of the new answer on the edit and
paraphrase prompts, locality as agreement with the unedited model's tokens). ``--history-dir D`` saves each
method's :class:`~lightning_kedit.editing.history.EditHistory` to ``D/<method>`` after every batch; a run
started again with the same arguments resumes from there: it keeps the rows of ``--out``, re-applies the saved
batches (checked bit-exact against the history) and writes only the rest.

Run (the numbers of docs/benchmarks/sequential.md):
    python benchmarks/sequential_edits.py --methods alphaedit,memit --n 300 --batch-size 100 --v-steps 10 \\
        --out benchmarks/results/sequential_edits.json
    python benchmarks/sequential_edits.py --methods lifelong --n 10000 --batch-size 100 \\
        --eval-at 100,1000,3000,10000 --eval-sample 1000 --history-dir /tmp/kedit-seq \\
        --out benchmarks/results/sequential_lifelong_10k.json
    python benchmarks/sequential_edits.py --methods lifelong --n 1000 --batch-size 100 --eval-at 100,1000 \\
        --requests ../shared/data/zsre/zsre_mend_train-1k.json --field-metrics --out benchmarks/results/zsre.json
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.editing import EditHyperParams
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.sequential import SequentialStep, edit_sequentially
from lightning_kedit.evaluation.field_metrics import field_scores, locality_tokens
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.loading import load_model
from lightning_kedit.requests import load_requests

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COLUMNS = ("method", "edits", "efficacy", "paraphrase", "neighborhood", "score", "perplexity", "batch_s", "eval_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="alphaedit,memit",
                        help="comma-separated: alphaedit, memit, rome, ft, lifelong")
    parser.add_argument("--n", type=int, default=300, help="requests written in all")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--v-steps", type=int, default=None, help="Adam steps of the target optimisation")
    parser.add_argument("--prefixes", type=int, default=None, help="context prefixes of 10 tokens (default 5)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="AlphaEdit's null-space threshold (a share of the keys' energy under --rule energy)")
    parser.add_argument("--rule", choices=("energy", "eigenvalue"), default=None, help="how --threshold is read")
    parser.add_argument("--preserve-weight", type=float, default=None,
                        help="λ₀ of the λ₀ C term: AlphaEdit's inside the null space (0: the paper's solve), "
                             "the lifelong method's eq. (2)")
    parser.add_argument("--label", default=None,
                        help="name the rows of a single method so (default: the method), e.g. for a sweep")
    parser.add_argument("--rounds", type=int, default=None, help="the lifelong method's closed-form rounds per batch")
    parser.add_argument("--solve", choices=("batch", "cumulative"), default=None,
                        help="the lifelong method's solve: each batch alone, or the total over every batch")
    parser.add_argument("--alpha", type=float, default=None, help="AlphaEdit's relative weight of |Δ|²")
    parser.add_argument("--requests", default=str(DATA / "counterfact" / "counterfact-train.json"))
    parser.add_argument("--ppl-text", default=str(DATA / "text" / "wikitext2_test.txt"))
    parser.add_argument("--ppl-tokens", type=int, default=5000)
    parser.add_argument("--no-unedited", action="store_true", help="skip the unedited rows (another run has them)")
    parser.add_argument("--eval-at", default=None,
                        help="comma-separated numbers of edits after which to evaluate (default: after every batch; "
                             "the last batch is always evaluated)")
    parser.add_argument("--eval-sample", type=int, default=None,
                        help="evaluate a fixed sample of at most this many of the facts written so far")
    parser.add_argument("--field-metrics", action="store_true",
                        help="add the field's token accuracy and locality (zsRE as lifelong papers measure it)")
    parser.add_argument("--history-dir", default=None,
                        help="save each method's edit history there after every batch; a rerun resumes from it")
    parser.add_argument("--out", default="benchmarks/results/sequential_edits.json")
    parser.add_argument("--merge", default=None, metavar="A.json,B.json",
                        help="run nothing: merge the rows of earlier runs into --out and plot them together")
    return parser.parse_args(argv)


class Evaluator:
    """The measures at a checkpoint: on the whole prefix written so far, or on a fixed sample of it."""

    def __init__(self, model: Any, tokenizer: Any, requests: list, args: argparse.Namespace,
                 checkpoints: list[int]) -> None:
        self.tokenizer, self.requests, self.args = tokenizer, requests, args
        order = list(range(len(requests)))
        random.Random(0).shuffle(order)
        self.order = order
        self.reference: dict[int, list] = {}
        if args.field_metrics:  # the unedited model's locality tokens of every fact a checkpoint may sample
            wanted = sorted({i for edits in checkpoints for i in self.sample(edits)})
            for i in wanted:
                self.reference[i] = locality_tokens(model, tokenizer, [requests[i]])

    def sample(self, edits: int) -> list[int]:
        """Indices of the facts evaluated after ``edits`` edits (the same draw for every method)."""
        if not self.args.eval_sample or edits <= self.args.eval_sample:
            return list(range(edits))
        return sorted([i for i in self.order if i < edits][: self.args.eval_sample])

    def __call__(self, model: Any, edits: int, *, ppl: bool = True) -> tuple[dict[str, Any], float]:
        start = time.perf_counter()
        chosen = self.sample(edits)
        requests = [self.requests[i] for i in chosen]
        metrics = evaluate_requests(model, self.tokenizer, requests, ppl_text=self.args.ppl_text if ppl else None,
                                    ppl_tokens=self.args.ppl_tokens)
        metrics["evaluated"] = len(requests)
        if self.args.field_metrics:
            reference = [t for i in chosen for t in self.reference[i]]
            metrics.update(field_scores(model, self.tokenizer, requests, reference))
        return metrics, time.perf_counter() - start


_FIELD = ("efficacy_tokens", "generalization_tokens", "locality_tokens")


def row(method: str, edits: int, metrics: dict[str, Any], batch_s: float, eval_s: float) -> dict[str, Any]:
    keep = ("efficacy", "paraphrase", "neighborhood", "score", "perplexity", "efficacy_prob", "neighborhood_prob",
            "evaluated", *(k for k in _FIELD if k in metrics))
    return {"method": method, "edits": edits, **{k: metrics[k] for k in keep},
            "batch_s": round(batch_s, 1), "eval_s": round(eval_s, 1)}


def print_row(entry: dict[str, Any]) -> None:
    cells = [f"{entry[c]:.3f}" if isinstance(entry[c], float) and c not in ("batch_s", "eval_s", "perplexity")
             else f"{entry[c]:.2f}" if isinstance(entry[c], float) else str(entry[c]) for c in COLUMNS]
    print(" | ".join(cells), flush=True)


_RELATIVE_TO_UNEDITED = ("neighborhood", "perplexity")  # the criteria read against the unedited model


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)", file=sys.stderr)
        return
    names = ("efficacy", "paraphrase", "neighborhood", "score", "perplexity")
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2))
    counts = [r["edits"] for r in rows]
    log_axis = max(counts) >= 20 * min(counts)  # 100 to 10,000 edits: a log axis keeps the early points apart
    for axis, name in zip(axes, names, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["edits"], r[name]) for r in rows if r["method"] == method]
            if method == "unedited" and name not in _RELATIVE_TO_UNEDITED:
                continue  # far below the edited curves: it would flatten them
            if method == "unedited" and len(points) == 1:  # one reference value: a line across the plot
                if points[0][1] is not None:
                    axis.axhline(points[0][1], color="grey", linestyle="--", label=f"unedited ({points[0][0]} facts)")
            else:
                style = {"color": "grey", "linestyle": "--"} if method == "unedited" else {"marker": "o"}
                axis.plot(*zip(*points, strict=True), label=method, **style)
        axis.set_title(name)
        axis.set_xlabel("edits")
        if log_axis:
            axis.set_xscale("log")
    legend: dict[str, Any] = {}  # one legend under the panels: per-panel ones hide the curves
    for axis in axes:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    columns = min(len(legend), 4) or 1
    rows_of_legend = -(-len(legend) // columns)
    fig.set_size_inches(4 * len(names), 3.2 + 0.25 * rows_of_legend)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=columns, fontsize="small")
    fig.tight_layout(rect=(0, 0.08 * rows_of_legend, 1, 1))
    fig.savefig(path, dpi=100)


def merge(paths: list[str], out: Path) -> None:
    """One JSON and one plot from several runs (e.g. one method per run, measured one after another)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    # A method measured in more than one run (e.g. under two settings) is named by its file in each.
    owners: dict[str, set[str]] = {}
    for path, run in zip(paths, runs, strict=True):
        for entry in run["rows"]:
            owners.setdefault(entry["method"], set()).add(path)
    rows = [{**entry, "method": f"{entry['method']} ({Path(path).stem})"} if len(owners[entry["method"]]) > 1
            and entry["method"] != "unedited" else entry for path, run in zip(paths, runs, strict=True)
            for entry in run["rows"]]
    out.write_text(json.dumps({"runs": [{"file": Path(p).name, "setup": r["setup"]} for p, r in zip(paths, runs,
                                                                                                  strict=True)],
                               "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"{len(rows)} rows of {len(runs)} runs -> {out} and {out.with_suffix('.png')}")


def resume(model: Any, folder: Path | None) -> EditHistory | None:
    """The history saved in ``folder``, re-applied to ``model`` batch by batch (None when there is none)."""
    if folder is None or not (folder / "history.json").is_file():
        return None
    history = EditHistory.load(folder)
    for entry in history:
        entry.delta.apply(model)
    print(f"resumed {len(history)} batches ({history.num_edits} edits) from {folder}", flush=True)
    return history


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge([p for p in args.merge.split(",") if p], out)
        return
    if args.label and "," in args.methods.strip(","):
        raise SystemExit(f"--label names the rows of one method; got --methods {args.methods}")
    model, tokenizer = load_model("smollm2")
    requests = load_requests(args.requests, n=args.n)
    setup = {k: v for k, v in vars(args).items() if k != "out"}
    rows: list[dict[str, Any]] = []
    if args.history_dir and out.is_file():  # a resumed run keeps what the earlier one measured
        earlier = json.loads(out.read_text())
        changed = {k: (v, setup.get(k)) for k, v in earlier["setup"].items() if k in setup and setup[k] != v}
        if changed:
            raise SystemExit(f"{out} was measured with other arguments {changed}; rerun with those or another --out")
        rows, setup = earlier["rows"], {**earlier["setup"], **setup}

    def save() -> None:
        out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))

    def measured(method: str, edits: int) -> bool:
        return any(r["method"] == method and r["edits"] == edits for r in rows)

    checkpoints = list(range(args.batch_size, args.n + 1, args.batch_size))
    if args.eval_at:
        wanted = {int(x) for x in args.eval_at.split(",") if x}
        checkpoints = [c for c in checkpoints if c in wanted or c == checkpoints[-1]]
    evaluate = Evaluator(model, tokenizer, requests, args, checkpoints)
    print(" | ".join(COLUMNS))
    unedited_ppl = next((r["perplexity"] for r in rows if r["method"] == "unedited"), None)
    for edits in checkpoints if not args.no_unedited else ():
        if measured("unedited", edits):
            continue
        metrics, eval_s = evaluate(model, edits, ppl=unedited_ppl is None)
        unedited_ppl = metrics["perplexity"] = metrics["perplexity"] or unedited_ppl  # the same for every count
        rows.append(row("unedited", edits, metrics, 0.0, eval_s))
        print_row(rows[-1])
        save()
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        hp = EditHyperParams.for_model(model, method)
        hp = hp.replace(v_steps=args.v_steps) if args.v_steps is not None else hp
        if method == "alphaedit":
            options = {"nullspace_rule": args.rule, "preserve_weight": args.preserve_weight}
            hp = hp.replace(extra={**hp.extra, **{k: v for k, v in options.items() if v is not None}})
        if method == "lifelong":
            options = {"preserve_weight": args.preserve_weight, "rounds": args.rounds, "solve": args.solve}
            hp = hp.replace(extra={**hp.extra, **{k: v for k, v in options.items() if v is not None}})
        if args.prefixes is not None:
            hp = hp.replace(prefix_lengths=((10, args.prefixes),))
        adapter = ModelAdapter.for_model(model)
        before = {layer: adapter.weight(layer).detach().clone() for layer in range(adapter.num_layers)}
        folder = Path(args.history_dir) / method if args.history_dir else None
        history = resume(model, folder)
        done = history.num_edits if history is not None else 0
        if history is None:
            setup[f"{method}_edit_seconds"] = 0.0

        def on_batch(step: SequentialStep, method: str = method) -> None:
            setup[f"{method}_edit_seconds"] = round(setup[f"{method}_edit_seconds"] + step.seconds, 1)
            if step.edits not in checkpoints or measured(args.label or method, step.edits):
                print(f"{method}: {step.edits} edits written ({step.seconds:.0f} s)", flush=True)
                save()
                return
            metrics, eval_s = evaluate(model, step.edits)
            rows.append(row(args.label or method, step.edits, metrics, step.seconds, eval_s))
            first = evaluate_requests(model, tokenizer, requests[: args.batch_size])
            rows[-1]["first_batch_efficacy"] = first["efficacy"]
            print_row(rows[-1])
            save()

        if done < len(requests):
            history = edit_sequentially(model, tokenizer, requests[done:], method=method,
                                        batch_size=args.batch_size, hparams=hp, history=history,
                                        threshold=args.threshold, alpha=args.alpha, callback=on_batch,
                                        save_dir=folder)
        assert history is not None
        batches = len(history)
        history.revert(model, batches)
        exact = all(torch.equal(adapter.weight(layer), w) for layer, w in before.items())
        print(f"{method}: reverted all {batches} batches, weights bit-exact: {exact}", flush=True)
        setup[f"{method}_revert_exact"] = exact
        # Peak resident memory of this process so far (Linux reports KiB), the model and evaluation included.
        setup["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        save()
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
