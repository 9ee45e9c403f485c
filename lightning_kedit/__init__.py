"""lightning_kedit: knowledge editing (MEMIT, ROME, AlphaEdit) for PyTorch Lightning and the command line."""

from lightning_kedit.errors import KeditError, ModelLoadError, RequestFormatError, StatisticsMismatchError
from lightning_kedit.models import (
    ADAPTER_TABLE,
    AdapterSpec,
    ModelAdapter,
    UnsupportedModelError,
    default_edit_layers,
    load_model,
    register_adapter,
)

__version__ = "0.1.0"

__all__ = [
    "ADAPTER_TABLE",
    "AdapterSpec",
    "KeditError",
    "ModelAdapter",
    "ModelLoadError",
    "RequestFormatError",
    "StatisticsMismatchError",
    "UnsupportedModelError",
    "__version__",
    "default_edit_layers",
    "load_model",
    "register_adapter",
]
