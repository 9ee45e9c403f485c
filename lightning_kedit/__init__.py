"""lightning_kedit: knowledge editing (MEMIT, ROME, AlphaEdit) for PyTorch Lightning and the command line.

Example:
    >>> from lightning_kedit import bundled_requests, compute_edit, evaluate_requests, load_model
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> delta = compute_edit(model, tokenizer, bundled_requests(), method="memit")  # doctest: +SKIP
    >>> with delta.applied(model):  # doctest: +SKIP
    ...     print(evaluate_requests(model, tokenizer, bundled_requests())["efficacy"])

The Lightning classes (``KnowledgeEditCallback``, ``KnowledgeEditModule``, ``TextDataModule``) are imported on
first use, so that the command line and the editing API start without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_kedit.editing import (
    EditDelta,
    EditHyperParams,
    compute_edit,
    edit,
)
from lightning_kedit.editing.damage_guard import DamageGuard, DamageReport, EditRejectedError
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.sequential import edit_sequentially
from lightning_kedit.errors import KeditError, ModelLoadError, RequestFormatError, StatisticsMismatchError
from lightning_kedit.evaluation.metrics import (
    EditConsistency,
    EditEfficacy,
    EditGeneralization,
    EditScore,
    EditSpecificity,
    EditTokenAccuracy,
)
from lightning_kedit.evaluation.perplexity import Perplexity, perplexity
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.evaluation.scoring import answer_log_probs, answer_nll
from lightning_kedit.models import (
    ADAPTER_TABLE,
    AdapterSpec,
    ModelAdapter,
    NotLinearlyEditableError,
    UnsupportedModelError,
    default_edit_layers,
    load_model,
    register_adapter,
)
from lightning_kedit.models.fingerprint import model_fingerprint
from lightning_kedit.requests import (
    EditRequest,
    PromptAnswer,
    bundled_corpus_path,
    bundled_requests,
    load_requests,
    save_requests,
)
from lightning_kedit.statistics import (
    KeyStatistics,
    collect_key_statistics,
    load_or_collect_statistics,
    track_keys,
)
from lightning_kedit.tracing import TraceResult, average_trace, causal_trace, choose_edit_layers

if TYPE_CHECKING:
    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

__version__ = "0.1.0"

_LAZY = {
    "KnowledgeEditCallback": "lightning_kedit.lightning",
    "KnowledgeEditModule": "lightning_kedit.lightning",
    "TextDataModule": "lightning_kedit.lightning",
}

__all__ = [
    "ADAPTER_TABLE",
    "AdapterSpec",
    "DamageGuard",
    "DamageReport",
    "EditConsistency",
    "EditDelta",
    "EditEfficacy",
    "EditGeneralization",
    "EditHistory",
    "EditHyperParams",
    "EditRejectedError",
    "EditRequest",
    "EditScore",
    "EditSpecificity",
    "EditTokenAccuracy",
    "KeditError",
    "KeyStatistics",
    "KnowledgeEditCallback",
    "KnowledgeEditModule",
    "ModelAdapter",
    "ModelLoadError",
    "NotLinearlyEditableError",
    "Perplexity",
    "PromptAnswer",
    "RequestFormatError",
    "StatisticsMismatchError",
    "TextDataModule",
    "TraceResult",
    "UnsupportedModelError",
    "__version__",
    "answer_log_probs",
    "answer_nll",
    "average_trace",
    "bundled_corpus_path",
    "bundled_requests",
    "causal_trace",
    "choose_edit_layers",
    "collect_key_statistics",
    "compute_edit",
    "default_edit_layers",
    "edit",
    "edit_sequentially",
    "evaluate_requests",
    "load_model",
    "load_or_collect_statistics",
    "load_requests",
    "model_fingerprint",
    "perplexity",
    "register_adapter",
    "save_requests",
    "track_keys",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_kedit' has no attribute {name!r}")
