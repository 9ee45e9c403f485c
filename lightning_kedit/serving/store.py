"""The served model's edit history on disk: delta files and one manifest, the single point of commit.

A history folder holds ``deltas/<id>.delta.safetensors`` (one :class:`~lightning_kedit.editing.delta.EditDelta`
per edit) and ``manifest.json``: the current weights version, the ordered list of active edits, every edit's
record and a log of versions. Versions count commits: 0 is the unedited model, every edit and every revert adds
one. The weights of a version are the model's own weights with that version's active deltas applied in order.

Commits are serialised across processes by a file lock (``.manifest.json.lock``) and written with the
project's atomic writer, so a reader sees one committed manifest or the next, never a half-written one. An
edit writes its delta file first and the manifest last: a process killed in between leaves a delta file no
manifest names (ignored, and overwritten by the next edit), and the committed history intact.

Example:
    >>> import tempfile
    >>> store = HistoryStore(tempfile.mkdtemp())
    >>> store.read().version, store.read().active
    (0, [])
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_write_json, exclusive_build

__all__ = ["EditConflictError", "HistoryStore", "Manifest", "StaleEditError", "UnknownEditError"]

FORMAT = "lightning_kedit.serve_history"
FORMAT_VERSION = "1"
MANIFEST = "manifest.json"


class UnknownEditError(KeditError):
    """An edit id or a version the history does not hold (HTTP 404)."""


class EditConflictError(KeditError):
    """A revert the history cannot make as asked: later edits depend on the edit, or it is not active (409)."""


class StaleEditError(KeditError):
    """An edit computed on weights that are no longer the committed ones (a revert landed meanwhile)."""


@dataclass
class Manifest:
    """One committed state of the history.

    Attributes:
        version: the weights version (0: the unedited model).
        active: the ids of the applied edits, in the order they are applied.
        edits: every edit ever committed, by id (records: requests, layers, efficacy, ...).
        log: one entry per version: ``{"version", "event", "active", "time", ...}``.
        fingerprint: the identity of the model the history belongs to (None until the first edit).
    """

    version: int = 0
    active: list[str] = field(default_factory=list)
    edits: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[dict[str, Any]] = field(default_factory=list)
    fingerprint: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest file's content."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "version": self.version,
                "active": list(self.active), "fingerprint": self.fingerprint,
                "edits": list(self.edits.values()), "log": list(self.log)}

    @classmethod
    def from_json(cls, data: Any, where: Path) -> Manifest:
        """Read a manifest file's content, checking its format."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise KeditError(f"{where} is not a kedit serve history manifest; give an empty folder or one that "
                             "`kedit serve --history` wrote")
        if data.get("format_version") != FORMAT_VERSION:
            raise KeditError(f"{where} has manifest version {data.get('format_version')!r}; this version reads "
                             f"{FORMAT_VERSION}")
        try:
            edits = {str(e["id"]): dict(e) for e in data["edits"]}
            manifest = cls(int(data["version"]), [str(i) for i in data["active"]], edits, list(data["log"]),
                           data.get("fingerprint"))
        except (KeyError, TypeError, ValueError) as err:
            raise KeditError(f"{where} is a damaged manifest ({type(err).__name__}: {err})") from err
        unknown = [i for i in manifest.active if i not in manifest.edits]
        if unknown:
            raise KeditError(f"{where} is a damaged manifest: active edits {unknown} have no record")
        return manifest

    def active_at(self, version: int) -> list[str]:
        """The active edits of ``version``.

        Raises:
            UnknownEditError: the history has no such version.
        """
        if version == 0:
            return []
        for entry in self.log:
            if entry["version"] == version:
                return list(entry["active"])
        raise UnknownEditError(f"version {version} is not in the history (versions 0..{self.version}); "
                               "GET /v1/edits lists them")

    def dependents(self, edit_id: str) -> list[str]:
        """The active edits after ``edit_id`` that edit one of its layers (their deltas were computed on it)."""
        position = self.active.index(edit_id)
        layers = set(self.edits[edit_id]["layers"])
        return [i for i in self.active[position + 1:] if layers & set(self.edits[i]["layers"])]


class HistoryStore:
    """The history folder: read the committed manifest, commit edits and reverts, read delta files.

    Args:
        folder: the history folder (created when missing).

    Example:
        >>> import tempfile
        >>> store = HistoryStore(tempfile.mkdtemp())
        >>> store.read_if_changed(None)  # no commit yet: the unedited model, unchanged
        (None, None)
        >>> store.read_if_changed("an older stamp")[1].version  # the manifest of the unedited model
        0
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise KeditError(f"--history {self.folder} is a file; give a folder (it is created when missing)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.folder / MANIFEST
        self.traffic_dir = self.folder / "traffic"

    def __repr__(self) -> str:
        return f"HistoryStore({str(self.folder)!r})"

    # ------------------------------------------------------------------ reading
    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.manifest_path)
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def read(self) -> Manifest:
        """The committed manifest (an empty history when the folder has none)."""
        return self.read_if_changed(None)[1] or Manifest()

    def read_if_changed(self, stamp: Any) -> tuple[Any, Manifest | None]:
        """``(stamp, manifest)``, or ``(stamp, None)`` when the manifest file is still the one ``stamp`` names.

        The stamp is the file's inode, modification time and size: every commit replaces the file, so a
        commit always changes it. Costs one ``stat`` when nothing changed.
        """
        for _ in range(5):  # a commit may replace the file between stat and read: read until they agree
            current = self._stamp()
            if current is not None and current == stamp:
                return stamp, None
            if current is None:  # no commit yet: the unedited model
                return None, None if stamp is None else Manifest()
            try:
                data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except json.JSONDecodeError as err:
                raise KeditError(f"{self.manifest_path} is not valid JSON ({err}); it was not written by "
                                 "kedit serve") from err
            if self._stamp() == current:
                return current, Manifest.from_json(data, self.manifest_path)
        raise KeditError(f"{self.manifest_path} kept changing while it was read; is another writer looping?")

    def delta_path(self, edit_id: str) -> Path:
        """The delta file of ``edit_id``."""
        return self.folder / "deltas" / f"{edit_id}.delta.safetensors"

    def load_delta(self, edit_id: str) -> EditDelta:
        """The delta of a committed edit (checked against its digest and the manifest's record)."""
        delta = EditDelta.load(self.delta_path(edit_id))
        expected = self.read().edits.get(edit_id, {}).get("digest")
        if expected is not None and delta.digest() != expected:
            raise KeditError(f"{self.delta_path(edit_id)} is not the delta the manifest committed for {edit_id}")
        return delta

    # ------------------------------------------------------------------ the edit under way
    @property
    def computing_path(self) -> Path:
        """``computing.json``: the edit the editing worker is computing, if any (not part of the history)."""
        return self.folder / "computing.json"

    def mark_computing(self, info: dict[str, Any] | None) -> None:
        """Record the edit being computed (``info``), or that none is (None)."""
        if info is None:
            self.computing_path.unlink(missing_ok=True)
        else:
            atomic_write_json(self.computing_path, info)

    def computing(self) -> dict[str, Any] | None:
        """The edit being computed, as :meth:`mark_computing` recorded it, or None."""
        try:
            return dict(json.loads(self.computing_path.read_text(encoding="utf-8")))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # ------------------------------------------------------------------ committing
    def _write(self, manifest: Manifest) -> None:
        atomic_write_json(self.manifest_path, manifest.to_json(), indent=1)

    def commit_edit(self, delta: EditDelta, base_active: list[str], record: dict[str, Any],
                    fingerprint: dict[str, str] | None = None) -> tuple[str, int]:
        """Commit ``delta``, computed on the weights of the active edits ``base_active``; returns (id, version).

        Raises:
            StaleEditError: the active edits are no longer ``base_active`` (recompute on the new weights).
        """
        with exclusive_build(self.manifest_path):
            manifest = self.read()
            if manifest.active != base_active:
                raise StaleEditError(
                    f"the history moved to version {manifest.version} while the edit was computed on "
                    f"{base_active}; compute it again on the current weights"
                )
            if manifest.fingerprint is None and fingerprint is not None:
                manifest.fingerprint = fingerprint
            edit_id = f"e{len(manifest.edits) + 1}"
            delta.save(self.delta_path(edit_id))  # complete before the manifest names it
            manifest.version += 1
            manifest.active.append(edit_id)
            manifest.edits[edit_id] = {**record, "id": edit_id, "version": manifest.version, "layers": delta.layers,
                                       "digest": delta.digest(), "reverted_version": None}
            manifest.log.append({"version": manifest.version, "event": "edit", "id": edit_id,
                                 "active": list(manifest.active), "time": _now()})
            self._write(manifest)
        return edit_id, manifest.version

    def revert_edit(self, edit_id: str) -> Manifest:
        """Commit a version without ``edit_id``.

        Raises:
            UnknownEditError: no such edit.
            EditConflictError: it is not active, or later active edits were computed on it (named).
        """
        with exclusive_build(self.manifest_path):
            manifest = self.read()
            if edit_id not in manifest.edits:
                known = ", ".join(manifest.edits) or "none yet"
                raise UnknownEditError(f"no edit {edit_id!r} in the history (edits: {known})")
            if edit_id not in manifest.active:
                raise EditConflictError(f"edit {edit_id} is not active (reverted at version "
                                        f"{manifest.edits[edit_id]['reverted_version']})")
            later = manifest.dependents(edit_id)
            if later:
                raise EditConflictError(
                    f"edits {later} were computed on the weights edit {edit_id} produced (same layers); revert "
                    f"them first, or revert back to version {manifest.edits[edit_id]['version'] - 1}"
                )
            active = [i for i in manifest.active if i != edit_id]
            return self._commit_active(manifest, active, {"event": "revert", "id": edit_id})

    def revert_to(self, version: int) -> Manifest:
        """Commit a version whose active edits are those of ``version`` (an earlier or a reverted state).

        Raises:
            UnknownEditError: the history has no such version.
        """
        with exclusive_build(self.manifest_path):
            manifest = self.read()
            active = manifest.active_at(version)
            return self._commit_active(manifest, active, {"event": "revert_to", "to_version": version})

    def _commit_active(self, manifest: Manifest, active: list[str], entry: dict[str, Any]) -> Manifest:
        manifest.version += 1
        for edit_id in manifest.active:
            if edit_id not in active:
                manifest.edits[edit_id]["reverted_version"] = manifest.version
        for edit_id in active:
            manifest.edits[edit_id]["reverted_version"] = None
        manifest.active = active
        manifest.log.append({"version": manifest.version, **entry, "active": list(active), "time": _now()})
        self._write(manifest)
        return manifest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
