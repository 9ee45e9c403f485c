"""What an edit changed: per-layer weight updates that apply atomically, revert exactly and travel as one file.

An :class:`EditDelta` holds, for each edited layer, the update of the MLP output projection in ``out x in``
layout (exact low-rank factors ``U Vᵀ`` when they are smaller than the dense matrix), the hash of the weight
it was computed on and of the weight it produces, and the edit's metadata (method, hyper-parameters, request
ids, model fingerprint). Applying checks the base hashes, computes every new weight in float64 before any is
written, and restores all of them if anything fails; reverting restores the kept original weights bit for
bit. Deltas compose, and save to a single safetensors file whose header holds the metadata as JSON
(:mod:`.delta_file`). Each layer's part is a :class:`~.layer_update.LayerUpdate` (:mod:`.layer_update`).

Example:
    >>> import torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16))
    >>> before = model.transformer.h[1].mlp.c_proj.weight.clone()
    >>> delta = EditDelta.from_model(model, {1: torch.ones(8, 32)}, method="demo")
    >>> with delta.applied(model):
    ...     bool((model.transformer.h[1].mlp.c_proj.weight - before).abs().min() > 0.99)
    True
    >>> torch.equal(model.transformer.h[1].mlp.c_proj.weight, before)
    True
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.editing.layer_update import LayerUpdate, compact_update
from lightning_kedit.editing.solvers import LowRankUpdate
from lightning_kedit.errors import DeltaError, DeltaFileError, DeltaMismatchError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import fingerprint_mismatches, model_fingerprint, weights_hash
from lightning_kedit.models.sharding import full_weight, write_weight

__all__ = ["DeltaError", "DeltaFileError", "DeltaMismatchError", "EditDelta", "LayerUpdate", "RevertReport"]

_ARCHITECTURE_KEYS = ("model_type", "num_layers", "key_size", "value_size", "vocab_size")


def _hparams_dict(hparams: Any) -> dict[str, Any]:
    """A dataclass instance or mapping as a plain dict (None gives ``{}``)."""
    if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type):
        return dataclasses.asdict(hparams)
    return dict(hparams or {})


def _write(param: Tensor, value: Tensor) -> None:
    """Copy the whole ``value`` into the parameter ``param`` in place (a sharded one keeps its shard of it)."""
    write_weight(param, value)


def _write_all(params: Mapping[int, Tensor], values: Mapping[int, Tensor], originals: Mapping[int, Tensor]) -> None:
    """Write every value, or, if anything (even a KeyboardInterrupt) stops it, restore every original."""
    try:
        for layer, value in values.items():
            _write(params[layer], value)
    except BaseException:
        for layer, original in originals.items():
            _write(params[layer], original)
        raise


@dataclasses.dataclass(frozen=True)
class RevertReport:
    """How exactly a revert restored the base weights.

    Args:
        exact: every layer is bit-identical to the weights the delta was applied to.
        max_deviation: per layer, an upper bound of ``|reverted − base|`` (0.0 where bit-exact): the rounding
            of applying and of subtracting, ``eps/2 (|W_applied| + |W_reverted|)``.
    """

    exact: bool
    max_deviation: dict[int, float]


class _ClassOrInstance:
    """``EditDelta.compose([d1, d2])`` on the class, ``d1.compose(d2)`` on an instance."""

    def __init__(self, func: Callable[..., EditDelta]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: EditDelta | None, owner: type[EditDelta]) -> Callable[..., EditDelta]:
        def on_class(deltas: Sequence[EditDelta], **kwargs: Any) -> EditDelta:
            return self.func(owner, list(deltas), **kwargs)

        def on_instance(*others: EditDelta, **kwargs: Any) -> EditDelta:
            return self.func(owner, [obj, *others], **kwargs)

        return functools.update_wrapper(on_class if obj is None else on_instance, self.func)


class EditDelta:
    """The weight updates of an edit, with what is needed to apply, revert, save and combine them.

    Build one with :meth:`from_model` (which hashes the weights the update was computed on) or load one
    with :meth:`load`.

    Args:
        updates: one :class:`LayerUpdate` per edited layer.
        method: the editing method (``"memit"``, ``"rome"``, ``"ft"``, ...).
        hparams: the hyper-parameters (a mapping or a dataclass; stored as JSON).
        request_ids: ids of the edit requests written by this delta.
        fingerprint: identity of the model the delta was computed on.
        base: stored-layout base weights per layer, for a bit-exact revert from a file.
        composed_of: digests of the deltas this one was composed from.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16))
        >>> delta = EditDelta.from_model(model, {0: torch.zeros(8, 32)}, method="demo")
        >>> delta.layers, delta.method
        ([0], 'demo')
    """

    def __init__(
        self,
        updates: Sequence[LayerUpdate],
        *,
        method: str,
        hparams: Mapping[str, Any] | Any = None,
        request_ids: Sequence[str] = (),
        fingerprint: Mapping[str, str] | None = None,
        base: Mapping[int, Tensor] | None = None,
        composed_of: Sequence[str] = (),
    ) -> None:
        if not updates:
            raise ValueError("`updates` is empty; a delta must change at least one layer")
        layers = [u.layer for u in updates]
        if len(set(layers)) != len(layers):
            raise ValueError(f"`updates` has several updates for one layer: layers {layers}")
        if not isinstance(method, str) or not method:
            raise ValueError(f"`method` must be a non-empty string, got {method!r}")
        as_dict = _hparams_dict(hparams)
        try:
            json.dumps(as_dict)
        except TypeError as err:
            raise ValueError(f"`hparams` must be JSON-serialisable, got {hparams!r}: {err}") from err
        self._updates = {u.layer: u for u in sorted(updates, key=lambda u: u.layer)}
        self.method = method
        self.hparams = as_dict
        self.request_ids = tuple(str(i) for i in request_ids)
        self.fingerprint = dict(fingerprint or {})
        self.composed_of = tuple(composed_of)
        self.base = {int(k): v for k, v in (base or {}).items()}
        unknown = sorted(set(self.base) - set(self._updates))
        if unknown:
            raise ValueError(f"`base` has weights for layers {unknown} that the delta does not edit")
        self._originals: weakref.WeakKeyDictionary[nn.Module, dict[int, Tensor]] = weakref.WeakKeyDictionary()
        self._digest: str | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        updates: Mapping[int, Tensor | LowRankUpdate],
        *,
        method: str,
        hparams: Mapping[str, Any] | Any = None,
        request_ids: Sequence[str] = (),
        tokenizer: Any = None,
        fingerprint: Mapping[str, str] | None = None,
        keep_base: bool = False,
    ) -> EditDelta:
        """A delta of ``updates`` (``out x in`` tensors or factors, by layer) computed on ``model``'s weights.

        Records each layer's weight name and the hashes of its current weight and of the weight the update
        gives. ``keep_base`` keeps a copy of the current weights (for ``save(with_base=True)`` before
        applying); the fingerprint is computed when ``tokenizer`` is given and ``fingerprint`` is not.
        """
        adapter = ModelAdapter.for_model(model)
        layers = adapter.check_layers(list(updates))
        records = []
        whole = {layer: full_weight(adapter.weight(layer)) for layer in layers}  # gathered when sharded
        for layer in layers:
            weight = whole[layer]
            shape = tuple(adapter.from_stored_layout(weight).shape)
            stored = compact_update(updates[layer], (int(shape[0]), int(shape[1])), layer)
            record = LayerUpdate(layer, adapter.weight_name(layer), weights_hash(weight), None,
                                 adapter.is_conv1d, **stored)
            result = weights_hash(record.applied_to(weight))
            records.append(dataclasses.replace(record, result_hash=result))
        if fingerprint is None:
            fingerprint = model_fingerprint(model, tokenizer, layers)
        base = {layer: whole[layer].detach().cpu().clone() for layer in layers} if keep_base else None
        return cls(records, method=method, hparams=hparams, request_ids=request_ids, fingerprint=fingerprint,
                   base=base)

    @property
    def layers(self) -> list[int]:
        """The edited layers, ascending."""
        return list(self._updates)

    def update(self, layer: int) -> LayerUpdate:
        """The update of ``layer``."""
        if layer not in self._updates:
            raise KeyError(f"the delta does not edit layer {layer}; it edits {self.layers}")
        return self._updates[layer]

    def __repr__(self) -> str:
        ranks = {layer: u.rank if u.rank is not None else "dense" for layer, u in self._updates.items()}
        return f"EditDelta(method={self.method!r}, requests={len(self.request_ids)}, ranks={ranks})"

    # ------------------------------------------------------------------ apply / revert
    def _resolve(self, model: nn.Module) -> dict[int, Tensor]:
        """The weight parameter of each edited layer, after checking names, layouts and shapes."""
        adapter = ModelAdapter.for_model(model)
        params: dict[int, Tensor] = {}
        for layer, update in self._updates.items():
            name = adapter.weight_name(layer) if layer < adapter.num_layers else "(no such layer)"
            if name != update.weight_name or adapter.is_conv1d != update.transposed:
                raise DeltaMismatchError(
                    f"the delta edits {update.weight_name} but this {adapter.model_type} model's layer {layer} "
                    f"projection is {name}: the delta was made for another architecture"
                )
            params[layer] = adapter.weight(layer)
            shape = tuple(adapter.from_stored_layout(params[layer]).shape)
            if shape != update.shape:
                raise DeltaMismatchError(
                    f"{update.weight_name} is {shape} (out x in) but the delta's update is {update.shape}: "
                    "the delta was made for another model size"
                )
        return params

    def apply(self, model: nn.Module, *, force: bool = False) -> None:
        """Add the update to ``model``'s weights, all layers or none.

        Args:
            model: the model to edit in place.
            force: apply even when the model's weights are not those the delta was computed on.

        Raises:
            DeltaMismatchError: another architecture or size, or (without ``force``) other base weights.
            DeltaError: the new weights would hold nan or inf (the model is left unchanged).
        """
        params = self._resolve(model)
        if not force:
            current_fingerprint = model_fingerprint(model, None, self.layers)
            differences = fingerprint_mismatches(self.fingerprint, current_fingerprint, _ARCHITECTURE_KEYS)
            if differences:
                raise DeltaMismatchError(
                    f"the delta was made for another model ({'; '.join(differences)}); pass force=True (--force) "
                    "to apply it anyway"
                )
            for layer, param in params.items():
                update = self._updates[layer]
                current = weights_hash(param)  # of the whole weight, also when sharded
                if current != update.base_hash:
                    raise DeltaMismatchError(
                        f"layer {layer} ({update.weight_name}): the model's weight (hash {current[:12]}) is not "
                        f"the one this delta was computed on (hash {update.base_hash[:12]}); it is another "
                        "model, or another delta is applied. Revert that first, or pass force=True (--force)"
                    )
        whole = {layer: full_weight(p) for layer, p in params.items()}  # gathered when sharded
        new = {layer: self._updates[layer].applied_to(w) for layer, w in whole.items()}
        for layer, value in new.items():
            if not torch.isfinite(value).all():
                raise DeltaError(
                    f"layer {layer}: the edited weight would hold nan or inf in {value.dtype}; nothing was "
                    "changed (the update overflows this dtype)"
                )
        originals = {layer: w.detach().clone() for layer, w in whole.items()}
        _write_all(params, new, originals)
        self._originals[model] = originals
        if not self.base and all(weights_hash(originals[la]) == u.base_hash for la, u in self._updates.items()):
            self.base = {layer: w.cpu() for layer, w in originals.items()}

    def revert(self, model: nn.Module, *, force: bool = False) -> RevertReport:
        """Undo :meth:`apply`: bit-exact from the kept (or saved) base weights, else by subtraction.

        Args:
            model: the model the delta was applied to.
            force: subtract even from layers whose weights changed since the delta was applied.

        Returns:
            A :class:`RevertReport`: whether the revert is bit-exact, and a bound of the deviation per layer.

        Raises:
            DeltaMismatchError: (without ``force``) a layer's weight is not what applying the delta gave.
        """
        params = self._resolve(model)
        complete_base = self.base if set(self.base) == set(self._updates) else None
        originals = self._originals.get(model) or complete_base
        new: dict[int, Tensor] = {}
        deviation: dict[int, float] = {}
        changed = []
        for layer, stored in params.items():
            param = full_weight(stored)  # gathered when sharded
            update = self._updates[layer]
            if originals is not None:
                if torch.equal(param, update.applied_to(originals[layer].to(param.device))):
                    new[layer], deviation[layer] = originals[layer].to(param.device), 0.0
                    continue
                changed.append(layer)
            elif update.result_hash is not None and weights_hash(param) != update.result_hash:
                changed.append(layer)
            new[layer] = update.applied_to(param, sign=-1.0)
            if weights_hash(new[layer]) == update.base_hash:
                deviation[layer] = 0.0
            else:
                eps = torch.finfo(param.dtype).eps
                deviation[layer] = float(eps / 2 * (param.detach().abs() + new[layer].abs()).max())
        if changed and not force:
            raise DeltaMismatchError(
                f"layer(s) {changed}: the weights are not what applying this delta gave (it was not applied to "
                "this model, or weights changed since, e.g. a later delta); revert later deltas first, or pass "
                "force=True to subtract it anyway"
            )
        _write_all(params, new, {layer: full_weight(p).detach().clone() for layer, p in params.items()})
        self._originals.pop(model, None)
        exact = not changed and all(value == 0.0 for value in deviation.values())
        return RevertReport(exact=exact, max_deviation=deviation)

    @contextmanager
    def applied(self, model: nn.Module, *, force: bool = False) -> Iterator[EditDelta]:
        """Apply the delta for the ``with`` block, then revert it (also on errors)."""
        self.apply(model, force=force)
        try:
            yield self
        finally:
            self.revert(model)

    # ------------------------------------------------------------------ composition
    @_ClassOrInstance
    def compose(cls: type[EditDelta], deltas: list[EditDelta], *, force: bool = False) -> EditDelta:
        """One delta equal to applying ``deltas`` in order (updates summed per layer).

        Each delta must have been computed either on the weights the previous ones produce (sequential
        editing) or on the same base as the first one touching the layer (independent edits); ``force``
        skips that check. Low-rank factors are concatenated while that stays smaller than a dense matrix.

        Example:
            >>> import torch
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16))
            >>> a = EditDelta.from_model(model, {0: torch.ones(8, 32)}, method="demo")
            >>> b = EditDelta.from_model(model, {0: torch.ones(8, 32)}, method="demo")
            >>> float(a.compose(b).update(0).dense()[0, 0]), EditDelta.compose([a, b]).layers
            (2.0, [0])
        """
        if not deltas or not all(isinstance(d, EditDelta) for d in deltas):
            raise ValueError(f"`deltas` must be a non-empty list of EditDelta, got {deltas!r}")
        chains: dict[int, list[LayerUpdate]] = {}
        base: dict[int, Tensor] = {}
        for index, delta in enumerate(deltas):
            for layer, update in delta._updates.items():
                chain = chains.setdefault(layer, [])
                if not chain and layer in delta.base:
                    base[layer] = delta.base[layer]
                if chain and not force:
                    if update.weight_name != chain[0].weight_name:
                        raise DeltaMismatchError(
                            f"delta {index} edits {update.weight_name} at layer {layer}, an earlier one edits "
                            f"{chain[0].weight_name}: they are for different architectures"
                        )
                    if update.base_hash not in (chain[-1].result_hash, chain[0].base_hash):
                        raise DeltaMismatchError(
                            f"delta {index} at layer {layer} was computed neither on the weights the earlier "
                            "deltas produce nor on their base; pass force=True to sum them anyway"
                        )
                chain.append(update)
        records = []
        for layer, chain in chains.items():
            first = chain[0]
            shape = first.shape
            if all(u.factors is not None for u in chain):
                factors = [u.factors for u in chain if u.factors is not None]
                summed: Tensor | LowRankUpdate = LowRankUpdate(
                    torch.cat([f.u for f in factors], dim=1), torch.cat([f.v for f in factors], dim=1)
                )
            else:
                summed = torch.stack([u.dense() for u in chain]).sum(0)
            stored = compact_update(summed, shape, layer)
            record = LayerUpdate(layer, first.weight_name, first.base_hash, None, first.transposed, **stored)
            if layer in base:  # the composed result is known when the base weights are
                record = dataclasses.replace(record, result_hash=weights_hash(record.applied_to(base[layer])))
            records.append(record)
        methods = list(dict.fromkeys(d.method for d in deltas))
        same_hparams = all(d.hparams == deltas[0].hparams for d in deltas)
        return cls(
            records,
            method=methods[0] if len(methods) == 1 else "+".join(methods),
            hparams=deltas[0].hparams if same_hparams else {"composed": [d.hparams for d in deltas]},
            request_ids=[i for d in deltas for i in d.request_ids],
            fingerprint=deltas[0].fingerprint,
            base=base,
            composed_of=[d.digest() for d in deltas],
        )

    # ------------------------------------------------------------------ identity and files
    def _metadata(self) -> dict[str, str]:
        from lightning_kedit.editing.delta_file import delta_metadata

        return delta_metadata(self)

    def digest(self) -> str:
        """A sha256 content hash of the updates and metadata (not of kept base weights)."""
        if self._digest is None:
            digest = hashlib.sha256(json.dumps(self._metadata(), sort_keys=True).encode())
            for update in self._updates.values():
                for name, tensor in update.tensors().items():
                    digest.update(f"{update.layer}.{name}".encode())
                    digest.update(weights_hash(tensor).encode())
            self._digest = digest.hexdigest()
        return self._digest

    def save(self, path: str | os.PathLike[str], *, with_base: bool = False) -> Path:
        """Write the delta to one safetensors file, atomically (see :func:`~.delta_file.save_delta`).

        Args:
            path: the file to write (parent folders are created).
            with_base: also store the base weights of the edited layers, for a bit-exact revert from the file.
        """
        from lightning_kedit.editing.delta_file import save_delta

        return save_delta(self, path, with_base=with_base)

    def to_peft(self, folder: str | os.PathLike[str], **kwargs: Any) -> Path:
        """Write the delta as a PEFT LoRA adapter folder (see :func:`~.peft_adapter.delta_to_peft`).

        ``PeftModel.from_pretrained(base, folder)`` then gives ``base + delta``; keywords: ``rank``, ``dtype``,
        ``base_model_name_or_path``, ``overwrite``.
        """
        from lightning_kedit.editing.peft_adapter import delta_to_peft

        return delta_to_peft(self, folder, **kwargs)

    @classmethod
    def from_peft(cls, folder: str | os.PathLike[str], model: nn.Module) -> EditDelta:
        """Read a LoRA adapter on ``model``'s edit projections as a delta (see :func:`~.peft_adapter.delta_from_peft`).

        Raises:
            DeltaMismatchError: the adapter was exported for other base weights.
        """
        from lightning_kedit.editing.peft_adapter import delta_from_peft

        return delta_from_peft(folder, model, cls)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditDelta:
        """Read a delta written by :meth:`save` (see :func:`~.delta_file.load_delta`).

        Raises:
            DeltaFileError: the file is missing, not a delta, or its content does not match its digest.
        """
        from lightning_kedit.editing.delta_file import load_delta

        return load_delta(path, cls)
