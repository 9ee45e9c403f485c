"""``kedit fit|validate|test|predict --config F``: the LightningCLI of :class:`KnowledgeEditModule`.

The model is a :class:`~lightning_kedit.lightning.module.KnowledgeEditModule`, the data a
:class:`~lightning_kedit.lightning.data.TextDataModule`, and edits come from a
:class:`~lightning_kedit.lightning.callback.KnowledgeEditCallback` listed under ``trainer.callbacks``. ``predict``
writes one JSON line per prompt (``{"prompt", "completion"}``) to ``--completions.output`` or to stdout.

Example:
    $ kedit fit --config examples/finetune_then_edit.yaml
    $ kedit predict --config examples/serve_with_edits.yaml --completions.output completions.jsonl
    $ kedit fit --print_config   # every option, with its default
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_write_text
from lightning_kedit.lightning.data import TextDataModule
from lightning_kedit.lightning.module import KnowledgeEditModule

__all__ = ["CompletionWriter", "KnowledgeEditCLI", "run_lightning_cli"]


class CompletionWriter(BasePredictionWriter):
    """Writes the completions of ``predict`` as JSON lines, to ``output`` or to stdout (rank 0 only).

    Args:
        output: a ``.jsonl`` file to write (None: print to stdout).

    Example:
        >>> writer = CompletionWriter("completions.jsonl")
        >>> writer.output.name
        'completions.jsonl'
    """

    def __init__(self, output: str | Path | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = None if output is None else Path(output).expanduser()

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        if not trainer.is_global_zero:
            return
        rows = [row for batch in _flatten(predictions) for row in batch]
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self.output is None:
            sys.stdout.write(lines)
            sys.stdout.flush()
        else:
            atomic_write_text(self.output, lines)


def _flatten(predictions: Sequence[Any]) -> list[list[dict[str, str]]]:
    # One dataloader gives a list of batches; several give a list of such lists.
    if predictions and isinstance(predictions[0], list) and predictions[0] and isinstance(predictions[0][0], list):
        return [batch for loader in predictions for batch in loader]
    return list(predictions)


class KnowledgeEditCLI(LightningCLI):
    """LightningCLI with :class:`KnowledgeEditModule`, :class:`TextDataModule` and a :class:`CompletionWriter`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(CompletionWriter, "completions")


def run_lightning_cli(args: list[str]) -> None:
    """Run ``kedit fit|validate|test|predict`` with ``args`` (the subcommand first).

    A user error (a missing file, a bad option value) ends the command with a one-line message and exit status
    2; ``KEDIT_DEBUG=1`` shows the traceback.

    Example:
        >>> run_lightning_cli(["fit", "--config", "examples/finetune_then_edit.yaml"])  # doctest: +SKIP
    """
    argv = sys.argv
    # LightningCLI reads sys.argv when given no `args`; passing both makes it warn, so sys.argv is set instead.
    sys.argv = ["kedit", *args]
    try:
        KnowledgeEditCLI(
            KnowledgeEditModule,
            TextDataModule,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
        )
        # Lightning destroys only an NCCL process group at exit; a gloo one left alive can abort the interpreter's
        # finalisation from its worker threads (SIGABRT), so a finished run destroys it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except (KeditError, FileNotFoundError) as err:
        if os.environ.get("KEDIT_DEBUG"):
            raise
        command = args[0] if args else "fit"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"kedit {command}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        sys.argv = argv
