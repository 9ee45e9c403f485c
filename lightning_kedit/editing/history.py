"""The record of a sequence of edits: every delta in order, and the keys each one wrote, per layer.

A sequential run (:func:`~lightning_kedit.editing.sequential.edit_sequentially`) applies batch after batch,
each computed on the weights the previous ones left. :class:`EditHistory` keeps

- the deltas, in order: batch ``i`` was computed on the weights that batches ``1..i−1`` produced, which the
  deltas' base and result hashes check;
- the keys each batch wrote at each layer, which AlphaEdit needs to keep earlier edits (the ``K_p`` of its
  update, :mod:`.nullspace`);
- the weights before the first batch, per edited layer.

Because applying a delta is deterministic (the sum is formed in float64 and cast to the weight's dtype), the
weights after batch ``m`` are recomputed bit for bit by replaying batches ``1..m`` on the first weights: that
is how :meth:`EditHistory.revert` undoes the last ``k`` batches exactly, also after a save and load.

Example:
    >>> history = EditHistory()
    >>> delta = edit(model, tokenizer, requests[:100], method="memit")  # doctest: +SKIP
    >>> history.push(delta)  # doctest: +SKIP
    >>> history.revert(model, 1)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_kedit.errors import KeditError
from lightning_kedit.files import atomic_save_safetensors, atomic_write_json
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import weights_hash

from .delta import DeltaFileError, EditDelta
from .weight_edits import temporary_updates

__all__ = ["EditHistory", "HistoryEntry", "HistoryError"]

FORMAT = "lightning_kedit.history"
FORMAT_VERSION = "1"


class HistoryError(KeditError):
    """A history that does not fit the model or the delta given, or a history folder that cannot be read."""


@dataclass(frozen=True)
class HistoryEntry:
    """One batch of a sequence: its delta, the keys it wrote (``(n, key_size)`` float64 per layer), and named
    method state (``extras``: e.g. the lifelong method's running-statistics sums of the batch)."""

    delta: EditDelta
    keys: dict[int, Tensor] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)


class EditHistory:
    """Deltas applied one after another, the keys they wrote, and the weights before the first one.

    Example:
        >>> history = EditHistory()
        >>> len(history), history.num_edits
        (0, 0)
    """

    def __init__(self) -> None:
        self._entries: list[HistoryEntry] = []
        self._initial: dict[int, Tensor] = {}
        self._current: dict[int, Tensor] = {}  # the weights after every batch, replayed from ``_initial``

    # ------------------------------------------------------------------ content
    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[HistoryEntry]:
        return iter(self._entries)

    def __getitem__(self, index: int) -> HistoryEntry:
        return self._entries[index]

    def __repr__(self) -> str:
        return f"EditHistory(batches={len(self)}, edits={self.num_edits}, layers={self.layers})"

    @property
    def deltas(self) -> list[EditDelta]:
        """The deltas, in the order they were applied."""
        return [entry.delta for entry in self._entries]

    @property
    def num_edits(self) -> int:
        """The number of requests written by all batches."""
        return sum(len(entry.delta.request_ids) for entry in self._entries)

    @property
    def request_ids(self) -> list[str]:
        """The ids of every request written, in order."""
        return [i for entry in self._entries for i in entry.delta.request_ids]

    @property
    def layers(self) -> list[int]:
        """Every layer some batch edited, ascending."""
        return sorted(self._initial)

    def keys(self, layer: int) -> Tensor:
        """The keys all batches wrote at ``layer``, ``(n, key_size)`` float64 (``n`` may be 0)."""
        parts = [entry.keys[layer] for entry in self._entries if layer in entry.keys]
        if not parts:
            return torch.zeros(0, 0, dtype=torch.float64)
        return torch.cat(parts)

    def gram(self, layer: int) -> Tensor | None:
        """``Σ k kᵀ`` over the keys written at ``layer`` (``K_p K_pᵀ`` of AlphaEdit), or None when there are none."""
        keys = self.keys(layer)
        return keys.T @ keys if keys.numel() else None

    # ------------------------------------------------------------------ recording
    def push(self, delta: EditDelta, keys: Mapping[int, Tensor] | None = None, *, model: nn.Module | None = None,
             initial: Mapping[int, Tensor] | None = None, extras: Mapping[str, Tensor] | None = None) -> None:
        """Record ``delta``, which must just have been applied on top of the previous batches.

        Args:
            delta: the batch's delta, computed on the weights the previous batches produced.
            keys: the keys the batch wrote, ``(n, key_size)`` per layer (needed by AlphaEdit).
            model: the model the delta was applied to; gives the weights before the delta for layers no
                earlier batch edited, when ``initial`` does not.
            initial: the stored-layout weights of newly edited layers before this delta.
            extras: named float64 tensors of method state the batch contributes (saved and reverted with it).

        Raises:
            HistoryError: the delta was not computed on the weights the previous batches produced, or the
                weights before it are unknown for a newly edited layer.
        """
        for layer in delta.layers:
            update = delta.update(layer)
            if layer in self._current:
                expected = weights_hash(self._current[layer])
                if update.base_hash != expected:
                    raise HistoryError(
                        f"batch {len(self) + 1} at layer {layer} was computed on weights (hash "
                        f"{update.base_hash[:12]}) other than those the previous batches left ({expected[:12]}); "
                        "compute each batch on the model as the previous batches left it"
                    )
        fresh: dict[int, Tensor] = {}
        for layer in delta.layers:
            if layer in self._initial:
                continue
            weight = self._initial_weight(delta, layer, model, initial)
            if weights_hash(weight) != delta.update(layer).base_hash:
                raise HistoryError(f"the weights given for layer {layer} are not those the delta was computed on")
            fresh[layer] = weight
        self._initial.update(fresh)
        self._current.update({layer: w.clone() for layer, w in fresh.items()})
        for layer in delta.layers:
            self._current[layer] = delta.update(layer).applied_to(self._current[layer])
        stored = {int(layer): k.detach().to("cpu", torch.float64).contiguous() for layer, k in (keys or {}).items()}
        more = {str(name): t.detach().to("cpu", torch.float64).contiguous() for name, t in (extras or {}).items()}
        self._entries.append(HistoryEntry(delta, stored, more))

    @staticmethod
    def _initial_weight(delta: EditDelta, layer: int, model: nn.Module | None,
                        initial: Mapping[int, Tensor] | None) -> Tensor:
        if initial is not None and layer in initial:
            return initial[layer].detach().cpu().clone()
        if layer in delta.base:
            return delta.base[layer].detach().cpu().clone()
        if model is not None:  # pushed before applying: the model still holds the weights before it
            weight = ModelAdapter.for_model(model).weight(layer).detach().cpu()
            if weights_hash(weight) == delta.update(layer).base_hash:
                return weight.clone()
        raise HistoryError(
            f"the weights of layer {layer} before batch 1 that edits it are unknown; push the delta right "
            "after applying it with `delta.apply(model)` (which keeps them), or pass `initial`"
        )

    # ------------------------------------------------------------------ replay and revert
    def changed_layers(self, model: nn.Module) -> list[int]:
        """The edited layers whose weights in ``model`` are not what the recorded batches left (``[]``: all are).

        Example:
            >>> EditHistory().changed_layers(model)  # doctest: +SKIP
            []
        """
        adapter = ModelAdapter.for_model(model)
        return [layer for layer, w in self._current.items() if not torch.equal(adapter.weight(layer).detach().cpu(), w)]

    def weights_after(self, batches: int) -> dict[int, Tensor]:
        """The stored-layout weights of every edited layer after the first ``batches`` batches, bit-exact.

        Layers no batch had edited by then hold their weights before the sequence.
        """
        if not 0 <= batches <= len(self):
            raise HistoryError(f"`batches` must lie in [0, {len(self)}], got {batches}")
        weights = {layer: w.clone() for layer, w in self._initial.items()}
        for entry in self._entries[:batches]:
            for layer in entry.delta.layers:
                weights[layer] = entry.delta.update(layer).applied_to(weights[layer])
        return weights

    @contextlib.contextmanager
    def weights_before(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with, inside the block, the weights before the first batch; the current ones after, bit-exact.

        What was computed from the unedited model (key statistics, cached by its fingerprint) can be found again
        when a sequence is resumed on the edited one.

        Example:
            >>> with history.weights_before(model):  # doctest: +SKIP
            ...     statistics = load_or_collect_statistics(model, tokenizer, layers)
        """
        adapter = ModelAdapter.for_model(model)
        with temporary_updates(adapter, list(self._initial)):  # puts the current weights back on exit
            with torch.no_grad():
                for layer, weight in self._initial.items():
                    param = adapter.weight(layer)
                    param.copy_(weight.to(param.device))
            yield model

    def revert(self, model: nn.Module, k: int = 1, *, force: bool = False) -> None:
        """Undo the last ``k`` batches: the edited layers get, bit for bit, the weights after batch ``n − k``.

        Args:
            model: the model the whole sequence was applied to.
            k: how many batches to undo (``len(history)`` undoes them all).
            force: write the weights even when the model's current ones are not what the sequence produced.

        Raises:
            HistoryError: ``k`` out of range, or (without ``force``) weights changed since the last batch.
        """
        if not 0 <= k <= len(self):
            raise HistoryError(f"`k` must lie in [0, {len(self)}] (the batches recorded), got {k}")
        if k == 0:
            return
        adapter = ModelAdapter.for_model(model)
        adapter.check_layers(self.layers)
        if not force:
            changed = self.changed_layers(model)
            if changed:
                raise HistoryError(
                    f"layer(s) {changed}: the model's weights are not those the {len(self)} recorded batches left "
                    "(another edit since?); revert that first, or pass force=True"
                )
        target = self.weights_after(len(self) - k)
        params = {layer: adapter.weight(layer) for layer in target}
        originals = {layer: p.detach().clone() for layer, p in params.items()}
        try:
            with torch.no_grad():
                for layer, weight in target.items():
                    params[layer].copy_(weight.to(params[layer].device))
        except BaseException:
            with torch.no_grad():
                for layer, weight in originals.items():
                    params[layer].copy_(weight)
            raise
        self._forget_after(len(self) - k, target)

    def truncate(self, batches: int) -> None:
        """Forget every batch after the first ``batches``; no model's weights change.

        For weights that were put back to those after ``batches`` batches by other means (a checkpoint
        older than the history, say); :meth:`revert` writes the weights as well.

        Raises:
            HistoryError: ``batches`` outside ``[0, len(history)]``.

        Example:
            >>> history = EditHistory()
            >>> history.truncate(0)
            >>> len(history)
            0
        """
        self._forget_after(batches, self.weights_after(batches))

    def _forget_after(self, batches: int, weights: dict[int, Tensor]) -> None:
        del self._entries[batches:]
        still = {layer for entry in self._entries for layer in entry.delta.layers}
        self._initial = {layer: w for layer, w in self._initial.items() if layer in still}
        self._current = {layer: w for layer, w in weights.items() if layer in still}

    # ------------------------------------------------------------------ files
    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write the history to ``folder``: one delta file per batch, the keys, the first weights, an index.

        The index (``history.json``) is written last through a temporary file, so an interrupted save leaves
        the previous index, which only names files that were complete.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for index, entry in enumerate(self._entries):
            name = f"batch_{index + 1:05d}_{entry.delta.digest()[:12]}"
            # A batch's files are named by its delta's digest and each is written atomically, so one that is
            # present is complete and belongs to that delta: a save writes only the batches new since the last
            # one (a long sequence saved after every batch stays linear in the number of batches).
            if not (folder / f"{name}.delta.safetensors").is_file():
                entry.delta.save(folder / f"{name}.delta.safetensors")
            if not (folder / f"{name}.keys.safetensors").is_file():
                atomic_save_safetensors({f"layers.{la}": k for la, k in entry.keys.items()},
                                        folder / f"{name}.keys.safetensors")
            if entry.extras and not (folder / f"{name}.extras.safetensors").is_file():
                atomic_save_safetensors(dict(entry.extras), folder / f"{name}.extras.safetensors")
            names.append(name)
        atomic_save_safetensors({f"layers.{la}": w.contiguous() for la, w in self._initial.items()},
                                folder / "initial.safetensors")
        index_data = {"format": FORMAT, "version": FORMAT_VERSION, "batches": names,
                      "initial_hashes": {str(la): weights_hash(w) for la, w in self._initial.items()}}
        atomic_write_json(folder / "history.json", index_data, indent=1)
        # Batches reverted or truncated since an earlier save into this folder: their files are no longer named by
        # the index, and are removed only now that the new index is in place.
        for stale in folder.glob("batch_*.safetensors"):
            if stale.name.split(".")[0] not in names:
                stale.unlink(missing_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> EditHistory:
        """Read a history written by :meth:`save`; every delta is checked against the one before it.

        Raises:
            HistoryError: the folder holds no history, or a file is missing, corrupt or out of sequence.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        index_path = folder / "history.json"
        if not index_path.is_file():
            raise HistoryError(f"no edit history in {folder} (history.json is missing); give the folder written "
                               "by EditHistory.save or edit_sequentially(save_dir=...)")
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
                raise HistoryError(f"{index_path} is not a version-{FORMAT_VERSION} lightning_kedit history")
            initial = {int(k.split(".")[1]): t for k, t in load_file(str(folder / "initial.safetensors")).items()}
            history = cls()
            for name in index["batches"]:
                delta = EditDelta.load(folder / f"{name}.delta.safetensors")
                keys = {int(k.split(".")[1]): t for k, t in
                        load_file(str(folder / f"{name}.keys.safetensors")).items()}
                extras_path = folder / f"{name}.extras.safetensors"
                extras = load_file(str(extras_path)) if extras_path.is_file() else None
                history.push(delta, keys, initial=initial, extras=extras)
        except DeltaFileError as err:
            raise HistoryError(f"{folder}: {err}") from err
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise HistoryError(f"{folder} holds a damaged edit history ({type(err).__name__}: {err})") from err
        hashes = {str(la): weights_hash(w) for la, w in history._initial.items()}
        if hashes != index.get("initial_hashes"):
            raise HistoryError(f"{folder} is corrupt: its first weights do not match the hashes of its index")
        return history

