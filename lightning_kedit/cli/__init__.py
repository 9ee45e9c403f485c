"""The ``kedit`` command: edit, evaluate, trace and benchmark from the shell.

Each subcommand lives in its own module of this package and exposes ``add_arguments(parser)`` and
``run(args) -> dict | None``. The returned dict is what ``--json OUT`` writes. Errors a user can cause end the
command with a one-line message and exit status 2 (no traceback); ``KEDIT_DEBUG=1`` shows the traceback.

Example:
    $ kedit info --model smollm2
    $ kedit eval --requests ../shared/data/counterfact/counterfact-val.json --n 100 --json out.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_kedit.files import atomic_write_json

__all__ = ["COMMANDS", "build_parser", "main", "write_json"]

#: Subcommand name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lightning_kedit.cli.demo", "edit the embedded model with bundled facts, show before/after"),
    "info": ("lightning_kedit.cli.info", "model type, layers, key/value sizes, default edit layers"),
    "eval": ("lightning_kedit.cli.evaluate", "edit metrics on a request file, optionally with a delta"),
    "stats": ("lightning_kedit.cli.stats", "key statistics (second moment of MLP keys) in one pass"),
    "edit": ("lightning_kedit.cli.edit", "compute an edit and save it as a small reversible delta"),
    "export": ("lightning_kedit.cli.export", "write the edited model (HF folder) or the delta as a PEFT adapter"),
    "bench": ("lightning_kedit.cli.bench", "success by number of edits, table and plot"),
    "trace": ("lightning_kedit.cli.trace", "causal tracing heatmaps and averaged curves"),
    "serve": ("lightning_kedit.cli.serve", "serve the model over HTTP and edit it live (edits, reverts, history)"),
}

#: Subcommands handled by LightningCLI (``kedit fit --config F``).
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2",
        metavar="SPEC",
        help="'smollm2' (embedded), a Hugging Face model folder, or a .gguf file (default: smollm2)",
    )
    parser.add_argument("--json", dest="json_out", metavar="OUT", default=None, help="write results as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kedit", description="Knowledge editing for language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_model_argument(sub_parser)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            sub_parser.set_defaults(_module=None)
            continue
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (--config F)", add_help=False)
    return parser


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``result`` as JSON atomically (a temporary file renamed into place)."""
    atomic_write_json(path, result, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _quiet_transformers() -> None:
    """Keep the terminal for our own output: no per-tensor loading bars from transformers."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kedit`` console script."""
    from lightning_kedit.errors import KeditError

    args_list = list(sys.argv[1:] if argv is None else argv)
    _quiet_transformers()
    if args_list and args_list[0] in LIGHTNING_COMMANDS:
        from lightning_kedit.lightning.trainer_cli import run_lightning_cli

        run_lightning_cli(args_list)
        return 0
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help()
        return 2
    if args._module is None:
        print(f"kedit: error: `kedit {args.command}` is not available in this version", file=sys.stderr)
        return 2
    try:
        result = args._module.run(args)
        if args.json_out and result is not None:
            write_json(result, args.json_out)
    except (KeditError, FileNotFoundError, IsADirectoryError, PermissionError) as err:
        if os.environ.get("KEDIT_DEBUG"):
            raise
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"kedit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kedit {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
