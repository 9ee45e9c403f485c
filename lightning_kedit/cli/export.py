"""``kedit export``: write the edited model (base model + delta) as a plain Hugging Face folder, or the delta as
a PEFT LoRA adapter,
or as one GGUF file.

``--format hf`` (default): the folder holds the config, the weights (safetensors) and the tokenizer, and loads
with ``AutoModelForCausalLM.from_pretrained(DIR)`` or ``kedit ... --model DIR``. ``--format peft``: a LoRA
adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) such that
``PeftModel.from_pretrained(base, DIR)`` is the edited model (:mod:`lightning_kedit.editing.peft_adapter`);
the delta's base hashes are checked against ``--model`` first. ``--format gguf`` (``--model`` a ``.gguf``
file): the source GGUF with the edited tensors replaced (:mod:`lightning_kedit.models.gguf_export`).

Example:
    $ kedit export --model smollm2 --delta edit.safetensors --out edited-smollm2/
    $ kedit export --model smollm2 --delta edit.safetensors --out edit-adapter/ --format peft
    $ kedit export --model smollm2 --delta edit.safetensors --out edited.gguf --format gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_directory

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit export``."""
    parser.add_argument("--delta", required=True, metavar="FILE", help="the edit delta (kedit edit --out)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not hold files)")
    parser.add_argument("--format", choices=("hf", "peft", "gguf"), default="hf",
                        help="hf: the edited model as a Hugging Face folder; peft: the delta as a LoRA adapter; "
                             "gguf: the edited model as one .gguf file (--model must be a GGUF)")
    parser.add_argument("--gguf-dtype", choices=("f32", "f16"), default="f32",
                        help="type of the edited tensors in --format gguf (f32: exact)")
    parser.add_argument("--force", action="store_true",
                        help="apply the delta even to other base weights, and overwrite a non-empty --out")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the delta to the loaded model and save it; --out is written whole or not at all."""
    from lightning_kedit.editing.delta import EditDelta
    from lightning_kedit.models.loading import load_model

    out = Path(args.out)
    if getattr(args, "format", "hf") == "gguf":
        return _export_gguf(args, out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise KeditError(f"--out {args.out!r} exists and is not an empty folder; choose another or pass --force")
    if not Path(args.delta).is_file():
        raise KeditError(f"--delta {args.delta!r} is not a file; make one with `kedit edit --out FILE`")
    delta = EditDelta.load(args.delta)
    model, tokenizer = load_model(args.model)
    if getattr(args, "format", "hf") == "peft":
        return _export_peft(args, delta, model, out)
    delta.apply(model, force=args.force)
    with atomic_directory(out, replace=True) as staging:
        model.save_pretrained(staging)  # type: ignore[operator]
        tokenizer.save_pretrained(staging)
    print(f"wrote the {delta.method} edit of layers {delta.layers} ({len(delta.request_ids)} request(s)) to {out}")
    return {"out": str(out), "method": delta.method, "layers": delta.layers, "requests": len(delta.request_ids)}


def _export_peft(args: argparse.Namespace, delta: Any, model: Any, out: Path) -> dict[str, Any]:
    """Write ``delta`` as a LoRA adapter of ``model``, after checking it was computed on ``model``'s weights."""
    from lightning_kedit.models.adapters import ModelAdapter
    from lightning_kedit.models.fingerprint import weights_hash
    from lightning_kedit.models.sharding import full_weight

    adapter = ModelAdapter.for_model(model)
    delta._resolve(model)  # names, layouts and shapes
    for layer in delta.layers:
        current, expected = weights_hash(full_weight(adapter.weight(layer))), delta.update(layer).base_hash
        if current != expected and not args.force:
            raise KeditError(f"--delta {args.delta!r} was computed on base weights with hash {expected} at layer "
                             f"{layer}, but --model {args.model!r} has {current}: export it with the model it was "
                             "made for, or pass --force")
    base_path = str(Path(args.model).resolve()) if Path(args.model).is_dir() else None
    delta.to_peft(out, base_model_name_or_path=base_path, overwrite=True)
    ranks = {layer: delta.update(layer).rank or "dense" for layer in delta.layers}
    print(f"wrote the {delta.method} edit of layers {delta.layers} as a LoRA adapter (ranks {ranks}) to {out}")
    return {"out": str(out), "format": "peft", "method": delta.method, "layers": delta.layers,
            "requests": len(delta.request_ids)}


def _export_gguf(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Write the source GGUF of --model with the delta's tensors replaced; nothing is written on error."""
    import time

    from lightning_kedit.editing.delta import EditDelta
    from lightning_kedit.models.gguf_export import export_gguf
    from lightning_kedit.models.loading import resolve_model_spec

    if out.exists() and not args.force:
        raise KeditError(f"--out {args.out!r} exists; choose another or pass --force")
    if out.suffix.lower() != ".gguf":
        raise KeditError(f"--out {args.out!r} must be a .gguf file name with --format gguf")
    kind, source = resolve_model_spec(args.model)
    if kind != "gguf":
        raise KeditError(f"--model {args.model!r} was not loaded from a GGUF file, so there is no GGUF to write the "
                         "edit into; use --format hf (or convert the exported folder with llama.cpp)")
    if not Path(args.delta).is_file():
        raise KeditError(f"--delta {args.delta!r} is not a file; make one with `kedit edit --out FILE`")
    delta = EditDelta.load(args.delta)
    start = time.perf_counter()
    result = export_gguf(source, delta, out, dtype=args.gguf_dtype, force=args.force)
    seconds = time.perf_counter() - start
    print(f"wrote the {delta.method} edit of layers {delta.layers} into {out} ({result['bytes'] / 1e6:.1f} MB, "
          f"{len(result['replaced'])} tensor(s) in {args.gguf_dtype.upper()}, {seconds:.1f} s)")
    return {**result, "format": "gguf", "method": delta.method, "layers": delta.layers, "seconds": seconds}
