"""The exceptions users can cause, each with a message that names the input and the fix."""

from __future__ import annotations

__all__ = [
    "DeltaError",
    "DeltaFileError",
    "DeltaMismatchError",
    "KeditError",
    "ModelLoadError",
    "RequestFormatError",
    "StatisticsMismatchError",
]


class KeditError(ValueError):
    """Base class of every error a user can cause through the API or the ``kedit`` command."""


class ModelLoadError(KeditError):
    """A model spec that does not name a loadable model."""


class RequestFormatError(KeditError):
    """An edit request file or record that cannot be used (names the file, record and field)."""


class StatisticsMismatchError(KeditError):
    """Key statistics made for another model, other layers or another tokenizer."""


class DeltaError(KeditError):
    """A delta that cannot be applied, reverted or saved as asked."""


class DeltaMismatchError(DeltaError):
    """A delta and a model whose weights or architecture do not match (``force=True`` / ``--force``)."""


class DeltaFileError(DeltaError):
    """A delta file that is missing, unreadable or corrupt."""
