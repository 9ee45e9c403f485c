"""``kedit export``: write the edited model (base model + delta) as a plain Hugging Face folder.

The folder holds the config, the weights (safetensors) and the tokenizer, and loads with
``AutoModelForCausalLM.from_pretrained(DIR)`` or ``kedit ... --model DIR``.

Example:
    $ kedit export --model smollm2 --delta edit.safetensors --out edited-smollm2/
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lightning_kedit.atomic_files import atomic_directory
from lightning_kedit.errors import KeditError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kedit export``."""
    parser.add_argument("--delta", required=True, metavar="FILE", help="the edit delta (kedit edit --out)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not hold files)")
    parser.add_argument("--force", action="store_true",
                        help="apply the delta even to other base weights, and overwrite a non-empty --out")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Apply the delta to the loaded model and save it; --out is written whole or not at all."""
    from lightning_kedit.editing.delta import EditDelta
    from lightning_kedit.models.loading import load_model

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise KeditError(f"--out {args.out!r} exists and is not an empty folder; choose another or pass --force")
    if not Path(args.delta).is_file():
        raise KeditError(f"--delta {args.delta!r} is not a file; make one with `kedit edit --out FILE`")
    delta = EditDelta.load(args.delta)
    model, tokenizer = load_model(args.model)
    delta.apply(model, force=args.force)
    with atomic_directory(out, replace=True) as staging:
        model.save_pretrained(staging)  # type: ignore[operator]
        tokenizer.save_pretrained(staging)
    print(f"wrote the {delta.method} edit of layers {delta.layers} ({len(delta.request_ids)} request(s)) to {out}")
    return {"out": str(out), "method": delta.method, "layers": delta.layers, "requests": len(delta.request_ids)}
