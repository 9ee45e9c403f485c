"""Assemble the editable server: LitServe with the completions and edit APIs plus the history routes.

Processes: ``workers`` generation workers and one editing worker (LitServe starts each as its own process and
each loads the model), and ``api_servers`` HTTP server processes (FastAPI, no model). They share nothing but
the history folder, which is also all a restart needs.

Example:
    >>> server = build_server("smollm2", "history", ServeKeys.load(), workers=2)  # doctest: +SKIP
    >>> server.run(host="127.0.0.1", port=8000, num_api_servers=1)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any

import litserve as ls

from .edits import EditAPI
from .generation import CompletionAPI
from .keys import ServeKeys
from .routes import add_history_routes
from .store import HistoryStore

__all__ = ["build_server", "default_threads"]


def default_threads(workers: int) -> int:
    """Torch threads per generation worker: the CPU cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def build_server(model: str, history: str | os.PathLike[str], keys: ServeKeys, *, workers: int = 1,
                 method: str = "memit", statistics: str | None = None, traffic_statistics: bool = False,
                 threads: int | None = None, max_batch_size: int = 8, timeout: float = 120.0,
                 accelerator: str = "auto", hparams: dict[str, Any] | None = None, max_ppl_rise: float = 0.10,
                 max_neighborhood_drop: float = 0.10,
                 **server_options: Any) -> ls.LitServer:
    """A ``LitServer`` serving ``model`` with live edits recorded in ``history``.

    Args:
        model: the model spec (``"smollm2"``, a Hugging Face folder, a ``.gguf`` file).
        history: the history folder (created when missing; a restart resumes its last committed version).
        keys: the read and write keys.
        workers: generation worker processes.
        method: the edit method, ``"memit"`` or ``"rome"``.
        statistics: a key statistics file (``kedit stats --out``); None: the cached bundled-corpus statistics.
        traffic_statistics: merge the served prompts' key statistics into the base statistics of each edit.
        threads: torch threads per generation worker (default: the cores shared out).
        max_batch_size: generation requests per batch.
        timeout: seconds a generation request may wait in the queue before a 504.
        hparams: changes to the method's per-model hyper-parameters (``EditHyperParams`` fields).
        max_ppl_rise: the damage guard's largest relative perplexity rise (an edit past it gets 422).
        max_neighborhood_drop: the damage guard's largest fall of the neighbourhood probability.
        accelerator: LitServe's ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` (each worker loads the model there).
        server_options: passed to ``LitServer`` (callbacks, middlewares, ...).

    Raises:
        KeditError: unusable keys, method, guard limits or history folder.
    """
    from lightning_kedit.editing.hparams import EditHyperParams

    store = HistoryStore(history)
    store.read()  # a damaged manifest stops the start here, with its message
    EditHyperParams().replace(**(hparams or {}))  # unknown or out-of-range values too
    threads = threads or default_threads(workers)
    completions = CompletionAPI(model, history, keys, threads=threads, traffic_statistics=traffic_statistics,
                                max_batch_size=max_batch_size)
    edits = EditAPI(model, history, keys, method=method, statistics=statistics, hparams=hparams,
                    max_ppl_rise=max_ppl_rise, max_neighborhood_drop=max_neighborhood_drop,
                    traffic_statistics=traffic_statistics, threads=os.cpu_count())
    server = ls.LitServer([completions, edits], accelerator=accelerator,  # type: ignore[arg-type]
                          workers_per_device={"/v1/completions": workers, "/v1/edits": 1},
                          timeout=timeout, **server_options)
    edits.request_timeout = -1  # an edit queued behind a long edit waits for it, however long
    add_history_routes(server.app, store, keys)
    return server
