"""What the delta's file and adapter formats read of an ``EditDelta``, and build one with (typing protocols).

``delta_file`` and ``peft_adapter`` write and read an :class:`~.delta.EditDelta` without importing it (the
delta imports them for its ``save``/``load``/``to_peft``/``from_peft`` methods): they see it as a
:class:`DeltaView` and build one through a :class:`DeltaClass`, the class passed in by the delta's methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from torch import Tensor, nn

from lightning_kedit.editing.layer_update import LayerUpdate
from lightning_kedit.editing.solvers import LowRankUpdate

__all__ = ["DeltaClass", "DeltaView"]


class DeltaView(Protocol):
    """The read side of an ``EditDelta``: its updates by layer and its metadata."""

    @property
    def method(self) -> str: ...

    @property
    def hparams(self) -> dict[str, Any]: ...

    @property
    def request_ids(self) -> tuple[str, ...]: ...

    @property
    def fingerprint(self) -> dict[str, str]: ...

    @property
    def composed_of(self) -> tuple[str, ...]: ...

    @property
    def base(self) -> dict[int, Tensor]: ...

    @property
    def layers(self) -> list[int]: ...

    def update(self, layer: int) -> LayerUpdate: ...

    def digest(self) -> str: ...


D_co = TypeVar("D_co", bound=DeltaView, covariant=True)


class DeltaClass(Protocol[D_co]):
    """The construction side of an ``EditDelta`` class: its constructor and ``from_model``."""

    def __call__(
        self,
        updates: Sequence[LayerUpdate],
        *,
        method: str,
        hparams: Mapping[str, Any] | Any = ...,
        request_ids: Sequence[str] = ...,
        fingerprint: Mapping[str, str] | None = ...,
        base: Mapping[int, Tensor] | None = ...,
        composed_of: Sequence[str] = ...,
    ) -> D_co: ...

    def from_model(
        self,
        model: nn.Module,
        updates: Mapping[int, Tensor | LowRankUpdate],
        *,
        method: str,
        hparams: Mapping[str, Any] | Any = ...,
        request_ids: Sequence[str] = ...,
        tokenizer: Any = ...,
        fingerprint: Mapping[str, str] | None = ...,
        keep_base: bool = ...,
    ) -> D_co: ...
