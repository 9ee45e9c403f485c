"""The files of ``kedit bench``: ``results.json`` (kept between runs), ``results.md`` and ``success_vs_edits.png``.

``results.json`` is the contract ``{"model", "requests", "rows": [{"method", "n", "efficacy", "paraphrase",
"neighborhood", "score", "perplexity", "seconds", ...}]}``; it also records the model's fingerprint and the
benchmark's settings, so that a run pointed at a folder holding another model's (or other requests', or other
settings') results stops with an error instead of mixing or overwriting them. Every write is atomic (a
temporary file renamed into place): an interrupted run leaves the last complete file.

The seed's figures (the success rates of sequential ROME, batch MEMIT and fine-tuning on GPT-J and CounterFact
that motivated this benchmark) are printed beside ours in ``results.md`` and drawn dashed in the plot.

Example:
    >>> results = BenchResults("/tmp/kedit-bench-doc", model="smollm2", requests="cf.json", fingerprint="f")
    >>> results.rows.append({"method": "memit", "n": 10, "efficacy": 0.9, "paraphrase": 0.5,
    ...                      "neighborhood": 0.8, "score": 0.66, "perplexity": None, "seconds": 3.0})
    >>> "| memit | – (90) | 90 (89) |" in success_table(results)  # ours (the seed's)
    True
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_path, atomic_write_text

__all__ = [
    "PLOT_FILE",
    "RESULTS_FILE",
    "ROW_KEYS",
    "SEED_SUCCESS",
    "TABLE_FILE",
    "BenchError",
    "BenchResults",
    "ProgressPrinter",
    "metrics_table",
    "plot_success",
    "success_table",
    "write_report",
]

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "success_vs_edits.png"

#: The keys every row of ``results.json`` holds (the ``kedit bench`` contract; rows may hold more).
ROW_KEYS = ("method", "n", "efficacy", "paraphrase", "neighborhood", "score", "perplexity", "seconds")

#: The seed's success rates by number of edits (GPT-J, CounterFact), the figures this benchmark reproduces.
SEED_SUCCESS: dict[str, dict[int, float]] = {
    "rome-seq": {1: 0.92, 10: 0.88, 100: 0.72, 1000: 0.45, 5000: 0.25, 10000: 0.15},
    "memit": {1: 0.90, 10: 0.89, 100: 0.86, 1000: 0.80, 5000: 0.72, 10000: 0.65},
    "ft": {1: 0.85, 10: 0.82, 100: 0.75, 1000: 0.65, 5000: 0.50, 10000: 0.35},
}


class BenchError(KeditError):
    """A benchmark that cannot run as asked (unknown method, too few requests, a folder of other results)."""


class BenchResults:
    """The rows of one benchmark folder and what they were measured on.

    Args:
        folder: the output folder (``results.json`` lives there).
        model: the model spec, as the user gave it.
        requests: the request file, as the user gave it.
        fingerprint: a digest of the model's identity (:func:`~lightning_kedit.models.fingerprint.model_fingerprint`).
        settings: what else decides the numbers (hyper-parameters per method, perplexity text, batch size).
        rows: the finished cells.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        model: str,
        requests: str,
        fingerprint: str,
        settings: Mapping[str, Any] | None = None,
        rows: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.folder = Path(folder)
        self.model = str(model)
        self.requests = str(requests)
        self.fingerprint = str(fingerprint)
        self.settings: dict[str, Any] = json.loads(json.dumps(dict(settings or {})))
        self.rows: list[dict[str, Any]] = [dict(row) for row in rows]

    @property
    def path(self) -> Path:
        """``folder/results.json``."""
        return self.folder / RESULTS_FILE

    @classmethod
    def open(
        cls,
        folder: str | os.PathLike[str],
        *,
        model: str,
        requests: str,
        fingerprint: str,
        settings: Mapping[str, Any],
    ) -> BenchResults:
        """The results in ``folder`` to continue, or new empty ones; nothing is written.

        Raises:
            BenchError: ``folder`` is a file, or holds a ``results.json`` that is not a benchmark's, or one
                measured on another model or with other settings.
        """
        path = Path(folder) / RESULTS_FILE
        if Path(folder).exists() and not Path(folder).is_dir():
            raise BenchError(f"--out {folder} is a file; give a folder for the benchmark's results")
        fresh = cls(folder, model=model, requests=requests, fingerprint=fingerprint, settings=settings)
        if not path.exists():
            return fresh
        try:
            data = json.loads(path.read_text())
            rows = data["rows"]
            if not isinstance(rows, list) or not all(isinstance(r, dict) and {"method", "n"} <= set(r) for r in rows):
                raise TypeError("rows")
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise BenchError(
                f"{path} exists but is not a kedit bench results file ({type(err).__name__}); choose another --out "
                "folder, nothing was overwritten"
            ) from err
        if data.get("fingerprint") != fingerprint:
            raise BenchError(
                f"{path} holds results of another model ({data.get('model')!r}, fingerprint "
                f"{data.get('fingerprint')}, not {fingerprint}); choose another --out folder, nothing was overwritten"
            )
        differences = _setting_differences(data.get("settings") or {}, fresh.settings)
        if differences:
            raise BenchError(
                f"{path} holds results measured with other settings ({'; '.join(differences[:3])}); use the same "
                "settings to resume, or choose another --out folder (nothing was overwritten)"
            )
        merged = dict(data.get("settings") or {})
        merged["hparams"] = {**merged.get("hparams", {}), **fresh.settings.get("hparams", {})}
        merged.update({k: v for k, v in fresh.settings.items() if k != "hparams"})
        return cls(folder, model=model, requests=requests, fingerprint=fingerprint, settings=merged, rows=rows)

    def check_requests(self, digest_of: Callable[[int], str | None]) -> None:
        """Refuse rows measured on other requests (``digest_of(n)``: the digest of our first ``n`` requests)."""
        for row in self.rows:
            stored = row.get("requests_digest")
            if stored is not None and digest_of(int(row["n"])) != stored:
                raise BenchError(
                    f"{self.path} holds results for other requests (row {row['method']} N={row['n']}, request file "
                    f"{self.requests!r}); choose another --out folder, nothing was overwritten"
                )

    def row(self, method: str, n: int) -> dict[str, Any] | None:
        """The finished row of ``(method, n)``, or None."""
        return next((r for r in self.rows if r["method"] == method and int(r["n"]) == n), None)

    def methods(self) -> list[str]:
        """The methods that have rows, in first-seen order."""
        return list(dict.fromkeys(r["method"] for r in self.rows))

    def add(self, row: Mapping[str, Any]) -> None:
        """Add (or replace) the row of ``(row["method"], row["n"])`` and save ``results.json``."""
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"a results row needs the keys {list(ROW_KEYS)}; {missing} are missing")
        self.rows = [r for r in self.rows if (r["method"], int(r["n"])) != (row["method"], int(row["n"]))]
        self.rows.append(dict(row))
        self.save()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``results.json``."""
        return {"model": self.model, "requests": self.requests, "rows": self.rows, "fingerprint": self.fingerprint,
                "settings": self.settings}

    def save(self) -> Path:
        """Write ``results.json`` atomically."""
        atomic_write_text(self.path, json.dumps(self.to_dict(), indent=2) + "\n")
        return self.path


class ProgressPrinter:
    """Cell-by-cell lines on stderr, with the time left estimated from the seconds per edit measured so far.

    Args:
        cells: the cells to run, as ``(method, n, facts the cell edits)``.
        enabled: print (False: only keep the rates).
    """

    def __init__(self, cells: list[tuple[str, int, int]], enabled: bool) -> None:
        self.cells = cells  # (method, n, facts edited by this cell)
        self.enabled = enabled
        self.done = 0
        self.edit_rate: dict[str, float] = {}
        self.eval_rate: float | None = None

    def start(self, method: str, n: int) -> None:
        if self.enabled:
            print(f"[bench {self.done + 1}/{len(self.cells)}] {method} N={n} ...", file=sys.stderr, flush=True)

    def finish(self, row: Mapping[str, Any], edits: int) -> None:
        self.done += 1
        if edits:
            self.edit_rate[row["method"]] = row["edit_seconds"] / edits
        self.eval_rate = row["eval_seconds"] / row["n"]
        if not self.enabled:
            return
        metrics = " ".join(
            f"{key} {row[key]:.3f}" for key in ("efficacy", "paraphrase", "neighborhood", "score")
            if row.get(key) is not None
        )
        ppl = f" ppl {row['perplexity']:.2f}" if row.get("perplexity") is not None else ""
        print(
            f"[bench {self.done}/{len(self.cells)}] {row['method']} N={row['n']}: {metrics}{ppl} "
            f"({row['seconds']:.1f} s, peak {row['peak_rss_mb']:.0f} MB) - {self.time_left()}",
            file=sys.stderr,
            flush=True,
        )

    def time_left(self) -> str:
        pending = self.cells[self.done :]
        if not pending:
            return "done"
        if self.eval_rate is None:
            return "time left unknown until a cell finishes"
        known = list(self.edit_rate.values())
        fallback = sum(known) / len(known) if known else 0.0
        seconds = sum(self.edit_rate.get(m, fallback) * edits + self.eval_rate * n for m, n, edits in pending)
        clock = time.strftime("%H:%M:%S", time.gmtime(seconds))
        if not known and any(edits for _, _, edits in pending):
            return f"at least {clock} left (evaluation only: no edit measured yet)"
        return f"about {clock} left (estimated)"


def _setting_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences over the settings both hold (per-method hyper-parameters: methods both hold)."""
    out = []
    for key in sorted(set(stored) & set(current)):
        if key == "hparams":
            for method in sorted(set(stored[key]) & set(current[key])):
                old, new = stored[key][method], current[key][method]
                out += [f"{method} {name}: stored {old.get(name)!r}, now {new.get(name)!r}"
                        for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        elif stored[key] != current[key]:
            out.append(f"{key}: stored {stored[key]!r}, now {current[key]!r}")
    return out


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.0f}"


def _counts(results: BenchResults, with_seed: bool) -> list[int]:
    ours = {int(r["n"]) for r in results.rows}
    seed = {n for method in results.methods() for n in SEED_SUCCESS.get(method, {})} if with_seed else set()
    return sorted(ours | seed)


def success_table(results: BenchResults) -> str:
    """Markdown: efficacy (%) by method and N, the seed's figure in brackets where it has one."""
    counts = _counts(results, with_seed=True)
    lines = ["| method | " + " | ".join(f"N = {n:,}" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for method in results.methods():
        seed = SEED_SUCCESS.get(method, {})
        cells = []
        for n in counts:
            row = results.row(method, n)
            ours = _pct(row["efficacy"]) if row else "–"
            cells.append(f"{ours} ({_pct(seed[n])})" if n in seed else ours)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(results: BenchResults) -> str:
    """Markdown: every metric of every cell, with seconds per edit and peak memory."""
    header = ("| method | N | efficacy | paraphrase | neighbourhood | score | perplexity | seconds | CPU seconds "
              "| s / edit | peak RSS (MB) |")
    lines = [header, "|---" * 11 + "|"]
    for row in sorted(results.rows, key=lambda r: (results.methods().index(r["method"]), int(r["n"]))):
        per_edit = row.get("edit_seconds", 0.0) / row["n"] if row.get("edit_seconds") else None
        ppl = row.get("perplexity")
        lines.append(
            f"| {row['method']} | {row['n']:,} | {_pct(row['efficacy'])} | {_pct(row['paraphrase'])} | "
            f"{_pct(row['neighborhood'])} | {_pct(row['score'])} | {'–' if ppl is None else f'{ppl:.2f}'} | "
            f"{row['seconds']:.1f} | {row.get('cpu_seconds', float('nan')):.1f} | "
            f"{'–' if per_edit is None else f'{per_edit:.2f}'} | "
            f"{row.get('peak_rss_mb', float('nan')):.0f} |"
        )
    return "\n".join(lines)


def markdown_report(results: BenchResults) -> str:
    """The content of ``results.md``."""
    return "\n".join([
        "# Success by number of edits",
        "",
        f"Model `{results.model}`, requests `{results.requests}`. Rates in %; efficacy is the success rate (the new "
        "answer more likely than the true one on the edit prompt). Batch methods edit the first N facts at once "
        "from the unedited weights; `-seq` methods edit one after another and are evaluated on every fact edited "
        "so far. The seed's figures (GPT-J, CounterFact) are in brackets.",
        "",
        "## Efficacy: ours (seed)",
        "",
        success_table(results),
        "",
        "## All metrics",
        "",
        metrics_table(results),
        "",
        f"![success by number of edits]({PLOT_FILE})",
        "",
    ])


def plot_success(results: BenchResults, path: str | os.PathLike[str]) -> Path:
    """Efficacy against N (log axis), one solid line per method, the seed's lines dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        # Every seed line is drawn (the reference), ours where measured, in one colour per method.
        methods = [m for m in dict.fromkeys([*SEED_SUCCESS, *results.methods()]) if m != "unedited"]
        for index, method in enumerate(methods):
            colour = colours[index % len(colours)]
            rows = sorted((r for r in results.rows if r["method"] == method), key=lambda r: int(r["n"]))
            if rows:
                xs, ys = [int(r["n"]) for r in rows], [100 * float(r["efficacy"]) for r in rows]
                ax.plot(xs, ys, "-", color=colour, marker="o", label=f"{method} (ours)")
            seed = SEED_SUCCESS.get(method)
            if seed:
                ax.plot(list(seed), [100 * v for v in seed.values()], "--", color=colour, alpha=0.7,
                        label=f"{method} (seed, GPT-J)")
        baseline = sorted((r for r in results.rows if r["method"] == "unedited"), key=lambda r: int(r["n"]))
        if baseline:
            ax.plot([int(r["n"]) for r in baseline], [100 * float(r["efficacy"]) for r in baseline], ":",
                    color="grey", marker=".", label="unedited model")
        ax.set_xscale("log")
        ax.set_ylim(0, 102)
        ax.set_xlabel("number of edits N")
        ax.set_ylabel("efficacy (success rate, %)")
        ax.set_title(f"Success by number of edits: {results.model}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        target = Path(path)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return target


def write_report(results: BenchResults) -> tuple[Path, Path]:
    """Write ``results.md`` and ``success_vs_edits.png`` beside ``results.json``."""
    table = results.folder / TABLE_FILE
    atomic_write_text(table, markdown_report(results))
    return table, plot_success(results, results.folder / PLOT_FILE)
