"""Model loading and per-architecture adapters."""

from lightning_kedit.files import cache_dir
from lightning_kedit.models.adapters import (
    ADAPTER_TABLE,
    AdapterSpec,
    ModelAdapter,
    NotLinearlyEditableError,
    UnsupportedModelError,
    default_edit_layers,
    register_adapter,
)
from lightning_kedit.models.loading import EMBEDDED_MODELS, load_model, resolve_model_spec

__all__ = [
    "ADAPTER_TABLE",
    "EMBEDDED_MODELS",
    "AdapterSpec",
    "ModelAdapter",
    "NotLinearlyEditableError",
    "UnsupportedModelError",
    "cache_dir",
    "default_edit_layers",
    "load_model",
    "register_adapter",
    "resolve_model_spec",
]
