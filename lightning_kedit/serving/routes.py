"""The history routes, added to LitServe's FastAPI app: list edits, revert one, revert back to a version.

They run in the HTTP server processes and touch only the history folder (no model): a revert commits a new
version whose active edits leave the reverted one out, and every worker reaches it before its next batch.

============================  =====  ==========================================================================
route                         key    does
============================  =====  ==========================================================================
``GET /v1/edits``             read   the version, the active edits, every edit's record, the version log and
                                     ``computing``: the edit being computed (facts, since, base version) or null
``GET /v1/edits/{id}``        read   one edit's record (404 when unknown)
``DELETE /v1/edits/{id}``     write  revert it (404 unknown; 409 not active, or later edits depend on it)
``POST /v1/edits/revert``     write  ``{"version": V}``: the active edits of version V again (404 unknown)
============================  =====  ==========================================================================

Example:
    >>> app = FastAPI()  # doctest: +SKIP
    >>> add_history_routes(app, HistoryStore("history"), keys)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from lightning_kedit.errors import KeditError

from .keys import ServeKeys
from .store import EditConflictError, HistoryStore, Manifest, UnknownEditError

__all__ = ["RevertRequest", "add_history_routes", "history_view"]


class RevertRequest(BaseModel):
    """``{"version": V}``: go back to the active edits of version ``V``."""

    version: int = Field(ge=0)


def history_view(manifest: Manifest) -> dict[str, Any]:
    """What ``GET /v1/edits`` answers: ``version``, ``active``, ``edits`` (each with ``active``) and ``log``."""
    return {
        "version": manifest.version,
        "active": list(manifest.active),
        "edits": [{**record, "active": record["id"] in manifest.active} for record in manifest.edits.values()],
        "log": manifest.log,
    }


def _key_check(keys: ServeKeys, *, write: bool) -> Callable[..., None]:
    def check(authorization: Annotated[str | None, Header()] = None) -> None:
        code = keys.status(authorization, write=write)
        if code is not None:
            raise HTTPException(code, f"give the {'write' if write else 'read or write'} key as "
                                      "'Authorization: Bearer KEY'")

    return check


def _revert_result(manifest: Manifest, **extra: Any) -> dict[str, Any]:
    return {**extra, "version": manifest.version, "active": list(manifest.active)}


def add_history_routes(app: FastAPI, store: HistoryStore, keys: ServeKeys) -> None:
    """Register the history routes on ``app`` (a LitServer's ``app``, before ``run``)."""
    read = [Depends(_key_check(keys, write=False))]
    write = [Depends(_key_check(keys, write=True))]

    # Plain ``def`` handlers: FastAPI runs them in its thread pool, so the file lock never blocks the event loop.
    @app.get("/v1/edits", dependencies=read)
    def list_edits() -> dict[str, Any]:
        return {**history_view(_read(store)), "computing": store.computing()}

    @app.get("/v1/edits/{edit_id}", dependencies=read)
    def get_edit(edit_id: str) -> dict[str, Any]:
        manifest = _read(store)
        if edit_id not in manifest.edits:
            raise HTTPException(404, f"no edit {edit_id!r} in the history; GET /v1/edits lists them")
        return {**manifest.edits[edit_id], "active": edit_id in manifest.active}

    @app.delete("/v1/edits/{edit_id}", dependencies=write)
    def revert_edit(edit_id: str) -> dict[str, Any]:
        try:
            manifest = store.revert_edit(edit_id)
        except UnknownEditError as err:
            raise HTTPException(404, str(err)) from err
        except EditConflictError as err:
            raise HTTPException(409, str(err)) from err
        return _revert_result(manifest, reverted=edit_id)

    @app.post("/v1/edits/revert", dependencies=write)
    def revert_to(request: RevertRequest) -> dict[str, Any]:
        try:
            manifest = store.revert_to(request.version)
        except UnknownEditError as err:
            raise HTTPException(404, str(err)) from err
        return _revert_result(manifest, reverted_to=request.version)


def _read(store: HistoryStore) -> Manifest:
    try:
        return store.read()
    except KeditError as err:
        raise HTTPException(500, str(err)) from err
