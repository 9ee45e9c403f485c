"""The part of the model above the insertion layer, as the target-value optimisation runs it: exact or fast.

Every Adam step of :mod:`.targets` runs blocks ``L+1..`` and the LM head forward and backward. The *exact*
arithmetic uses the model's own modules. The *bfloat16* arithmetic runs bfloat16 copies of them under autocast:

- the weights are cast **once** (autocast alone would cast every weight at every matrix product, since the
  model's parameters do not require gradients and so are not cached), and the residual stream, δ, the
  log-softmax and the loss stay float32 (autocast keeps additions, norms and softmax in float32);
- attention runs in float32 (:func:`float32_sdpa`): on CPUs the fused bfloat16 attention backward is an order of
  magnitude slower than float32, and its matrices are small;
- on a CPU with AVX-512 BF16 or AMX a bfloat16 matrix product runs about 4× faster than float32 (measured in
  docs/benchmarks/editing.md); memory grows by the bfloat16 copy of the upper blocks and head.

The bfloat16 result is never trusted alone: :mod:`.targets` re-judges every request with the exact arithmetic.

Example:
    >>> upper = UpperBlocks.exact(adapter, layer=8)  # doctest: +SKIP
    >>> fast = UpperBlocks.bfloat16_copy(adapter, layer=8)  # doctest: +SKIP
    >>> with fast.autocast():  # doctest: +SKIP
    ...     h = fast.blocks[0](h, *args, **kwargs)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.sharding import gather_for_direct_call

__all__ = ["FLOAT32_SDPA", "UpperBlocks", "bfloat16_is_fast", "float32_sdpa"]

#: The name under which :func:`float32_sdpa` is registered with transformers' attention functions.
FLOAT32_SDPA = "kedit_float32_sdpa"


def bfloat16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively: a CUDA GPU that supports bfloat16, or a CPU whose
    flags (Linux ``/proc/cpuinfo``) include AVX-512 BF16 or AMX BF16. Elsewhere bfloat16 is emulated and slow.

    Example:
        >>> isinstance(bfloat16_is_fast(torch.device("cpu")), bool)
        True
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    global _CPU_BF16
    if _CPU_BF16 is None:
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        _CPU_BF16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return _CPU_BF16


_CPU_BF16: bool | None = None


def float32_sdpa(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention computed in float32 whatever the autocast state (same masks as "sdpa")."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with torch.autocast(query.device.type, enabled=False):
        return sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)


def _register_float32_sdpa() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:  # pragma: no cover - transformers without the attention registry
        return False
    AttentionInterface.register(FLOAT32_SDPA, float32_sdpa)
    return True


def _is_projection(module: nn.Module) -> bool:
    """A matrix-product module (``nn.Linear``, GPT-2's ``Conv1D``): its weights go to bfloat16, norms stay float32
    (autocast runs CPU layer norms in the weight's dtype)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


@dataclass
class UpperBlocks:
    """Blocks ``L+1..``, the final norm and the LM head, and the arithmetic to run them with.

    Args:
        adapter: the model's adapter (the final norm and OPT's output projection come from it).
        blocks: the blocks above the insertion layer, in order.
        head: the LM head (the model's own, or a bfloat16 copy).
        bfloat16: run under bfloat16 autocast.
    """

    adapter: ModelAdapter
    blocks: Sequence[nn.Module]
    head: nn.Module
    bfloat16: bool = False

    @classmethod
    def exact(cls, adapter: ModelAdapter, layer: int) -> UpperBlocks:
        """The model's own modules above ``layer``, run in their own dtype."""
        return cls(adapter, [adapter.block(i) for i in range(layer + 1, adapter.num_layers)], adapter.lm_head())

    @classmethod
    def bfloat16_copy(cls, adapter: ModelAdapter, layer: int) -> UpperBlocks:
        """Copies of the modules above ``layer`` with bfloat16 projections (the model is not touched), attention in
        float32."""
        float32_attention = _register_float32_sdpa()
        blocks = []
        for i in range(layer + 1, adapter.num_layers):
            shadow = copy.deepcopy(adapter.block(i))
            for module in shadow.modules():
                if _is_projection(module):
                    module.to(torch.bfloat16)
                config = getattr(module, "config", None)
                # deepcopy gave the copy its own config: the model keeps its attention implementation.
                if float32_attention and getattr(config, "_attn_implementation", None) == "sdpa":
                    config._attn_implementation = FLOAT32_SDPA  # type: ignore[union-attr]
            blocks.append(shadow)
        head = copy.deepcopy(adapter.lm_head())
        if _is_projection(head):
            head.to(torch.bfloat16)
        return cls(adapter, blocks, head, bfloat16=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bfloat16 autocast for the fast arithmetic, nothing for the exact one."""
        device = next(self.head.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of final hidden states (final norm, OPT's projection, the head, soft-capping)."""
        model = self.adapter.model
        gather_for_direct_call(model, self.adapter.final_norm())  # a sharded (FSDP2) model's root unit
        gather_for_direct_call(model, self.head)
        out = self.adapter.final_norm()(hidden)
        project_out = getattr(getattr(getattr(model, "model", None), "decoder", None), "project_out", None)
        with self.autocast():
            if project_out is not None:
                out = project_out(out)
            logits = self.head(out).float()
        cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits
