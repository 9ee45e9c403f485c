"""Keep a model at the history's committed version: called between request batches, never inside one.

Every process that holds the model (each generation worker, the editing worker) owns a
:class:`WeightsFollower`. :meth:`WeightsFollower.sync` costs one ``stat`` of the manifest when nothing was
committed. When the committed active edits differ from the model's, it reverts the model back to their common
prefix with :meth:`EditHistory.revert <lightning_kedit.editing.history.EditHistory.revert>` (bit-exact: the
weights are replayed from the model's own weights before the first edit) and applies the missing deltas, each
checked against the weights it was computed on. If any step fails, the model is put back where it was and
keeps serving its previous version, which it keeps reporting: a model never serves a version it does not
exactly hold.

Example:
    >>> follower = WeightsFollower(model, HistoryStore("history"))  # doctest: +SKIP
    >>> version = follower.sync()  # between two batches  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter

from .store import HistoryStore, Manifest

__all__ = ["WeightsFollower"]

log = logging.getLogger(__name__)


class WeightsFollower:
    """Brings one model to the committed version of a :class:`~.store.HistoryStore`.

    Args:
        model: the served model, with its own (unedited) weights.
        store: the history folder.

    Attributes:
        version: the version the model's weights hold now.
        active: the ids of the edits applied to the model, in order.
    """

    def __init__(self, model: nn.Module, store: HistoryStore) -> None:
        self.model = model
        self.store = store
        self.version = 0
        self.active: list[str] = []
        self._history = EditHistory()
        self._deltas: dict[str, EditDelta] = {}
        self._stamp: Any = None
        self._adapter = ModelAdapter.for_model(model)

    def sync(self) -> int:
        """Bring the model to the committed version (call between batches); returns the version it holds.

        A manifest that cannot be read or a delta that cannot be applied is logged, and the model keeps its
        current version (retried at the next call).
        """
        try:
            stamp, manifest = self.store.read_if_changed(self._stamp)
        except KeditError as err:
            log.error("kedit serve: the history manifest cannot be read, serving version %d: %s", self.version, err)
            return self.version
        if manifest is not None:
            try:
                self.move_to(manifest)
            except Exception as err:  # any failure: keep the exact previous version
                log.error("kedit serve: cannot reach version %d, serving version %d: %s", manifest.version,
                          self.version, err)
                return self.version
            self._stamp = stamp
        return self.version

    def move_to(self, manifest: Manifest) -> None:
        """Apply ``manifest``'s active edits to the model (all or nothing).

        Raises:
            KeditError: a delta file is missing or does not fit the model; the model is unchanged.
        """
        if manifest.active == self.active:
            self.version = manifest.version
            return
        deltas = {i: self._delta(i) for i in manifest.active if i not in self._deltas}  # all I/O first
        self._deltas.update(deltas)
        common = 0
        while (common < min(len(self.active), len(manifest.active))
               and self.active[common] == manifest.active[common]):
            common += 1
        previous = list(self.active)
        try:
            self._replace_tail(common, manifest.active[common:])
        except BaseException:
            self._replace_tail(common, previous[common:], force_revert=True)
            raise
        self.version = manifest.version

    def adopt(self, edit_id: str, delta: EditDelta, version: int) -> None:
        """Record ``delta``, already applied to the model by the caller and committed as ``edit_id``."""
        self._history.push(delta, model=self.model)  # ``delta.apply`` kept the weights before it
        self._deltas[edit_id] = delta
        self.active.append(edit_id)
        self.version = version

    def _delta(self, edit_id: str) -> EditDelta:
        return self.store.load_delta(edit_id)

    def _replace_tail(self, common: int, tail: list[str], *, force_revert: bool = False) -> None:
        """Revert the edits after the first ``common`` and apply ``tail`` after them."""
        undo = len(self._history) - common
        if undo > 0:
            self._history.revert(self.model, undo, force=force_revert)
        del self.active[common:]
        for edit_id in tail:
            delta = self._deltas[edit_id]
            initial: dict[int, Tensor] = {
                layer: self._adapter.weight(layer).detach().cpu().clone()
                for layer in delta.layers if layer not in self._history.layers
            }
            delta.apply(self.model)
            self._history.push(delta, initial=initial)
            self.active.append(edit_id)
