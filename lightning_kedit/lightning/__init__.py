"""Knowledge editing in Lightning pipelines: a callback, a module, a data module and the LightningCLI."""

from lightning_kedit.lightning.callback import EDIT_METRICS, EDIT_MOMENTS, AppliedEdit, KnowledgeEditCallback
from lightning_kedit.lightning.data import TextDataModule
from lightning_kedit.lightning.module import KnowledgeEditModule
from lightning_kedit.lightning.trainer_cli import CompletionWriter, KnowledgeEditCLI, run_lightning_cli

__all__ = [
    "EDIT_METRICS",
    "EDIT_MOMENTS",
    "AppliedEdit",
    "CompletionWriter",
    "KnowledgeEditCLI",
    "KnowledgeEditCallback",
    "KnowledgeEditModule",
    "TextDataModule",
    "run_lightning_cli",
]
