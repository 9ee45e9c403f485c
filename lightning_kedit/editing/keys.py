"""Keys: the projection input at the subject's last token, averaged over context-prefixed prompts.

The subject's last token is located from character offsets, not by searching token ids: the prompt is
tokenised whole (with the tokenizer's own special tokens, BOS or not) and the token covering the last character
of the subject is taken. Rows are padded on the right by this module whatever the tokenizer's padding side, so
that causal attention never sees padding before a position that is read.

Example::

    states = subject_states(model, tokenizer, requests, ["{}", "Hello. {}"], key_layers=[4, 5])
    states.keys[4].shape  # (requests, key_size), float64: torch.Size([10, 1536]) for 10 requests on SmolLM2
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.forward_hooks import input_hooks, output_hooks, run_until
from lightning_kedit.models.model_mode import eval_mode
from lightning_kedit.requests import EditRequest
from lightning_kedit.token_batches import padding_id

from .token_rows import TokenRows, pad_rows

__all__ = [
    "SubjectNotFoundError",
    "SubjectStates",
    "locate_token",
    "subject_char_end",
    "subject_states",
    "template_weights",
    "tokenize_rows",
]


class SubjectNotFoundError(KeditError):
    """A request whose subject cannot be located in its prompt."""


@dataclass
class SubjectStates:
    """Per request, the template-averaged keys of each layer and hidden state after ``out_layer`` (float64)."""

    keys: dict[int, torch.Tensor]
    outputs: torch.Tensor | None


def locate_token(tokenizer: PreTrainedTokenizerBase, text: str, char_end: int) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding character ``char_end - 1``.

    Example:
        >>> ids, index = locate_token(tokenizer, "Toko Yasuda plays", len("Toko Yasuda"))  # doctest: +SKIP
    """
    if not 0 < char_end <= len(text):
        raise SubjectNotFoundError(f"character position {char_end} lies outside {text!r}")
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        for index, (start, end) in enumerate(encoded["offset_mapping"]):
            if start <= char_end - 1 < end:
                return ids, index
    # Slow tokenizers (or offsets that skip the character): count the tokens of the text up to the subject.
    ids = list(tokenizer(text)["input_ids"])
    head = list(tokenizer(text[:char_end])["input_ids"])
    eos = tokenizer.eos_token_id
    while head and eos is not None and head[-1] == eos and len(head) > 1 and ids[len(head) - 1] != eos:
        head.pop()  # tokenizers that append EOS to every text
    if not head or len(head) > len(ids):
        raise SubjectNotFoundError(f"cannot locate the token ending at character {char_end} of {text!r}")
    return ids, len(head) - 1


def subject_char_end(request: EditRequest, template: str = "{}") -> tuple[str, int]:
    """The filled text ``template.format(prompt)`` and the character index just after its subject."""
    if template.count("{}") != 1:
        raise KeditError(f"template {template!r} must hold '{{}}' exactly once")
    before, after = template.split("{}")
    prompt_before = request.prompt.split("{}")[0]
    text = before + request.prompt_text + after
    return text, len(before) + len(prompt_before) + len(request.subject)


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], char_ends: Sequence[int], pad_id: int | None = None
) -> TokenRows:
    """Tokenise ``texts``, pad them on the right and locate the token ending at each ``char_ends``."""
    rows: list[list[int]] = []
    positions: list[int] = []
    for text, end in zip(texts, char_ends, strict=True):
        ids, index = locate_token(tokenizer, text, end)
        rows.append(ids)
        positions.append(index)
    return pad_rows(rows, positions, padding_id(tokenizer) if pad_id is None else pad_id)


def _accumulator(
    store: torch.Tensor, owners: torch.Tensor, rows: TokenRows, weights: torch.Tensor
) -> Callable[[torch.Tensor], None]:
    """A hook body adding each row's state at its subject position, times its weight, into ``store[owner]``."""
    pick = torch.arange(len(rows.subject_pos))

    def accumulate(x: torch.Tensor) -> None:
        if x.ndim == 2:  # OPT flattens (batch, time) before its MLP
            x = x.view(*rows.input_ids.shape, -1)
        store.index_add_(0, owners, x[pick, rows.subject_pos.to(x.device)].double().cpu() * weights[:, None])

    return accumulate


@torch.no_grad()
def subject_states(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    templates: Sequence[str],
    *,
    key_layers: Sequence[int],
    out_layer: int | None = None,
    batch_size: int = 64,
    weights: Sequence[float] | None = None,
) -> SubjectStates:
    """Keys of ``key_layers`` and the output of block ``out_layer`` at each request's subject's last token.

    Both are averaged over the ``templates`` (``"{}"`` is the bare prompt), with ``weights`` (one per template,
    see :func:`template_weights`; uniform when None), and returned in float64, one row per request. The forward
    pass stops after the deepest layer needed.
    """
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    adapter = ModelAdapter.for_model(model)
    layers = sorted(set(int(i) for i in key_layers))
    deepest = max(layers + ([out_layer] if out_layer is not None else []))
    device = next(model.parameters()).device
    # Only the tokens up to the subject's last token matter (attention is causal): rows are cut there, sorted by
    # length and batched, so that little padding is computed.
    located: list[tuple[list[int], int, int, int]] = []
    share = torch.tensor(list(weights) if weights is not None else [1.0] * len(templates), dtype=torch.float64)
    if share.shape != (len(templates),) or not bool((share >= 0).all()) or not float(share.sum()) > 0:
        raise KeditError(f"`weights` must hold one non-negative weight per template ({len(templates)}), got {weights}")
    share = share / share.sum()
    for r, request in enumerate(requests):
        for t, template in enumerate(templates):
            text, end = subject_char_end(request, template)
            ids, index = locate_token(tokenizer, text, end)
            located.append((ids[: index + 1], index, r, t))
    located.sort(key=lambda row: len(row[0]))
    sums = {layer: torch.zeros(len(requests), adapter.key_size, dtype=torch.float64) for layer in layers}
    out_sum = torch.zeros(len(requests), adapter.value_size, dtype=torch.float64) if out_layer is not None else None
    pad_id = padding_id(tokenizer)
    with eval_mode(model):
        for start in range(0, len(located), batch_size):
            chunk = located[start : start + batch_size]
            rows = pad_rows([row[0] for row in chunk], [row[1] for row in chunk], pad_id)
            who = torch.tensor([row[2] for row in chunk])
            weight = share[[row[3] for row in chunk]]
            in_hooks = {adapter.mlp_out(layer): _accumulator(sums[layer], who, rows, weight) for layer in layers}
            out_hooks = {}
            if out_sum is not None and out_layer is not None:
                out_hooks = {adapter.block(out_layer): _accumulator(out_sum, who, rows, weight)}
            with input_hooks(in_hooks), output_hooks(out_hooks):
                run_until(
                    model,
                    adapter.block(deepest),
                    input_ids=rows.input_ids.to(device),
                    attention_mask=rows.attention_mask.to(device),
                    use_cache=False,
                )
    return SubjectStates(keys=sums, outputs=out_sum)


def template_weights(templates: Sequence[str], bare_weight: float | None) -> list[float] | None:
    """Per template, its share in averaged keys: ``bare_weight`` for the bare prompt ``"{}"``, the rest split
    evenly over the prefixed templates (the reference MEMIT code averages per kind of context, which gives the
    bare prompt 0.5). None: every template weighs the same.

    Example:
        >>> template_weights(["{}", "A. {}", "B. {}"], 0.5)
        [0.5, 0.25, 0.25]
    """
    if bare_weight is None or len(templates) < 2 or "{}" not in templates:
        return None
    if not 0 <= bare_weight <= 1:
        raise KeditError(f"`bare_weight` must lie in [0, 1], got {bare_weight}")
    rest = (1 - bare_weight) / (len(templates) - 1)
    return [bare_weight if template == "{}" else rest for template in templates]
