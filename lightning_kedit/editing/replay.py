"""Replay of the blocks above the insertion layer, for the many steps of the target-value optimisation.

The target values (``targets.py``) add δ to the output of block ``L`` at each row's subject position and run
the blocks above ``L`` at every Adam step. Nothing below ``L`` depends on δ, and — attention being causal — nor
does anything at the positions before the subject, in any layer. So:

1. the positions before each row's subject (its *prefix*) run once through the whole model, and their keys and
   values are kept in a ``DynamicCache``;
2. the rest of each row (its *tail*: the subject's last token, the rest of the prompt and the answer) runs once
   through blocks ``0..L``; the output of block ``L`` and the arguments every later block was called with are
   recorded by hooks;
3. every step replays only the tail through blocks ``L+1..`` over the cached prefix.

Rows are grouped by tail length, so that a batch of short and long prompts wastes no compute on padding. Models
whose attention does not read a ``DynamicCache`` (types outside :data:`PREFIX_CACHE_TYPES`) replay whole rows
from block ``L`` on. Both paths give the same δ (tests/test_keys_targets.py).

Example::

    groups = prepare_replays(model, ids, mask, subject_pos, layer=8)
    rows, replay = groups[0]
    h = replay.hidden[local] + shift  # then, for each upper block:
    for block, (args, kwargs) in zip(blocks, replay.calls_for(local)):
        h = first_tensor(block(h, *args, **kwargs))
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from lightning_kedit.models.adapters import ModelAdapter, kv_cache_argument
from lightning_kedit.models.forward_hooks import StopForward, first_tensor, run_until

__all__ = ["PREFIX_CACHE_TYPES", "UpperReplay", "prepare_replays", "tail_groups"]

#: Model types whose attention layers read and extend a ``DynamicCache``; each is checked against the full
#: replay in tests/test_keys_targets.py. Other types replay every position of every row. Gemma 2/3 are not here:
#: target values are refused for them (``ModelAdapter.check_linear_residual``), so nothing replays them.
PREFIX_CACHE_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gptj", "gpt_neox", "opt"}
)

Call = tuple[tuple[Any, ...], dict[str, Any]]

#: The share of padding :func:`tail_groups` accepts to merge rows of neighbouring tail lengths.
WASTE = 0.25


@dataclass
class UpperReplay:
    """Block ``L``'s output for a group of rows from position ``start`` on, and how to run the blocks above.

    Attributes:
        hidden: ``(rows, T, d)``, block ``L``'s output at positions ``start .. start + T`` of each row.
        start: ``(rows,)``, the first position of each row held in ``hidden`` (its subject, or 0).
        calls: per upper block, the positional (after the hidden states) and keyword arguments it was called with.
        prefix_kv: per layer, the keys and values of the prefix positions (None without a prefix cache).
        cache: the cache object the recorded calls read; reset to the prefix before every replay.
    """

    hidden: torch.Tensor
    start: torch.Tensor
    calls: list[Call]
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    cache: Any = None

    def calls_for(self, rows: torch.Tensor) -> Iterator[Call]:
        """The upper blocks' arguments restricted to ``rows`` (local indices); the cache holds only their prefix."""
        n_rows = self.hidden.shape[0]
        if self.prefix_kv is not None:
            index = rows.to(self.hidden.device)
            for cache_layer, (keys, values) in zip(self.cache.layers, self.prefix_kv, strict=True):
                cache_layer.keys, cache_layer.values = keys[index], values[index]
        for args, kwargs in self.calls:
            yield _take(args, rows, n_rows), _take(kwargs, rows, n_rows)


def prepare_replays(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    subject_pos: torch.Tensor,
    layer: int,
) -> list[tuple[torch.Tensor, UpperReplay]]:
    """Run everything that does not depend on δ once; return ``(row indices, replay)`` per group of rows.

    Args:
        model: the causal LM (not changed; run without gradient).
        input_ids: ``(rows, width)`` token ids, padded on the right.
        attention_mask: ``(rows, width)``, 1 on real tokens.
        subject_pos: ``(rows,)``, the position where δ is added.
        layer: the insertion layer ``L``.
    """
    adapter = ModelAdapter.for_model(model)
    device = next(model.parameters()).device
    if adapter.model_type not in PREFIX_CACHE_TYPES:
        with torch.no_grad(), _replay_capture(adapter, layer) as (hidden, calls), suppress(StopForward):
            model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        rows = torch.arange(input_ids.shape[0])
        return [(rows, UpperReplay(hidden[0], torch.zeros_like(rows), calls))]
    groups = []
    for rows in tail_groups(attention_mask.sum(1) - subject_pos):
        groups.append((rows, _prefix_replay(model, adapter, input_ids[rows], attention_mask[rows], subject_pos[rows],
                                            layer, device)))
    return groups


def tail_groups(tail_length: torch.Tensor, waste: float = WASTE) -> list[torch.Tensor]:
    """Rows grouped by tail length, neighbouring lengths merged while padding adds at most ``waste`` tokens.

    Every group is one batch through the upper blocks at every step: a few larger groups use the matrix
    kernels better than one group per length, at the price of a little padding (positions past a row's tail
    are computed and never read).

    Example:
        >>> [g.tolist() for g in tail_groups(torch.tensor([3, 9, 3, 4, 2]))]
        [[1], [0, 2, 3], [4]]
    """
    groups: list[torch.Tensor] = []
    lengths = sorted(tail_length.unique().tolist(), reverse=True)
    while lengths:
        # Start from the longest length left and take shorter ones while the group's padding stays small.
        width, chosen = lengths[0], [lengths[0]]
        for length in lengths[1:]:
            rows = torch.isin(tail_length, torch.tensor([*chosen, length]))
            real = int(tail_length[rows].sum())
            if width * int(rows.sum()) > (1 + waste) * real:
                break
            chosen.append(length)
        groups.append(torch.isin(tail_length, torch.tensor(chosen)).nonzero().squeeze(1))
        lengths = lengths[len(chosen) :]
    return groups


def _prefix_replay(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    subject_pos: torch.Tensor,
    layer: int,
    device: torch.device,
) -> UpperReplay:
    prefix, prefix_mask, prefix_pos, tail, tail_mask, tail_pos = (
        t.to(device) for t in _split_at(input_ids, attention_mask, subject_pos)
    )
    # Full-attention cache layers (no config): every layer keeps all prefix positions; the model's own masks
    # apply any sliding window.
    cache = DynamicCache()
    cache_arg = kv_cache_argument(model)
    prefix_kv = None
    with torch.no_grad():
        if prefix.shape[1]:
            cache_inputs: dict[str, Any] = {cache_arg: cache}
            run_until(model, adapter.final_norm(), input_ids=prefix, attention_mask=prefix_mask,
                      position_ids=prefix_pos, use_cache=True, **cache_inputs)
            # Rows whose subject is their first token have an all-padding prefix: zero its keys and values (which
            # attention masks out), so that no NaN of a fully masked softmax reaches the replayed positions.
            keep = prefix_mask.bool()[:, None, :, None]
            layers: list[Any] = list(cache.layers)
            prefix_kv = [(torch.where(keep, lay.keys, 0.0), torch.where(keep, lay.values, 0.0)) for lay in layers]
            for cache_layer, (keys, values) in zip(layers, prefix_kv, strict=True):
                cache_layer.keys, cache_layer.values = keys, values
        with _replay_capture(adapter, layer) as (hidden, calls), suppress(StopForward):
            model(input_ids=tail, attention_mask=torch.cat([prefix_mask, tail_mask], 1), position_ids=tail_pos,
                  use_cache=prefix_kv is not None, **({cache_arg: cache} if prefix_kv is not None else {}))
    return UpperReplay(hidden[0], subject_pos.clone(), calls, prefix_kv, cache)


def _split_at(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, subject_pos: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Rows cut before ``subject_pos``: the prefix padded on the left, the tail on the right, and positions."""
    lengths = attention_mask.sum(1)
    n_rows = input_ids.shape[0]
    width_prefix = int(subject_pos.max())
    width_tail = int((lengths - subject_pos).max())
    prefix = torch.zeros((n_rows, width_prefix), dtype=torch.long)
    prefix_mask = torch.zeros_like(prefix)
    prefix_pos = torch.zeros_like(prefix)
    tail = torch.zeros((n_rows, width_tail), dtype=torch.long)
    tail_mask = torch.zeros_like(tail)
    for r in range(n_rows):
        s, length = int(subject_pos[r]), int(lengths[r])
        if s:
            prefix[r, -s:] = input_ids[r, :s]
            prefix_mask[r, -s:] = 1
            prefix_pos[r, -s:] = torch.arange(s)
        tail[r, : length - s] = input_ids[r, s:length]
        tail_mask[r, : length - s] = 1
    tail_pos = subject_pos[:, None] + torch.arange(width_tail)
    return prefix, prefix_mask, prefix_pos, tail, tail_mask, tail_pos


def _take(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` with every batch-first tensor (leading size ``n``) restricted to ``rows``."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.ndim >= 2 and value.shape[0] == n and n > 1 else value
    if isinstance(value, tuple):
        return tuple(_take(v, rows, n) for v in value)
    if isinstance(value, list):
        return [_take(v, rows, n) for v in value]
    if isinstance(value, dict):
        return {k: _take(v, rows, n) for k, v in value.items()}
    return value


@contextmanager
def _replay_capture(adapter: ModelAdapter, layer: int) -> Iterator[tuple[list[torch.Tensor], list[Call]]]:
    """Record block ``layer``'s output and the call arguments of every later block; stop at the final norm."""
    hidden: list[torch.Tensor] = []
    calls: list[Call] = []

    def keep_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        hidden.append(first_tensor(output).detach())

    def keep_call(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        kwargs.pop("hidden_states", None)
        calls.append((args[1:], kwargs))

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        raise StopForward

    handles = [adapter.block(layer).register_forward_hook(keep_output)]
    try:
        for i in range(layer + 1, adapter.num_layers):
            handles.append(adapter.block(i).register_forward_pre_hook(keep_call, with_kwargs=True))
        handles.append(adapter.final_norm().register_forward_pre_hook(stop))
        yield hidden, calls
    finally:
        for handle in handles:
            handle.remove()
