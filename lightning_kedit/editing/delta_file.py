"""The file form of an :class:`~.delta.EditDelta`: one safetensors file whose header holds the metadata as JSON.

Tensors are stored as ``layers.<l>.u`` / ``layers.<l>.v`` (low-rank factors) or ``layers.<l>.delta`` (dense),
plus ``layers.<l>.base`` when the base weights are kept. The header holds the format name and version, the
method, hyper-parameters, request ids, model fingerprint, per-layer records (weight name, base and result
hashes, layout) and the delta's content digest, which :func:`load_delta` checks. Writes go to a temporary
file renamed into place, so a killed process never leaves a truncated delta behind.

Example:
    >>> path = save_delta(delta, "edits/capitals.safetensors")  # doctest: +SKIP
    >>> EditDelta.load(path).digest() == delta.digest()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeVar

from lightning_kedit.editing.delta_view import DeltaClass, DeltaView
from lightning_kedit.editing.layer_update import LayerUpdate
from lightning_kedit.editing.solvers import LowRankUpdate
from lightning_kedit.errors import DeltaError, DeltaFileError
from lightning_kedit.files import atomic_save_safetensors
from lightning_kedit.models.fingerprint import weights_hash

__all__ = ["FORMAT", "FORMAT_VERSION", "delta_metadata", "load_delta", "save_delta"]

FORMAT = "lightning_kedit.delta"
FORMAT_VERSION = "1"

D = TypeVar("D", bound=DeltaView)


def delta_metadata(delta: DeltaView) -> dict[str, str]:
    """The header entries of ``delta``'s file (all strings; JSON where structured), without the digest."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": delta.method,
        "hparams": json.dumps(delta.hparams, sort_keys=True),
        "request_ids": json.dumps(list(delta.request_ids)),
        "fingerprint": json.dumps(delta.fingerprint, sort_keys=True),
        "layers": json.dumps([delta.update(layer).record() for layer in delta.layers]),
        "composed_of": json.dumps(list(delta.composed_of)),
    }


def save_delta(delta: DeltaView, path: str | os.PathLike[str], *, with_base: bool = False) -> Path:
    """Write ``delta`` to one safetensors file, atomically (a temporary file renamed into place).

    Args:
        delta: the delta to write.
        path: the file to write (parent folders are created).
        with_base: also store the base weights of the edited layers, for a bit-exact revert from the file.

    Raises:
        DeltaError: ``with_base`` while the base weights of some layer are unknown.
    """
    updates = [delta.update(layer) for layer in delta.layers]
    tensors = {f"layers.{u.layer}.{n}": t.contiguous() for u in updates for n, t in u.tensors().items()}
    if with_base:
        missing = [layer for layer in delta.layers if layer not in delta.base]
        if missing:
            raise DeltaError(
                f"with_base=True needs the base weights of layers {missing}: create the delta with "
                "keep_base=True, or apply it once before saving"
            )
        tensors.update({f"layers.{layer}.base": w.contiguous() for layer, w in delta.base.items()})
    metadata = {**delta_metadata(delta), "digest": delta.digest()}
    path = Path(path)
    return atomic_save_safetensors(tensors, path, metadata)


def load_delta(path: str | os.PathLike[str], cls: DeltaClass[D]) -> D:
    """Read a delta written by :func:`save_delta` as ``cls`` (``EditDelta.load`` passes the class).

    Raises:
        DeltaFileError: the file is missing, not a delta, or its content does not match its digest.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DeltaFileError(f"no delta file at {path}; give the file written by `kedit edit --out`")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise DeltaFileError(f"{path} is not a readable safetensors delta file: {err}") from err
    if metadata.get("format") != FORMAT:
        raise DeltaFileError(f"{path} is not a lightning_kedit delta (format={metadata.get('format')!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise DeltaFileError(f"{path} has delta format version {metadata.get('version')!r}; "
                             f"this version reads {FORMAT_VERSION}")
    try:
        fields = {key: json.loads(metadata[key]) for key in
                  ("hparams", "request_ids", "fingerprint", "layers", "composed_of")}
        records = []
        for entry in fields["layers"]:
            layer = int(entry["layer"])
            prefix = f"layers.{layer}."
            stored: dict[str, Any] = (
                {"matrix": tensors[prefix + "delta"]} if prefix + "delta" in tensors
                else {"factors": LowRankUpdate(tensors[prefix + "u"], tensors[prefix + "v"])}
            )
            records.append(LayerUpdate(layer, entry["weight_name"], entry["base_hash"], entry["result_hash"],
                                       bool(entry["transposed"]), **stored))
        base = {int(k.split(".")[1]): t for k, t in tensors.items() if k.endswith(".base")}
        delta = cls(records, method=metadata["method"], hparams=fields["hparams"],
                    request_ids=fields["request_ids"], fingerprint=fields["fingerprint"], base=base,
                    composed_of=fields["composed_of"])
    except (KeyError, TypeError, ValueError) as err:
        raise DeltaFileError(f"{path} is a damaged delta file (missing or bad entry: {err})") from err
    if delta.digest() != metadata.get("digest"):
        raise DeltaFileError(f"{path} is corrupt: its content does not match the digest in its header")
    bad = [la for la, w in delta.base.items() if weights_hash(w) != delta.update(la).base_hash]
    if bad:
        raise DeltaFileError(f"{path} is corrupt: the stored base weights of layers {bad} do not match their hash")
    return delta
