"""Key statistics from served traffic: the MLP keys of the prompts a generation worker serves.

Each generation worker with ``traffic_statistics`` on hooks the edit layers' MLP output projections, records the
keys of each prompt's first forward pass (the prompt itself, not the generated tokens), and writes its running
sums to ``<history>/traffic/<worker>.safetensors`` with the atomic writer every ``flush_every`` prompts. The
editing worker adds every worker's file to the base statistics (:func:`merged_statistics`): the second moment
``C`` MEMIT uses then reflects what the model actually serves, as the Lightning callback does with
``predict`` batches.

Example:
    >>> traffic = TrafficStatistics(model, [4, 5, 6], store.traffic_dir / "w0.safetensors")  # doctest: +SKIP
    >>> with traffic.prompt():  # doctest: +SKIP
    ...     generate(...)
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.statistics import KeyStatistics, track_keys

__all__ = ["TrafficStatistics", "merged_statistics"]


class TrafficStatistics:
    """Running key statistics of the prompts one worker serves, flushed to a file now and then.

    Args:
        model: the served model.
        layers: the edit layers.
        path: this worker's file.
        fingerprint: the model fingerprint stored in the file.
        flush_every: write the file after this many prompts.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], path: str | Path,
                 fingerprint: dict[str, str] | None = None, flush_every: int = 16) -> None:
        self.statistics = KeyStatistics(list(layers), ModelAdapter.for_model(model).key_size)
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.flush_every = max(1, flush_every)
        self._pending = 0
        self._hooks = ExitStack()
        self._tracker = self._hooks.enter_context(track_keys(model, self.statistics))
        self._tracker.enabled = False
        self._first_call = self._hooks.enter_context(_first_forward_only(model, self._tracker))

    @contextmanager
    def prompt(self) -> Iterator[None]:
        """Record the keys of the first forward pass inside the block (the prompt's), then flush if due."""
        self._first_call.armed = True
        try:
            yield
        finally:
            self._first_call.armed = False
            self._tracker.enabled = False
            self._pending += 1
            if self._pending >= self.flush_every:
                self.flush()

    def flush(self) -> None:
        """Write the running sums to :attr:`path` (atomically)."""
        if self._pending:
            self.statistics.save(self.path, self.fingerprint, source="served prompts")
            self._pending = 0

    def close(self) -> None:
        """Flush and remove the hooks."""
        self.flush()
        self._hooks.close()


class _FirstCall:
    armed = False


@contextmanager
def _first_forward_only(model: nn.Module, tracker: Any) -> Iterator[_FirstCall]:
    """While armed, enable ``tracker`` for the next forward pass of ``model`` only."""
    state = _FirstCall()

    def before(module: nn.Module, args: Any) -> None:
        tracker.enabled = state.armed
        state.armed = False

    handle = model.register_forward_pre_hook(before)
    try:
        yield state
    finally:
        handle.remove()


def merged_statistics(base: KeyStatistics, folder: Path) -> KeyStatistics:
    """``base`` plus every traffic file in ``folder`` (a copy; ``base`` is unchanged).

    Raises:
        KeditError: a traffic file is unreadable or holds other layers.
    """
    merged = copy.deepcopy(base)
    for path in sorted(folder.glob("*.safetensors")):
        traffic = KeyStatistics.load(path, layers=base.layers, force=True)
        traffic.fingerprint = None
        merged.merge(traffic)
    return merged
