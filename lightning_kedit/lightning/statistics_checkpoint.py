"""The callback's key statistics in checkpoints: one safetensors file per process beside the checkpoint.

Statistics collected from batches are sums (``Σ k kᵀ``, ``Σ k``, counts) held *per process*: each process adds
the keys of its own batches, and an edit all-reduces them. A checkpoint must therefore hold every process's sums,
each once. :func:`save_statistics_files` (called on every process while a checkpoint is written) writes each
process's local sums to its own content-addressed file ``kedit-statistics-<sha256[:16]>.safetensors`` in the
checkpoint folder, and returns a small reference for the checkpoint: the world size, and per rank the file name
and the SHA-256 of its tensors. :func:`load_statistics_files` (every process, on resume) finds the files (in the
recorded folder, else beside the checkpoint), checks each one's hash, and restores:

- with the same world size, rank ``r`` gets rank ``r``'s sums back: the resumed run adds the same keys in the
  same order as an uninterrupted one, so its statistics and its edit are bit-identical to that run's;
- with another world size, rank 0 gets the sum of all files and the other ranks start from zero: the all-reduce
  of an edit gives the same total (equal up to float64 rounding of the order of the additions).

The checkpoint itself stays small (the reference pickles to about 300 bytes per process). Each file holds, per
edit layer, ``(d² + d) · 8 + 8`` bytes for keys of width ``d`` in float64: 113,321,440 bytes per process for
SmolLM2-135M's default six layers (``d`` = 1536), measured. Files are content-addressed, so checkpoints written
with unchanged statistics share them; deleting a checkpoint does not delete its files.

Example:
    >>> statistics_file_name("0123456789abcdef0123")
    'kedit-statistics-0123456789abcdef.safetensors'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_save_safetensors
from lightning_kedit.statistics import KeyStatistics

__all__ = [
    "FORMAT",
    "load_statistics_files",
    "restore_statistics",
    "save_statistics_files",
    "statistics_file_name",
    "statistics_folder",
]

#: Format tag of the per-process statistics files and of their reference in the checkpoint.
FORMAT = "lightning_kedit.callback_statistics/1"


def statistics_file_name(digest: str) -> str:
    """The file name of statistics whose tensors hash to ``digest``."""
    return f"kedit-statistics-{digest[:16]}.safetensors"


def statistics_folder(trainer: Trainer) -> Path:
    """Where the files go: the folder of the trainer's ``ModelCheckpoint``, else ``default_root_dir``."""
    dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
    return Path(dirpath if dirpath else trainer.default_root_dir).expanduser().resolve()


def _digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype!s}:{tuple(tensor.shape)}:".encode())
        # A copy: viewing a parameter-backed storage through numpy would pin it (no later resize).
        digest.update(tensor.reshape(-1).view(torch.uint8).clone().numpy().tobytes())
    return digest.hexdigest()


def _states(statistics: KeyStatistics) -> dict[str, Tensor]:
    """The metric's states by name (all tensors: every state of ``KeyStatistics`` is a sum)."""
    states = {name: value for name, value in statistics.metric_state.items() if isinstance(value, Tensor)}
    if len(states) != len(statistics.metric_state):
        raise KeditError("KeyStatistics holds a list state; only tensor sums can be checkpointed")
    return states


def _all_gather(trainer: Trainer, value: Any) -> list[Any]:
    """``value`` of every process, by rank (a collective call when several processes run)."""
    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def save_statistics_files(trainer: Trainer, statistics: KeyStatistics) -> dict[str, Any]:
    """Write this process's local sums to its file; returns the reference every process computes alike.

    A collective call under several processes (the file names are exchanged): call it on every process, as
    Lightning does while writing a checkpoint.
    """
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in _states(statistics).items()}
    digest = _digest(tensors)
    folder = statistics_folder(trainer)
    name = statistics_file_name(digest)
    metadata = {"format": FORMAT, "sha256": digest, "layers": ",".join(map(str, statistics.layers)),
                "key_size": str(statistics.key_size)}
    atomic_save_safetensors(tensors, folder / name, metadata)
    counts = {str(layer): int(tensors[f"count_{layer}"]) for layer in statistics.layers}
    files = _all_gather(trainer, {"name": name, "sha256": digest, "tokens": counts})
    return {"format": FORMAT, "world_size": trainer.world_size, "folder": str(folder), "files": files}


def _locate(name: str, folder: str, checkpoint: str | Path | None) -> Path:
    candidates = [Path(folder) / name]
    if checkpoint:
        candidates.append(Path(checkpoint).expanduser().resolve().parent / name)
    for path in candidates:
        if path.is_file():
            return path
    raise KeditError(
        f"the checkpoint's key statistics file {name!r} is in none of {[str(c.parent) for c in candidates]}; "
        "put it beside the checkpoint (it holds the statistics collected before the checkpoint), or resume "
        "with `statistics=` a statistics file or text source"
    )


def _read(path: Path, expected: str, statistics: KeyStatistics) -> dict[str, Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise KeditError(f"key statistics file {str(path)!r} is not readable ({type(err).__name__}: {err})") from err
    if metadata.get("format") != FORMAT or _digest(tensors) != expected:
        raise KeditError(
            f"key statistics file {str(path)!r} is not the one the checkpoint references (its content hash "
            "differs): it was damaged or replaced; restore it, or resume with `statistics=` another source"
        )
    wanted = {name: tuple(value.shape) for name, value in _states(statistics).items()}
    held = {name: tuple(value.shape) for name, value in tensors.items()}
    if held != wanted:
        raise KeditError(
            f"key statistics file {str(path)!r} holds layers {metadata.get('layers')} with key size "
            f"{metadata.get('key_size')}, but this callback edits layers {statistics.layers} with key size "
            f"{statistics.key_size}; resume with the callback's original `layers`"
        )
    return tensors


def load_statistics_files(
    trainer: Trainer, statistics: KeyStatistics, reference: Mapping[str, Any], checkpoint: str | Path | None
) -> None:
    """Restore ``statistics`` from the files of ``reference`` (see the module docstring); every process calls it.

    Raises:
        KeditError: a file is missing, damaged, or holds other layers; the reference has an unknown format.
    """
    if reference.get("format") != FORMAT:
        raise KeditError(f"the checkpoint's key statistics have format {reference.get('format')!r}, not {FORMAT!r}")
    files = list(reference["files"])
    saved_world = int(reference["world_size"])
    if saved_world == trainer.world_size:
        mine = [files[trainer.global_rank]]
    else:
        mine = files if trainer.global_rank == 0 else []
        rank_zero_info(
            f"KnowledgeEditCallback: resuming {saved_world} processes' key statistics on {trainer.world_size}: "
            "rank 0 continues from their sum"
        )
    totals = {name: torch.zeros_like(value) for name, value in _states(statistics).items()}
    for entry in mine:
        path = _locate(str(entry["name"]), str(reference["folder"]), checkpoint)
        for name, value in _read(path, str(entry["sha256"]), statistics).items():
            totals[name] += value.to(totals[name])
    with torch.no_grad():
        for name, value in totals.items():
            getattr(statistics, name).copy_(value)
    statistics._update_count = 1  # the states hold data: no "compute before update" warning
    statistics._computed = None


def restore_statistics(trainer: Trainer, statistics: KeyStatistics, state: Mapping[str, Any]) -> None:
    """Restore ``statistics`` from the callback's checkpoint ``state``, whichever way it holds them.

    ``statistics_files`` is a reference to per-process files (:func:`load_statistics_files`). Checkpoints written
    before it hold one process's sums inline (``statistics``): rank 0 continues from them, the others from zero,
    which is exact when they came from a single process.
    """
    if "statistics_files" in state:
        load_statistics_files(trainer, statistics, state["statistics_files"], trainer.ckpt_path)
    elif "statistics" in state and trainer.global_rank == 0:
        statistics.load_state_dict(state["statistics"])
