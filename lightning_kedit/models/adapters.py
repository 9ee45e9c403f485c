"""Where things live inside each supported architecture.

Locate-then-edit methods need to find, for any causal LM, the transformer blocks, the MLP output
projection of each block (the "down projection": its input is the key ``k``, its output the value ``v``),
the attention module (for causal tracing), the final norm and the LM head. This module keeps one small
declarative table of those paths per ``model_type`` and an :class:`ModelAdapter` that resolves them on a
model instance.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    >>> adapter = ModelAdapter.for_model(model)
    >>> adapter.num_layers, adapter.key_size, adapter.value_size, adapter.is_conv1d
    (2, 128, 32, True)
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce

import torch
from torch import nn

from lightning_kedit.errors import KeditError

__all__ = [
    "ADAPTER_TABLE",
    "AdapterSpec",
    "ModelAdapter",
    "NotLinearlyEditableError",
    "UnsupportedModelError",
    "default_edit_layers",
    "forward_parameters",
    "kv_cache_argument",
    "register_adapter",
]


@dataclass(frozen=True)
class AdapterSpec:
    """Dotted paths of one architecture's parts.

    Args:
        blocks: path from the model to the ``ModuleList`` of transformer blocks.
        mlp_out: path from a block to the MLP output projection (the edited matrix).
        attn: path from a block to the attention module (its first output is the attention output).
        mlp: path from a block to the module whose output is the MLP's contribution to the residual.
        final_norm: path from the model to the final norm applied before the LM head.
        post_mlp_norm: path from a block to a norm applied to the MLP's output before it joins the residual
            stream (Gemma 2/3's ``post_feedforward_layernorm``), or None. With one, a change of the projection's
            output is not the change of the hidden state that MEMIT, ROME and AlphaEdit solve for, and
            :meth:`ModelAdapter.check_linear_residual` refuses them.
    """

    blocks: str
    mlp_out: str
    attn: str
    mlp: str
    final_norm: str
    post_mlp_norm: str | None = None


_LLAMA_LIKE = AdapterSpec(
    blocks="model.layers", mlp_out="mlp.down_proj", attn="self_attn", mlp="mlp", final_norm="model.norm"
)

#: Gemma 2 and 3: ``h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``.
_GEMMA2_LIKE = AdapterSpec(
    blocks="model.layers", mlp_out="mlp.down_proj", attn="self_attn", mlp="mlp", final_norm="model.norm",
    post_mlp_norm="post_feedforward_layernorm",
)
#: Block attributes that, when present, name a norm between the MLP and the residual stream.
_POST_MLP_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm")

ADAPTER_TABLE: dict[str, AdapterSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _GEMMA2_LIKE,
    "gemma3_text": _GEMMA2_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": AdapterSpec("transformer.h", "mlp.c_proj", "attn", "mlp", "transformer.ln_f"),
    "gptj": AdapterSpec("transformer.h", "mlp.fc_out", "attn", "mlp", "transformer.ln_f"),
    "gpt_neox": AdapterSpec(
        "gpt_neox.layers", "mlp.dense_4h_to_h", "attention", "mlp", "gpt_neox.final_layer_norm"
    ),
    # OPT has no MLP module: fc2's output is the MLP's contribution to the residual stream.
    "opt": AdapterSpec("model.decoder.layers", "fc2", "self_attn", "fc2", "model.decoder.final_layer_norm"),
}


class UnsupportedModelError(ValueError):
    """Raised for a ``model_type`` that has no entry in :data:`ADAPTER_TABLE`."""


class NotLinearlyEditableError(UnsupportedModelError, KeditError):
    """A model whose MLP output does not join the residual stream linearly (MEMIT, ROME, AlphaEdit refuse it)."""


def register_adapter(model_type: str, spec: AdapterSpec, *, overwrite: bool = False) -> None:
    """Teach the library a new architecture.

    Example:
        >>> register_adapter("my_llama", AdapterSpec("model.layers", "mlp.down_proj", "self_attn", "mlp",
        ...                                          "model.norm"), overwrite=True)
    """
    if not isinstance(spec, AdapterSpec):
        raise TypeError(f"`spec` must be an AdapterSpec, got {type(spec).__name__}")
    if model_type in ADAPTER_TABLE and not overwrite:
        raise ValueError(f"an adapter for model_type={model_type!r} exists; pass overwrite=True to replace it")
    ADAPTER_TABLE[model_type] = spec


def default_edit_layers(num_layers: int, window: int = 5) -> list[int]:
    """A window of consecutive early-to-middle layers, where causal tracing finds facts in most models.

    MEMIT edits GPT-J (28 layers) at 3-8 and Llama-style models at 4-8: about 13% of the depth in. Tiny
    models get as many layers as they have, excluding the last.

    Example:
        >>> default_edit_layers(30)
        [4, 5, 6, 7, 8]
        >>> default_edit_layers(2)
        [0]
    """
    if num_layers < 1:
        raise ValueError(f"`num_layers` must be positive, got {num_layers}")
    size = max(1, min(window, num_layers - 1))
    start = min(round(num_layers * 0.13), num_layers - 1 - size)
    start = max(0, start)
    return list(range(start, start + size))


def _get(root: nn.Module, path: str) -> nn.Module:
    try:
        return reduce(getattr, path.split("."), root)  # type: ignore[arg-type]
    except AttributeError as err:
        raise UnsupportedModelError(
            f"{type(root).__name__} has no submodule {path!r}; its adapter does not match this model"
        ) from err


def _path(root: nn.Module, path: str) -> list[nn.Module]:
    """The modules ``root``, ``root.a``, ``root.a.b`` ... along a dotted ``path`` (``root`` first)."""
    modules = [root]
    for name in path.split("."):
        modules.append(getattr(modules[-1], name))
    return modules


class ModelAdapter:
    """Resolves the parts of a causal LM named by its :class:`AdapterSpec`.

    Args:
        model: a Hugging Face causal LM (or anything with ``config.model_type`` and the paths of the spec).
        spec: the paths; looked up from ``model.config.model_type`` when omitted.
    """

    def __init__(self, model: nn.Module, spec: AdapterSpec | None = None) -> None:
        self.model = model
        self.root = _unwrap_peft(model)  # a PEFT-wrapped model's transformer; the paths are relative to it
        self.model_type = str(getattr(getattr(self.root, "config", None), "model_type", type(self.root).__name__))
        if spec is None:
            if self.model_type not in ADAPTER_TABLE:
                raise UnsupportedModelError(
                    f"model_type {self.model_type!r} is not supported; supported: "
                    f"{', '.join(sorted(ADAPTER_TABLE))}. Register it in three lines:\n"
                    "    from lightning_kedit import AdapterSpec, register_adapter\n"
                    f"    register_adapter({self.model_type!r}, AdapterSpec(blocks='model.layers', "
                    "mlp_out='mlp.down_proj', attn='self_attn', mlp='mlp', final_norm='model.norm'))"
                )
            spec = ADAPTER_TABLE[self.model_type]
        self.spec = spec
        blocks = _get(self.root, spec.blocks)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(f"{spec.blocks!r} of {type(model).__name__} is not a list of blocks")
        self.blocks: nn.ModuleList = blocks
        first = _base_layer(self.mlp_out(0))
        if not isinstance(first, nn.Linear) and not _is_conv1d(first):
            raise UnsupportedModelError(
                f"the MLP output projection {spec.mlp_out!r} is a {type(first).__name__}; "
                "only nn.Linear and GPT-2's Conv1D are supported"
            )

    @classmethod
    def for_model(cls, model: nn.Module) -> ModelAdapter:
        """The adapter for ``model``, cached on the instance."""
        cached = getattr(model, "_kedit_adapter", None)
        if isinstance(cached, ModelAdapter) and cached.model is model:
            return cached
        adapter = cls(model)
        object.__setattr__(model, "_kedit_adapter", adapter)
        return adapter

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def is_conv1d(self) -> bool:
        """True when the projection stores its weight as ``in x out`` (GPT-2's Conv1D)."""
        return _is_conv1d(_base_layer(self.mlp_out(0)))

    @property
    def key_size(self) -> int:
        """Width of the keys: the projection's input size."""
        return int(self.weight(0).shape[0 if self.is_conv1d else 1])

    @property
    def value_size(self) -> int:
        """Width of the values: the projection's output size (the residual width)."""
        return int(self.weight(0).shape[1 if self.is_conv1d else 0])

    def check_layers(self, layers: list[int] | tuple[int, ...], name: str = "layers") -> list[int]:
        """Validated, sorted, de-duplicated layer indices."""
        out = sorted({int(i) for i in layers})
        if not out:
            raise ValueError(f"`{name}` is empty; give at least one layer in [0, {self.num_layers - 1}]")
        bad = [i for i in out if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"`{name}`={list(layers)} has layers outside the model: {bad}; "
                f"{self.model_type} has layers 0..{self.num_layers - 1}"
            )
        return out

    def block(self, layer: int) -> nn.Module:
        return self.blocks[layer]

    def mlp_out(self, layer: int) -> nn.Module:
        """The MLP output projection of ``layer`` (the module whose weight is edited)."""
        return _get(self.blocks[layer], self.spec.mlp_out)

    def attn(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.attn)

    def mlp(self, layer: int) -> nn.Module:
        return _get(self.blocks[layer], self.spec.mlp)

    def final_norm(self) -> nn.Module:
        return _get(self.root, self.spec.final_norm)

    def embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()  # type: ignore[operator]

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()  # type: ignore[operator]

    def weight(self, layer: int) -> nn.Parameter:
        """The raw weight parameter of the projection of ``layer`` (in its stored layout).

        For a model sharded with ``fully_shard`` (FSDP2) it is the stored ``DTensor``; read its whole value with
        :func:`~lightning_kedit.models.sharding.full_weight` (see :mod:`lightning_kedit.models.sharding`).
        """
        from lightning_kedit.models.sharding import stored_weight

        block = self.blocks[layer]
        path = [*_path(self.root, self.spec.blocks), block, *_path(block, self.spec.mlp_out)]
        return stored_weight(self.root, block, _base_layer(path[-1]), path)

    def weight_name(self, layer: int) -> str:
        """The fully qualified parameter name of the projection weight of ``layer``."""
        return f"{self.spec.blocks}.{layer}.{self.spec.mlp_out}.weight"

    def to_stored_layout(self, delta: torch.Tensor) -> torch.Tensor:
        """Turn an ``out x in`` update into the layout the weight is stored in."""
        return delta.T if self.is_conv1d else delta

    def from_stored_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """View a stored weight as ``out x in``."""
        return weight.T if self.is_conv1d else weight

    def default_layers(self) -> list[int]:
        return default_edit_layers(self.num_layers)

    def post_mlp_norm(self, layer: int) -> str | None:
        """The path of a norm between the MLP of ``layer`` and the residual stream, or None.

        Declared by the spec, or found on the block under a known name (so a registered adapter that maps a
        Gemma-like model onto the Llama layout is caught too).
        """
        if self.spec.post_mlp_norm is not None:
            return self.spec.post_mlp_norm
        block = self.blocks[layer]
        return next((name for name in _POST_MLP_NORM_NAMES if isinstance(getattr(block, name, None), nn.Module)),
                    None)

    def check_linear_residual(self) -> None:
        """Refuse a model where a change of the projection's output is not the change of the hidden state.

        MEMIT, ROME and AlphaEdit find the change ``δ`` of the hidden state after a block and write it as a
        change of the MLP projection's output, which is the same thing only when that output is added to the
        residual stream as it is. A norm in between (Gemma 2/3's ``post_feedforward_layernorm``, OPT with
        ``do_layer_norm_before=False``) rescales it: the edit would miss its target.

        Raises:
            NotLinearlyEditableError: naming the model type, the norm and what to use instead.
        """
        norm = self.post_mlp_norm(0)
        if norm is None and self.model_type == "opt":
            config = getattr(self.model, "config", None)
            if getattr(config, "do_layer_norm_before", True) is False:
                norm = "final_layer_norm (do_layer_norm_before=False: the norm follows the residual sum)"
        if norm is not None:
            raise NotLinearlyEditableError(
                f"MEMIT, ROME and AlphaEdit cannot edit model_type {self.model_type!r}: its MLP output passes through "
                f"{norm} before it joins the residual stream, so a change of {self.spec.mlp_out!r}'s output is "
                "not the change of the hidden state the method solves for (the edit would miss its target); "
                "use method='ft' (kedit edit --method ft), which optimises the weights through the norm"
            )

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def dtype(self) -> torch.dtype:
        return self.weight(0).dtype


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformer inside a ``peft.PeftModel`` (``model.base_model.model``), else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    if type(model).__module__.startswith("peft.") and callable(get_base_model):
        return get_base_model()  # type: ignore[no-any-return]
    return model


def forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    """The keyword parameters of the transformer's own ``forward`` (inside a ``PeftModel``, the wrapped model's).

    A ``PeftModel``'s forward takes ``**kwargs``, so its own signature does not say what the model accepts.
    """
    return inspect.signature(_unwrap_peft(model).forward).parameters


def kv_cache_argument(model: nn.Module) -> str:
    """The keyword that passes a KV cache to ``model``: ``cache`` (transformers >= 5.2x) or ``past_key_values``.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                                      num_hidden_layers=1, num_attention_heads=2))
        >>> kv_cache_argument(model) in ("cache", "past_key_values")
        True
    """
    return "cache" if "cache" in forward_parameters(model) else "past_key_values"


def _base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a PEFT LoRA layer (its ``base_layer``, whose weight is the base weight), else ``module``.

    Hooks stay on the LoRA layer itself, so they see the effective layer (base + adapter).
    """
    base = getattr(module, "base_layer", None)
    return base if isinstance(base, nn.Module) else module


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

