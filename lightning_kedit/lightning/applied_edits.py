"""The callback's bookkeeping of the edits in the weights: their records and their deltas' stored forms.

An :class:`AppliedEdit` records one edit the callback put in the weights (its moment key, requests, method and
the delta's content hash); the records travel in checkpoints, so that a resumed run neither applies an edit
twice nor loses one. A delta itself is kept in memory, in a file of ``save_delta_to`` (:func:`delta_file`), or,
with ``checkpoint_deltas``, in the checkpoint as a uint8 tensor (:func:`delta_to_bytes`), which is also how
processes send it to each other.

Example:
    >>> record = AppliedEdit("fit_end", ("a", "b"), "0f3a", "memit", epoch=0, global_step=200)
    >>> AppliedEdit.from_dict({**record.__dict__, "request_ids": ["a", "b"], "added_later": 1}) == record
    True
    >>> delta_file("deltas", "step:200").as_posix()
    'deltas/step-200.safetensors'
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lightning_kedit.errors import KeditError
from lightning_kedit.files import short_digest
from lightning_kedit.requests import EditRequest

from .configuration_error import KeditConfigurationError

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta

__all__ = [
    "DELTA_SUFFIX",
    "AppliedEdit",
    "delta_file",
    "delta_from_bytes",
    "delta_to_bytes",
    "read_requests",
    "recorded_delta",
    "requests_source",
    "save_delta",
]

DELTA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class AppliedEdit:
    """One edit that is in the weights: where it was made, which requests, and the delta's content hash."""

    key: str
    request_ids: tuple[str, ...]
    digest: str
    method: str
    epoch: int
    global_step: int
    path: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AppliedEdit:
        """The record of a checkpoint entry (``dataclasses.asdict`` form; unknown keys are ignored)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "request_ids": tuple(values["request_ids"])})


def delta_file(folder: str | Path, key: str) -> Path:
    """Where the delta of the edit made at moment ``key`` is saved in ``folder`` (a file-system-safe name)."""
    return Path(folder) / (re.sub(r"[^A-Za-z0-9_.-]+", "-", key) + DELTA_SUFFIX)


def requests_source(
    requests: str | os.PathLike[str] | Sequence[EditRequest], n_requests: int | None
) -> tuple[Path | list[EditRequest], str]:
    """The callback's requests (a file to read at set-up, or the first ``n_requests`` given) and their state key.

    Raises:
        KeditError: ``n_requests`` < 1, a request file that does not exist, or an empty or mixed sequence.
    """
    if n_requests is not None and n_requests < 1:
        raise KeditConfigurationError(f"`n_requests` must be >= 1 or None, got {n_requests}")
    if isinstance(requests, (str, os.PathLike)):
        path = Path(requests).expanduser()
        if not path.is_file():
            raise KeditConfigurationError(
                f"`requests` file {str(requests)!r} not found; give a request file (.json/.jsonl)"
            )
        return path, f"{path}:{n_requests}"
    listed = list(requests)
    if not listed or not all(isinstance(r, EditRequest) for r in listed):
        raise KeditConfigurationError("`requests` must be a request file or a non-empty sequence of EditRequest")
    ids = "\n".join(r.case_id for r in listed[:n_requests])
    return listed[:n_requests], "ids:" + short_digest(ids, 16)


def read_requests(source: Path | list[EditRequest], n_requests: int | None) -> list[EditRequest]:
    """The requests of a :func:`requests_source`: read from its file, or those given."""
    if isinstance(source, Path):
        from lightning_kedit.requests import load_requests

        return load_requests(source, n=n_requests)
    return source


def save_delta(folder: str | Path | None, key: str, delta: EditDelta, is_global_zero: bool) -> str | None:
    """Where the delta of the edit made at ``key`` is kept in ``folder`` (None: not kept); rank 0 writes it."""
    if folder is None:
        return None
    path = delta_file(folder, key)
    if is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        delta.save(path)
    return str(path)


def recorded_delta(record: AppliedEdit, deltas: Mapping[str, EditDelta]) -> EditDelta:
    """The delta of ``record``: kept in ``deltas`` (by digest), else loaded from its saved file.

    Raises:
        KeditError: the delta is neither kept nor saved, so the edit cannot be reverted.
    """
    if record.digest in deltas:
        return deltas[record.digest]
    if record.path is not None and Path(record.path).is_file():
        from lightning_kedit.editing.delta import EditDelta

        return EditDelta.load(record.path)
    raise KeditError(
        f"the delta of edit {record.key!r} (digest {record.digest}) is not available to revert it; "
        "keep deltas with `checkpoint_deltas=True` or `save_delta_to=DIR`"
    )


def delta_to_bytes(delta: EditDelta) -> torch.Tensor:
    """The bytes of ``delta``'s file as a uint8 tensor (which keeps checkpoints loadable with ``weights_only``)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"delta{DELTA_SUFFIX}"
        delta.save(path)
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def delta_from_bytes(payload: torch.Tensor) -> EditDelta:
    """The delta whose file bytes :func:`delta_to_bytes` gave."""
    from lightning_kedit.editing.delta import EditDelta

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"delta{DELTA_SUFFIX}"
        path.write_bytes(payload.numpy().tobytes())
        return EditDelta.load(path)
