"""An :class:`~.delta.EditDelta` as a PEFT LoRA adapter, and a LoRA adapter read back as an ``EditDelta``.

An edit's update of layer ``l`` is ``ΔW_l = U_l V_lᵀ`` (``out x in``). PEFT's LoRA adds
``scaling · B A`` with ``B = lora_B.weight`` (``out x r``), ``A = lora_A.weight`` (``r x in``) and
``scaling = lora_alpha / r``. Writing ``B = U``, ``A = Vᵀ``, ``r = rank(U)`` and ``lora_alpha = r`` per module
(``rank_pattern`` / ``alpha_pattern``) gives ``scaling = 1`` and ``base + adapter == base + delta``. A dense
update (kept dense because it has no smaller exact factors) becomes ``B = ΔW``, ``A = I`` (or ``B = I``,
``A = ΔW``), rank ``min(out, in)``. GPT-2's ``Conv1D`` weights are stored ``in x out``; PEFT handles them with
``fan_in_fan_out=True`` and the same ``A``/``B``.

The folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (what PEFT, vLLM and SGLang read),
plus ``kedit_delta.json``: the delta's metadata with the hash of each base weight, so reading the adapter back
(:func:`delta_from_peft`) refuses other base weights and keeps the method, requests and history.

Example:
    >>> import tempfile, torch
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from lightning_kedit.editing.delta import EditDelta
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16))
    >>> delta = EditDelta.from_model(model, {1: torch.ones(8, 32)}, method="demo")
    >>> folder = delta.to_peft(tempfile.mkdtemp() + "/adapter")
    >>> back = EditDelta.from_peft(folder, model)
    >>> torch.allclose(back.update(1).dense(), delta.update(1).dense())
    True
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_kedit.editing.delta_file import delta_metadata
from lightning_kedit.editing.delta_view import DeltaClass, DeltaView
from lightning_kedit.editing.layer_update import LayerUpdate, compact_update
from lightning_kedit.editing.solvers import LowRankUpdate
from lightning_kedit.errors import DeltaError, DeltaFileError, DeltaMismatchError
from lightning_kedit.files import atomic_directory
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import weights_hash
from lightning_kedit.models.sharding import full_weight

__all__ = ["SIDECAR", "add_delta_adapter", "delta_from_peft", "delta_to_peft", "lora_factors"]

SIDECAR = "kedit_delta.json"
_PREFIX = "base_model.model."
_A, _B = ".lora_A.weight", ".lora_B.weight"
D = TypeVar("D", bound=DeltaView)


def _module_name(update: LayerUpdate) -> str:
    return update.weight_name.removesuffix(".weight")


def lora_factors(update: LayerUpdate, rank: int | None = None) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A == update.dense()`` exactly (float64), ``A`` being ``r x in``.

    Args:
        update: one layer's update.
        rank: the LoRA rank to use; at least the update's exact rank (extra columns are zero), or None.

    Raises:
        DeltaError: ``rank`` is smaller than the rank the update needs to be expressed exactly.
    """
    if update.factors is not None:
        b, a = update.factors.u, update.factors.v.T
    else:
        dense = update.dense()
        out, inp = dense.shape
        eye = torch.eye(min(out, inp), dtype=dense.dtype)
        b, a = (dense, eye) if inp <= out else (eye, dense)
    needed = int(a.shape[0])
    if rank is None:
        return b.contiguous(), a.contiguous()
    if rank < needed:
        kind = "factors" if update.factors is not None else "dense update (rank = min(out, in))"
        raise DeltaError(
            f"layer {update.layer}: rank {rank} cannot express the update exactly; its {kind} need rank "
            f"{needed}. Give a rank >= {needed} for this layer, or leave the rank unset"
        )
    pad = rank - needed
    b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    a = torch.cat([a, a.new_zeros(pad, a.shape[1])], dim=0)
    return b.contiguous(), a.contiguous()


def _ranks(delta: DeltaView, rank: int | Mapping[int, int] | None) -> dict[int, int | None]:
    if rank is None or isinstance(rank, int):
        return dict.fromkeys(delta.layers, rank)
    unknown = sorted(set(rank) - set(delta.layers))
    if unknown:
        raise DeltaError(f"`rank` names layers {unknown} that the delta does not edit; it edits {delta.layers}")
    return {layer: rank.get(layer) for layer in delta.layers}


def _lora_parts(
    delta: DeltaView, rank: int | Mapping[int, int] | None, dtype: torch.dtype
) -> tuple[Any, dict[str, Tensor]]:
    """The ``LoraConfig`` and the saved-format ``lora_A``/``lora_B`` tensors of ``delta`` (all checked first)."""
    from peft import LoraConfig

    ranks = _ranks(delta, rank)
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    transposed = {delta.update(layer).transposed for layer in delta.layers}
    for layer in delta.layers:
        update = delta.update(layer)
        b, a = lora_factors(update, ranks[layer])
        name = _module_name(update)
        tensors[f"{_PREFIX}{name}{_A}"] = a.to(dtype).contiguous()
        tensors[f"{_PREFIX}{name}{_B}"] = b.to(dtype).contiguous()
        rank_pattern[name] = int(a.shape[0])
    default = max(rank_pattern.values())
    config = LoraConfig(
        r=default,
        lora_alpha=default,
        target_modules=sorted(rank_pattern),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(rank_pattern),  # alpha == r per module: scaling alpha / r == 1
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=transposed == {True},
        task_type="CAUSAL_LM",
    )
    return config, tensors


def add_delta_adapter(model: nn.Module, delta: DeltaView, adapter_name: str = "kedit") -> None:
    """Add ``delta`` to a ``peft.PeftModel`` as a new LoRA adapter, active together with the active ones.

    The base weights and the existing adapters are not changed (``edit_as="adapter"``: the way to edit a model
    whose base is frozen or quantised); the new adapter's factors are frozen. Remove it with
    ``model.delete_adapter(adapter_name)``.

    Raises:
        DeltaError: ``model`` is not a PeftModel, or already has an adapter named ``adapter_name``.
    """
    from peft import PeftModel, set_peft_model_state_dict

    if not isinstance(model, PeftModel):
        raise DeltaError(f"edit_as='adapter' needs a peft.PeftModel, got {type(model).__name__}; "
                         "wrap it with peft.get_peft_model or write the edit into the weights")
    if adapter_name in model.peft_config:
        raise DeltaError(f"the model already has an adapter named {adapter_name!r}; choose another name")
    tuner: Any = model.base_model  # peft's LoraModel (typed as a Module by peft)
    active = list(tuner.active_adapters)
    config, tensors = _lora_parts(delta, None, torch.float32)
    model.add_adapter(adapter_name, config)
    try:
        set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
        tuner.set_adapter([*active, adapter_name])
    except BaseException:
        tuner.set_adapter(active)
        model.delete_adapter(adapter_name)
        raise
    for name, param in model.named_parameters():
        if f".{adapter_name}." in name:
            param.requires_grad_(False)


def delta_to_peft(
    delta: DeltaView,
    folder: str | os.PathLike[str],
    *,
    rank: int | Mapping[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``delta`` as a PEFT LoRA adapter folder, whole or not at all.

    Args:
        delta: the delta.
        folder: the adapter folder to write (must not exist unless ``overwrite``).
        rank: LoRA rank for every layer (int) or per layer (mapping); each at least the update's exact rank.
            None uses the exact rank of each layer.
        dtype: dtype of the stored ``lora_A``/``lora_B`` weights.
        base_model_name_or_path: recorded in ``adapter_config.json`` (where PEFT looks for the base model).
        overwrite: replace an existing folder.

    Raises:
        DeltaError: a rank cannot express a layer's update, or ``folder`` exists and ``overwrite`` is False.
    """
    target = Path(folder)
    if target.exists() and not overwrite:
        raise DeltaError(f"adapter folder {str(target)!r} exists; choose another or pass overwrite=True (--force)")
    config, tensors = _lora_parts(delta, rank, dtype)
    config.base_model_name_or_path = base_model_name_or_path
    from safetensors.torch import save_file

    with atomic_directory(target, replace=overwrite) as staging:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        (staging / SIDECAR).write_text(json.dumps(delta_metadata(delta), indent=2, sort_keys=True) + "\n")
    return target


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str] | None]:
    from safetensors.torch import load_file

    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise DeltaFileError(
            f"{str(folder)!r} is not a PEFT adapter folder: it needs adapter_config.json and "
            "adapter_model.safetensors (write one with EditDelta.to_peft or PeftModel.save_pretrained)"
        )
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(str(weights_file))
        sidecar = json.loads((folder / SIDECAR).read_text()) if (folder / SIDECAR).is_file() else None
    except (OSError, ValueError) as err:
        raise DeltaFileError(f"cannot read the adapter in {str(folder)!r}: {err}") from err
    if config.get("peft_type") != "LORA":
        raise DeltaError(f"{str(folder)!r} is a {config.get('peft_type')} adapter; only LoRA adapters are deltas")
    for key, ok in (("use_dora", False), ("bias", "none"), ("modules_to_save", None)):
        if config.get(key, ok) not in (ok, [], False):
            raise DeltaError(f"the adapter in {str(folder)!r} sets {key}={config[key]!r}; a delta can only be a "
                             f"plain LoRA (no DoRA, no trained biases, no modules_to_save)")
    return config, tensors, sidecar


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name equal to it or ending in ``.key``."""
    for key, value in pattern.items():
        if module == key or module.endswith(f".{key}"):
            return value
    return default


def delta_from_peft(folder: str | os.PathLike[str], model: nn.Module, cls: DeltaClass[D]) -> D:
    """Read a LoRA adapter on ``model``'s edit projections as an :class:`EditDelta` of ``model``.

    With the ``kedit_delta.json`` that :func:`delta_to_peft` writes, the hash of each current weight of
    ``model`` must equal the recorded base hash, and the method, requests and history are restored. A LoRA
    adapter from elsewhere becomes a delta of ``model``'s current weights (method ``"peft-lora"``).

    Raises:
        DeltaFileError: the folder is not a readable PEFT adapter.
        DeltaError: the adapter is not a plain LoRA, or adapts modules that are not edit projections.
        DeltaMismatchError: the adapter was made for other base weights (both hashes named).
    """
    path = Path(folder)
    config, tensors, sidecar = _read_adapter(path)
    adapter = ModelAdapter.for_model(model)
    by_module = {adapter.weight_name(layer).removesuffix(".weight"): layer for layer in range(adapter.num_layers)}
    modules = sorted({key[len(_PREFIX):-len(_A)] for key in tensors if key.startswith(_PREFIX) and key.endswith(_A)})
    other = sorted(set(modules) - set(by_module)) + sorted(
        k for k in tensors if not (k.startswith(_PREFIX) and k.endswith((_A, _B))))
    if not modules or other:
        example = next(iter(by_module))
        raise DeltaError(f"the adapter in {str(path)!r} adapts {other or 'nothing'}; a delta of this "
                         f"{adapter.model_type} model can only adapt its edit projections ({example}, ...)")
    factors: dict[int, LowRankUpdate] = {}
    for module in modules:
        a, b = tensors[f"{_PREFIX}{module}{_A}"], tensors.get(f"{_PREFIX}{module}{_B}")
        if b is None or b.shape[1] != a.shape[0]:
            raise DeltaError(f"the adapter in {str(path)!r} has no lora_B matching lora_A for {module}")
        r = int(a.shape[0])
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", r)))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r  # PEFT's LoRA scaling
        factors[by_module[module]] = LowRankUpdate(b.to(torch.float64) * scaling, a.to(torch.float64).T)
    if sidecar is None:
        return cls.from_model(model, factors, method="peft-lora", hparams={"adapter": str(path)})
    records = {int(r["layer"]): r for r in json.loads(sidecar["layers"])}
    if set(records) != set(factors):
        raise DeltaFileError(f"{SIDECAR} in {str(path)!r} lists layers {sorted(records)} but the adapter "
                             f"adapts layers {sorted(factors)}")
    updates = []
    for layer, lowrank in sorted(factors.items()):
        record, weight = records[layer], full_weight(adapter.weight(layer))
        current = weights_hash(weight)
        if current != record["base_hash"]:
            raise DeltaMismatchError(
                f"the adapter in {str(path)!r} was made for base weights with hash {record['base_hash']} at "
                f"{record['weight_name']}, but this model's weight there has hash {current}: load the base model "
                "the adapter was exported from (and no other edit applied)"
            )
        shape = tuple(adapter.from_stored_layout(weight).shape)
        stored = compact_update(lowrank, (int(shape[0]), int(shape[1])), layer)
        update = LayerUpdate(layer, record["weight_name"], record["base_hash"], None, bool(record["transposed"]),
                             **stored)  # the result hash is recomputed: stored factors may be rounded (float32)
        updates.append(LayerUpdate(layer, update.weight_name, update.base_hash, weights_hash(update.applied_to(weight)),
                                   update.transposed, **stored))
    return cls(updates, method=sidecar["method"], hparams=json.loads(sidecar["hparams"]),
               request_ids=json.loads(sidecar["request_ids"]), fingerprint=json.loads(sidecar["fingerprint"]),
               composed_of=json.loads(sidecar["composed_of"]))
