"""Serve a model and edit it while it serves: a LitServe server with live, atomic, persistent, authorised edits.

- :func:`build_server` assembles it: :class:`CompletionAPI` (``POST /v1/completions``), :class:`EditAPI`
  (``POST /v1/edits``) and the history routes (:func:`add_history_routes`); ``kedit serve`` runs it.
- :class:`HistoryStore` is the history folder (delta files and a manifest, the single point of commit);
  :class:`WeightsFollower` brings a worker's model to the committed version between two request batches.
- :class:`ServeKeys` holds the read and write keys.

See ``docs/serving.md``.

Example:
    >>> server = build_server("smollm2", "history", ServeKeys.load(), workers=2)  # doctest: +SKIP
    >>> server.run(host="127.0.0.1", port=8000, num_api_servers=1)  # doctest: +SKIP
"""

from .edits import EditAPI, EditSubmission
from .follower import WeightsFollower
from .generation import Completion, CompletionAPI, CompletionRequest, generate_text
from .keys import ServeKeys
from .routes import add_history_routes, history_view
from .server import build_server
from .store import EditConflictError, HistoryStore, Manifest, StaleEditError, UnknownEditError

__all__ = [
    "Completion",
    "CompletionAPI",
    "CompletionRequest",
    "EditAPI",
    "EditConflictError",
    "EditSubmission",
    "HistoryStore",
    "Manifest",
    "ServeKeys",
    "StaleEditError",
    "UnknownEditError",
    "WeightsFollower",
    "add_history_routes",
    "build_server",
    "generate_text",
    "history_view",
]
