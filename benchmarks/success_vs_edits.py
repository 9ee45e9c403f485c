"""How often does an edit succeed as the number of edits grows, for MEMIT, sequential ROME and fine-tuning?

Runs ``kedit bench`` (the exact command users run) on SmolLM2 and the CounterFact validation split for the
given methods and numbers of edits, prints the success table with the seed's figures beside ours, the measured
cost per edit, and the projected time of the numbers of edits that were not run (``--project``), computed from
the measured seconds per edited fact and per evaluated fact of each method's largest cell. Results go to
``--out`` (``results.json``, ``results.md``, ``success_vs_edits.png``, and ``projection.json``); the plot is
copied to ``--figure``. Cells already in ``--out`` are kept, so the command can be re-run to add larger N.

Usage:
    python benchmarks/success_vs_edits.py --n 1,10,100 --methods memit,rome-seq,ft --out out/success_vs_edits
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_kedit.cli import main as kedit

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def projection(rows: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    """Projected seconds of each method at each N of ``counts``, linear in the measured per-fact costs.

    Batch methods: ``(edit + eval seconds per fact) · N`` for one cell. Sequential methods: the whole run up to
    ``N`` (``edit seconds per fact · N``) plus one evaluation at ``N``.
    """
    out = []
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "unedited"):
        largest = max((r for r in rows if r["method"] == method), key=lambda r: r["n"])
        edit_rate = largest["edit_seconds"] / largest["n"]
        eval_rate = largest["eval_seconds"] / largest["n"]
        for n in counts:
            out.append({"method": method, "n": n, "from_n": largest["n"], "edit_seconds_per_fact": edit_rate,
                        "eval_seconds_per_fact": eval_rate, "projected_seconds": (edit_rate + eval_rate) * n})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", default=str(DATA / "counterfact" / "counterfact-val.json"))
    parser.add_argument("--methods", default="memit,rome-seq,ft")
    parser.add_argument("--n", default="1,10,100")
    parser.add_argument("--out", default=str(ROOT / "out" / "success_vs_edits"))
    parser.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "success_vs_edits.png"))
    parser.add_argument("--project", default="1000,5000,10000", help="numbers of edits to project the time of")
    parser.add_argument("--ppl-text", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = ["bench", "--model", args.model, "--requests", args.requests, "--methods", args.methods, "--n", args.n,
               "--out", args.out]
    command += ["--ppl-text", args.ppl_text] if args.ppl_text else []
    for item in args.overrides:
        command += ["--set", item]
    print("kedit " + " ".join(command), file=sys.stderr)
    code = kedit(command)
    if code:
        raise SystemExit(code)
    out = Path(args.out)
    rows = json.loads((out / "results.json").read_text())["rows"]
    print("\n| method | N | seconds | edit s / fact | eval s / fact | peak RSS (MB) |\n|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["method"], r["n"])):
        print(f"| {r['method']} | {r['n']} | {r['seconds']:.1f} | {r['edit_seconds'] / r['n']:.2f} | "
              f"{r['eval_seconds'] / r['n']:.2f} | {r['peak_rss_mb']:.0f} |")
    measured = {r["n"] for r in rows}
    wanted = [int(n) for n in args.project.split(",") if n.strip() and int(n) not in measured]
    projected = projection(rows, wanted)
    if projected:
        print("\nProjected (linear in the measured cost per fact of each method's largest cell):")
        for p in projected:
            print(f"  {p['method']:>9} N={p['n']:>6}: {p['projected_seconds'] / 3600:.1f} h "
                  f"(from N={p['from_n']}: {p['edit_seconds_per_fact']:.2f} s/edit, "
                  f"{p['eval_seconds_per_fact']:.2f} s/evaluated fact)")
    (out / "projection.json").write_text(json.dumps(projected, indent=2) + "\n")
    figure = Path(args.figure)
    if figure.resolve() != (out / "success_vs_edits.png").resolve():  # --figure may name the plot in --out
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "success_vs_edits.png", figure)
    print(f"\nwrote {out / 'results.json'}, {out / 'projection.json'}, {figure}", file=sys.stderr)


if __name__ == "__main__":
    main()
