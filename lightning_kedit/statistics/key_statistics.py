"""``KeyStatistics``: the second moment C = E[k kᵀ] of MLP keys, per edit layer, as a torchmetrics ``Metric``.

MEMIT and ROME weight their update by C, the second moment of the keys ``k`` (the inputs of the MLP output
projection) over generic text (MEMIT eq. 14: ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹``). This metric holds, per layer, the
running sum ``S = Σ k kᵀ`` (float64 by default; only its lower triangle is accumulated, see
:func:`accumulate_outer`), the running sum of keys ``Σ k`` and the key count ``n``; ``compute`` returns
``C = S / n``. All states reduce by sum, so statistics from several processes, files or
runs add up exactly (``merge``), and the file written by ``save`` keeps the sums, not the ratios.

Distributed reduction: torchmetrics 1.9's ``Metric._sync_dist`` gathers every state from every process
(``gather_all_tensors``: W copies of each d×d matrix on every process) and only then sums them. For the
d×d sums here that is W times the memory and traffic needed, so ``_sync_dist`` is overridden to reduce
each state in place with one ``torch.distributed.all_reduce(SUM)`` (torchmetrics has already cloned the
local states into its unsync cache, so the in-place reduction is safe). A user-supplied ``dist_sync_fn``
keeps torchmetrics' own gather-then-reduce path.

Example:
    >>> stats = KeyStatistics(layers=[0], key_size=2)
    >>> stats.update(0, torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    >>> stats.compute()[0]
    tensor([[1., 1.],
            [1., 2.]], dtype=torch.float64)
    >>> stats.count(0)
    2
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_kedit.errors import KeditError, StatisticsMismatchError
from lightning_kedit.files import atomic_save_safetensors

__all__ = ["FORMAT", "KeyStatistics", "accumulate_outer", "symmetric_from_lower"]

#: Format tag written into every statistics file.
FORMAT = "lightning_kedit.key_statistics/1"

_FLOAT_DTYPES = (torch.float64, torch.float32)


def accumulate_outer(total: Tensor, keys: Tensor, block: int = 192, product_dtype: torch.dtype | None = None) -> None:
    """Add the lower triangle of ``keysᵀ keys`` (the sum of the rows' outer products k kᵀ) to ``total``.

    ``keysᵀ keys`` is symmetric, so only the blocks on and below the diagonal are formed: column blocks of
    ``block`` keys, each multiplied with the keys up to its end. That is about half the multiply-adds of a
    full product (a blocked SYRK, which torch does not expose). Only the lower triangle of ``total`` is
    meaningful afterwards: read it with :func:`symmetric_from_lower`.

    By default the products are formed in ``total``'s dtype, so float64 totals of float32 keys are exact
    products summed in float64. ``product_dtype=torch.float32`` forms each call's block products in float32
    (about twice as fast; relative error ~1e-7 per call) and still adds them up in ``total``'s dtype.

    Example:
        >>> total = torch.zeros(3, 3, dtype=torch.float64)
        >>> keys = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]])
        >>> accumulate_outer(total, keys, block=1)
        >>> torch.equal(symmetric_from_lower(total), (keys.T @ keys).double())
        True
    """
    exact = product_dtype is None or product_dtype == total.dtype
    keys = keys.to(dtype=total.dtype if exact else product_dtype)
    width = keys.shape[1]
    for start in range(0, width, block):
        stop = min(start + block, width)
        if exact:
            total[start:stop, :stop].addmm_(keys[:, start:stop].T, keys[:, :stop])
        else:  # in-place add into the wider dtype: no float64 copy of the product
            total[start:stop, :stop].add_(keys[:, start:stop].T @ keys[:, :stop])


def symmetric_from_lower(total: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is that of ``total``.

    Example:
        >>> symmetric_from_lower(torch.tensor([[1.0, 9.0], [2.0, 3.0]]))
        tensor([[1., 2.],
                [2., 3.]])
    """
    return torch.tril(total) + torch.tril(total, diagonal=-1).T


class KeyStatistics(Metric):
    """Running second moment ``C = E[k kᵀ]`` of the keys of several layers.

    Args:
        layers: the layer indices whose keys are recorded (sorted, de-duplicated).
        key_size: the width of the keys (the MLP output projection's input size).
        dtype: the accumulation dtype, ``torch.float64`` (default) or ``torch.float32`` for very wide MLPs.
        product_dtype: the dtype of each batch's products ``kᵀk`` before they are added up; ``None`` (default)
            is ``dtype`` (exact float64 products), ``torch.float32`` is about twice as fast for the products
            (relative error ~1e-7, still 100x below float32 accumulation), see :func:`accumulate_outer`.
        kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ``process_group``, ...).

    Attributes:
        layers: the layers, as a sorted list.
        key_size: the key width.
        fingerprint: the model fingerprint the statistics were made for, when loaded from a file.
        source: a description of the data they come from, when known.

    Example:
        >>> stats = KeyStatistics([4, 5], key_size=3)
        >>> stats.update(4, torch.randn(10, 3))
        >>> stats.count(4), stats.count(5)
        (10, 0)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        layers: Sequence[int],
        key_size: int,
        dtype: torch.dtype = torch.float64,
        *,
        product_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        checked = sorted({int(layer) for layer in layers})
        if not checked or checked[0] < 0:
            raise KeditError(f"`layers` must be a non-empty list of non-negative layer indices, got {list(layers)}")
        if not isinstance(key_size, int) or isinstance(key_size, bool) or key_size < 1:
            raise KeditError(f"`key_size` must be a positive int, got {key_size!r}")
        if dtype not in _FLOAT_DTYPES:
            raise KeditError(f"`dtype` must be torch.float64 or torch.float32, got {dtype}")
        if product_dtype is not None and product_dtype not in _FLOAT_DTYPES:
            raise KeditError(f"`product_dtype` must be None, torch.float64 or torch.float32, got {product_dtype}")
        self.layers: list[int] = checked
        self.key_size = key_size
        self.state_dtype = dtype
        self.product_dtype = product_dtype or dtype
        self.fingerprint: dict[str, str] | None = None
        self.source: str | None = None
        for layer in checked:
            self.add_state(f"sum_kk_{layer}", torch.zeros(key_size, key_size, dtype=dtype), dist_reduce_fx="sum")
            self.add_state(f"sum_k_{layer}", torch.zeros(key_size, dtype=dtype), dist_reduce_fx="sum")
            self.add_state(f"count_{layer}", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        # torchmetrics keeps a copy of every default for reset(): a d×d zero matrix per layer. A zero-stride
        # view of one scalar resets the same (reset clones it into a dense tensor) and costs no memory.
        for name, default in self._defaults.items():
            if isinstance(default, Tensor):
                self._defaults[name] = torch.zeros((), dtype=default.dtype).expand(default.shape)

    # ----------------------------------------------------------------------------------------------- states
    def _check_layer(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeditError(f"layer {layer} is not tracked by these statistics; they hold layers {self.layers}")
        return int(layer)

    def _sum_kk(self, layer: int) -> Tensor:
        return getattr(self, f"sum_kk_{layer}")

    def _sum_k(self, layer: int) -> Tensor:
        return getattr(self, f"sum_k_{layer}")

    def _count(self, layer: int) -> Tensor:
        return getattr(self, f"count_{layer}")

    def _reduced(self) -> AbstractContextManager[None]:
        """States summed over processes inside the block (a collective call when distributed), local after."""
        return self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=True)

    def update(self, layer: int, keys: Tensor) -> None:  # type: ignore[override]
        """Add the keys of one layer: ``keys`` is ``(n, key_size)``, one row per (valid) token."""
        layer = self._check_layer(layer)
        if keys.ndim != 2 or keys.shape[1] != self.key_size:
            raise KeditError(f"`keys` of layer {layer} must have shape (n, {self.key_size}), got {tuple(keys.shape)}")
        total = self._sum_kk(layer)
        keys = keys.detach().to(device=total.device, dtype=self.state_dtype)
        accumulate_outer(total, keys, product_dtype=self.product_dtype)
        self._sum_k(layer).add_(keys.sum(dim=0))
        self._count(layer).add_(keys.shape[0])

    def _moment(self, layer: int) -> Tensor:
        n = int(self._count(layer))
        if n == 0:
            raise KeditError(
                f"no keys were recorded for layer {layer}: run some text through the model first "
                "(collect_key_statistics, or a forward pass inside track_keys)"
            )
        return symmetric_from_lower(self._sum_kk(layer)).to(torch.float64) / n

    def compute(self) -> dict[int, Tensor]:
        """``{layer: C}`` with ``C = Σ k kᵀ / n`` in float64.

        In a distributed run the sums of all processes are used (an all-reduce: every process must call it,
        as for :meth:`second_moment`, :meth:`mean`, :meth:`count` and :meth:`save`); afterwards each process
        goes on accumulating its own keys.
        """
        return {layer: self._moment(layer) for layer in self.layers}

    def second_moment(self, layer: int) -> Tensor:
        """C of one layer, float64 ``(key_size, key_size)``."""
        layer = self._check_layer(layer)
        with self._reduced():
            return self._moment(layer)

    def mean(self, layer: int) -> Tensor:
        """The mean key ``E[k]`` of one layer, float64 ``(key_size,)`` (``C - μμᵀ`` is the covariance)."""
        layer = self._check_layer(layer)
        with self._reduced():
            n = int(self._count(layer))
            if n == 0:
                raise KeditError(f"no keys were recorded for layer {layer}")
            return self._sum_k(layer).to(torch.float64) / n

    def count(self, layer: int) -> int:
        """The number of keys recorded for one layer (across processes when distributed)."""
        layer = self._check_layer(layer)
        with self._reduced():
            return int(self._count(layer))

    def merge(self, other: KeyStatistics) -> KeyStatistics:
        """Add ``other``'s sums and counts to these (same layers, key size and dtype); returns ``self``."""
        if not isinstance(other, KeyStatistics):
            raise TypeError(f"`other` must be KeyStatistics, got {type(other).__name__}")
        if other.layers != self.layers or other.key_size != self.key_size:
            raise StatisticsMismatchError(
                f"cannot merge statistics of layers {other.layers} (key size {other.key_size}) into statistics of "
                f"layers {self.layers} (key size {self.key_size})"
            )
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise StatisticsMismatchError("cannot merge statistics made for two different models (fingerprints differ)")
        for name in self._defaults:
            getattr(self, name).add_(getattr(other, name).to(getattr(self, name)))
        self._update_count += other._update_count
        self._computed = None
        return self

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        """Reduce every state in place with one all-reduce (see the module docstring for why)."""
        if dist_sync_fn is not gather_all_tensors:
            super()._sync_dist(dist_sync_fn, process_group=process_group)
            return
        group = process_group or self.process_group
        for name in self._defaults:
            dist.all_reduce(getattr(self, name), op=dist.ReduceOp.SUM, group=group)

    # ------------------------------------------------------------------------------------------------- files
    def save(self, path: str | os.PathLike[str], fingerprint: Mapping[str, str] | None, source: str = "") -> Path:
        """Write the sums, counts and metadata to one safetensors file, atomically.

        The file is written to a temporary name beside ``path`` and renamed into place, so an interrupted run
        never leaves a partial file. In a distributed run every process must call ``save`` (the states are
        reduced first); only rank 0 writes.

        Args:
            path: the target file (``.safetensors``).
            fingerprint: :func:`~lightning_kedit.models.fingerprint.model_fingerprint` of the model.
            source: what the keys came from (kept in the metadata, shown when the file is loaded).

        Returns:
            The path written.
        """
        target = Path(path)
        with self._reduced():
            tensors: dict[str, Tensor] = {}
            for layer in self.layers:
                tensors[f"sum_kk.{layer}"] = symmetric_from_lower(self._sum_kk(layer)).detach().cpu().contiguous()
                tensors[f"sum_k.{layer}"] = self._sum_k(layer).detach().cpu().contiguous()
                tensors[f"count.{layer}"] = self._count(layer).detach().cpu().reshape(1)
            tokens = min(int(self._count(layer)) for layer in self.layers)
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return target
        metadata = {
            "format": FORMAT,
            "fingerprint": json.dumps(dict(fingerprint or {}), sort_keys=True),
            "layers": ",".join(str(layer) for layer in self.layers),
            "key_size": str(self.key_size),
            "tokens": str(tokens),
            "source": source,
            "dtype": str(self.state_dtype).removeprefix("torch."),
            "product_dtype": str(self.product_dtype).removeprefix("torch."),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_save_safetensors(tensors, target, metadata)
        self.fingerprint = dict(fingerprint) if fingerprint else None
        self.source = source
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        layers: Sequence[int] | None = None,
        force: bool = False,
    ) -> KeyStatistics:
        """Read statistics written by :meth:`save`, refusing ones made for another model or other layers.

        Args:
            path: the file.
            model: when given, its fingerprint must match the stored one (model type, sizes, weights).
            tokenizer: when given, its vocabulary must match too.
            layers: the layers needed; the file must hold them (a subset is selected from a larger file).
            force: use the statistics even when the fingerprint differs.

        Raises:
            StatisticsMismatchError: the file was made for another model, tokenizer or layers; the message
                says which field differs and how to rebuild the file.
            KeditError: the file is missing or is not a statistics file.
        """
        from lightning_kedit.models.fingerprint import fingerprint_mismatches, model_fingerprint

        target = Path(path)
        tensors, metadata = _read_file(target)
        stored_layers = [int(x) for x in metadata["layers"].split(",")]
        rebuild = f"rebuild them with `kedit stats --out {target} --force` (same --model, --layers)"
        wanted = stored_layers if layers is None else sorted({int(x) for x in layers})
        missing = [layer for layer in wanted if layer not in stored_layers]
        if missing:
            raise StatisticsMismatchError(
                f"statistics in {str(target)!r} hold layers {stored_layers}, not {missing}; {rebuild}"
            )
        fingerprint: dict[str, str] = json.loads(metadata.get("fingerprint") or "{}")
        if model is not None and not force:
            current = model_fingerprint(model, tokenizer, stored_layers)
            differences = fingerprint_mismatches(fingerprint, current)
            if differences:
                raise StatisticsMismatchError(
                    f"statistics in {str(target)!r} were made for another model ({'; '.join(differences)}); "
                    f"{rebuild}, or pass force=True (--force) to use them anyway"
                )
        dtype = getattr(torch, metadata.get("dtype", "float64"))
        products = getattr(torch, metadata.get("product_dtype", metadata.get("dtype", "float64")))
        stats = cls(wanted, int(metadata["key_size"]), dtype=dtype, product_dtype=products)
        for layer in wanted:
            stats._sum_kk(layer).copy_(tensors[f"sum_kk.{layer}"])
            stats._sum_k(layer).copy_(tensors[f"sum_k.{layer}"])
            stats._count(layer).fill_(int(tensors[f"count.{layer}"].reshape(-1)[0]))
        stats.fingerprint = fingerprint or None
        stats.source = metadata.get("source") or None
        stats._update_count = 1  # the states hold data: no "compute before update" warning
        return stats


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise KeditError(f"statistics file {str(path)!r} does not exist; make it with `kedit stats --out {path}`")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise KeditError(
            f"{str(path)!r} is not a readable safetensors file ({type(err).__name__}: {str(err)[:120]}); "
            f"delete it and rebuild it with `kedit stats --out {path}`"
        ) from err
    if metadata.get("format") != FORMAT or "layers" not in metadata or "key_size" not in metadata:
        raise KeditError(f"{str(path)!r} is not a key statistics file (format {metadata.get('format')!r})")
    return tensors, metadata
