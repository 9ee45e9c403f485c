"""Write an edited model as a GGUF file (llama.cpp, Ollama): the source GGUF with the edited tensors replaced.

Every metadata entry and every untouched tensor is copied from the source GGUF byte for byte (quantised blocks
stay quantised, and Llama's q/k weights keep llama.cpp's row order). Each edited MLP output projection
(``blk.{L}.ffn_down.weight``) is dequantised, gets the delta's update added in float64 (``W + ΔW``, the same
sum :meth:`~lightning_kedit.editing.delta.EditDelta.apply` computes on the model converted from that file)
and is written in F32 (lossless) or F16. Re-quantising to the source type is not done: the edit's update is
small next to a 4-bit quantisation step and would be largely lost.

Example:
    >>> from lightning_kedit.models.gguf_export import export_gguf  # doctest: +SKIP
    >>> export_gguf("model.gguf", delta, "edited.gguf")             # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_path

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta

__all__ = ["GGUF_PROJECTIONS", "GGUFExportError", "export_gguf"]

# Hugging Face weight name of the edit projection -> GGUF tensor name, per GGUF architecture (llama.cpp's names;
# these architectures store ffn_down unpermuted, ``out x in`` as numpy rows).
GGUF_PROJECTIONS: dict[str, tuple[str, str]] = {
    arch: ("model.layers.{layer}.mlp.down_proj.weight", "blk.{layer}.ffn_down.weight")
    for arch in ("llama", "qwen2", "qwen3", "mistral")
}


class GGUFExportError(KeditError):
    """The model or delta cannot be written as a GGUF file."""


def _copy_fields(reader: Any, writer: Any) -> None:
    """Every key/value of ``reader`` into ``writer`` with its original type (GGUF.* and the architecture are
    written by the writer itself)."""
    from gguf import GGUFValueType

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(name, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, field.contents(), vtype)


def export_gguf(
    source: str | os.PathLike[str], delta: EditDelta, out: str | os.PathLike[str], *, dtype: str = "f32",
    force: bool = False,
) -> dict[str, Any]:
    """Write ``source`` with ``delta`` applied to ``out``, atomically; returns what was replaced.

    Args:
        source: the GGUF file the edited model was loaded from.
        delta: the edit, computed on the model converted from ``source``.
        out: the ``.gguf`` file to write.
        dtype: ``"f32"`` (exact) or ``"f16"`` for the edited tensors.
        force: write even when a dequantised base tensor's hash differs from the delta's base hash.

    Raises:
        GGUFExportError: no projection mapping for the file's architecture, a tensor missing, other base
            weights, or a bad ``dtype``; nothing is written.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
    from gguf.quants import dequantize

    from lightning_kedit.models.fingerprint import weights_hash

    if dtype not in ("f32", "f16"):
        raise GGUFExportError(f"dtype {dtype!r} is not supported; use 'f32' (exact) or 'f16'")
    reader = GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    if arch not in GGUF_PROJECTIONS:
        raise GGUFExportError(f"{str(source)!r} is a {arch!r} GGUF; edits can be written into "
                              f"{sorted(GGUF_PROJECTIONS)} GGUF files only (export --format hf instead)")
    hf_name, gguf_name = GGUF_PROJECTIONS[arch]
    tensors = {t.name: t for t in reader.tensors}
    edited: dict[str, np.ndarray] = {}
    for layer in delta.layers:  # every edited tensor is computed and checked before the file is opened
        update = delta.update(layer)
        name = gguf_name.format(layer=layer)
        if update.weight_name != hf_name.format(layer=layer) or name not in tensors:
            raise GGUFExportError(f"the delta edits {update.weight_name}, which has no tensor in {str(source)!r} "
                                  f"({name} expected): the delta was made for another architecture")
        tensor = tensors[name]
        base = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))  # a copy
        if tuple(base.shape) != update.shape:
            raise GGUFExportError(f"{name} is {tuple(base.shape)} but the delta's update is {update.shape}")
        if weights_hash(base) != update.base_hash and not force:
            raise GGUFExportError(
                f"the delta was computed on base weights with hash {update.base_hash} at {update.weight_name}, "
                f"but {str(source)!r} dequantises to {weights_hash(base)}: export with the GGUF the edit was "
                "made on, or pass --force"
            )
        new = update.applied_to(base)  # W + ΔW in float64, cast to float32
        edited[name] = new.numpy().astype(np.float16 if dtype == "f16" else np.float32)
    out_path = Path(out)
    with atomic_path(out_path) as tmp:
        writer = GGUFWriter(str(tmp), arch)
        _copy_fields(reader, writer)
        for tensor in reader.tensors:
            if tensor.name in edited:
                writer.add_tensor(tensor.name, edited[tensor.name])
            else:  # raw bytes and type as in the source (a quantised tensor's array is its byte rows)
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=GGMLQuantizationType(tensor.tensor_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out_path), "replaced": sorted(edited), "dtype": dtype, "bytes": out_path.stat().st_size}
