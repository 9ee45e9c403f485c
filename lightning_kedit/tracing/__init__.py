"""Causal tracing (Meng et al., 2022): where in the network does a model recall a fact?

A trace runs the prompt three ways. The *clean* run records every hidden state. The *corrupted* runs add
Gaussian noise to the subject's token embeddings (``samples`` draws, seeded) so that the answer's
probability drops. The *restored* runs are corrupted runs in which the clean state of one (layer, token)
cell is put back: the block output for ``"hidden"``, or the MLP / attention outputs of a window of layers
centred on the layer for ``"mlp"`` / ``"attn"`` (ROME's Section 2.1). The indirect effect of a cell is
``p(restored) - p(corrupted)``, the probabilities averaged over the noise draws (ROME, Eq. 1-3).

The package's modules:

- :mod:`.results`: :data:`KINDS`, :class:`TracingError` and the result dataclasses :class:`TraceResult` and
  :class:`AverageTrace`.
- :mod:`.tracer`: the noise level (:func:`embedding_noise_scale`), the restored windows
  (:func:`restored_layers`) and the batched clean, corrupted and restored runs.
- :mod:`.trace`: :func:`causal_trace`, one prompt's trace.
- :mod:`.averaging`: :func:`average_trace` over many facts; :func:`best_window`, :func:`select_edit_window` and
  :func:`choose_edit_layers` (``layers="auto"``).
- :mod:`.plots`: heatmaps of a trace and curves of an averaged trace (matplotlib, imported on use).

Example:
    >>> from lightning_kedit import load_model  # doctest: +SKIP
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> result = causal_trace(model, tokenizer, "The Eiffel Tower is located in", "Eiffel Tower")  # doctest: +SKIP
    >>> result.effects["mlp"].shape  # (tokens, layers)  # doctest: +SKIP
    torch.Size([7, 30])
"""

from __future__ import annotations

from .averaging import average_trace, best_window, choose_edit_layers, select_edit_window
from .results import KINDS, AverageTrace, TraceResult, TracingError
from .trace import causal_trace
from .tracer import embedding_noise_scale, restored_layers

__all__ = [
    "KINDS",
    "AverageTrace",
    "TraceResult",
    "TracingError",
    "average_trace",
    "best_window",
    "causal_trace",
    "choose_edit_layers",
    "embedding_noise_scale",
    "restored_layers",
    "select_edit_window",
]
