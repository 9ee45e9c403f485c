"""The one error a misconfigured :class:`~.callback.KnowledgeEditCallback` raises: :class:`KeditConfigurationError`.

It is both a :class:`~lightning_kedit.errors.KeditError` and Lightning's ``MisconfigurationException``, so that
``except KeditError`` and ``except MisconfigurationException`` clauses written for either both catch it.

Example:
    >>> from lightning.pytorch.utilities.exceptions import MisconfigurationException
    >>> issubclass(KeditConfigurationError, (KeditError, MisconfigurationException))
    True
"""

from __future__ import annotations

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_kedit.errors import KeditError

__all__ = ["KeditConfigurationError"]


class KeditConfigurationError(KeditError, MisconfigurationException):
    """The callback's arguments, the strategy or the model do not allow the edit asked for."""
