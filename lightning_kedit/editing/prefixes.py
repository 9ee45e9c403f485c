"""Context prefixes: short texts written by the model itself, put before edit prompts.

MEMIT and ROME average keys and optimise target values over the edit prompt preceded by a few short random
contexts, so that the edit holds whatever comes before the subject. The prefixes are sampled once per model
(seeded top-k sampling from a few common sentence openings, with a plain causal forward pass: every new token
sees all the tokens before it) and cached on disk by a fingerprint of the model's weights.

Example:
    >>> templates = context_templates(model, tokenizer, ((5, 2),))  # doctest: +SKIP
    >>> templates[0], templates[1]  # doctest: +SKIP
    ('{}', 'The first step in the process. {}')
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.files import atomic_write_json, cache_dir

__all__ = ["OPENINGS", "context_templates", "generate_prefixes", "generate_templates", "model_digest"]

#: Sentence openings the prefixes start from (as in MEMIT's ``get_context_templates``).
OPENINGS = ("The", "Therefore", "Because", "I", "You")

_MEMO: dict[str, list[str]] = {}


def model_digest(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> str:
    """A short content hash of the model's input embeddings, final layers and vocabulary."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    digest.update(repr((getattr(config, "model_type", None), getattr(config, "num_hidden_layers", None))).encode())
    params = list(model.parameters())
    for tensor in (params[0], params[-1]):
        # A copy: numpy() of the parameter's own storage would pin it (FSDP2 frees and resizes that storage).
        digest.update(tensor.detach().to(torch.float32).cpu().clone().numpy().tobytes())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()[:20]


@torch.no_grad()
def generate_prefixes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    count: int,
    *,
    seed: int = 0,
    top_k: int = 5,
) -> list[str]:
    """``count`` texts of ``length`` new tokens each, sampled from the model after :data:`OPENINGS`.

    Sampling is top-k with a private generator (the global RNG is untouched). Each new token is predicted
    from the full causal context of its row; rows of one opening have the same length, so there is no
    padding to mask.

    Example:
        >>> generate_prefixes(model, tokenizer, 5, 2)  # doctest: +SKIP
        ['The first step in the process', 'Therefore, the best way to']
    """
    if length < 1 or count < 0:
        raise ValueError(f"`length` must be >= 1 and `count` >= 0, got length={length}, count={count}")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    texts: list[str] = []
    for i, opening in enumerate(OPENINGS):
        n_rows = count // len(OPENINGS) + (1 if i < count % len(OPENINGS) else 0)
        if n_rows == 0:
            continue
        start = list(tokenizer(opening)["input_ids"])
        if tokenizer.eos_token_id is not None and start[0] != tokenizer.bos_token_id:
            # No BOS: start a new document the way pre-training data does, after an end-of-text token.
            start = [int(tokenizer.eos_token_id), *start]
        ids = torch.tensor([start] * n_rows, device=device)
        for _ in range(length):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1].float().cpu()
            if special:
                logits[:, sorted(i for i in special if i < logits.shape[1])] = float("-inf")
            top = logits.topk(min(top_k, logits.shape[1]), dim=-1)
            choice = torch.multinomial(top.values.softmax(-1), 1, generator=generator)
            ids = torch.cat([ids, top.indices.gather(1, choice).to(device)], dim=1)
        for row in ids.tolist():
            texts.append(_clean(str(tokenizer.decode(row, skip_special_tokens=True))))
    return texts


def _clean(text: str) -> str:
    # Braces would break str.format-style templates; newlines would split the prompt from its context.
    return " ".join(text.replace("{", " ").replace("}", " ").split())


def context_templates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lengths: Sequence[tuple[int, int]],
    *,
    seed: int = 0,
    cache: bool = True,
) -> list[str]:
    """Templates ``"{}"`` and ``"<prefix>. {}"`` for every generated prefix (``(length, count)`` pairs).

    Cached in memory and under ``cache_dir()/prefixes`` by model digest, lengths and seed.
    """
    lengths = tuple((int(a), int(b)) for a, b in lengths)
    key = f"{model_digest(model, tokenizer)}-{seed}-v2-" + "_".join(f"{a}x{b}" for a, b in lengths)
    if key in _MEMO:
        return list(_MEMO[key])
    path = cache_dir() / "prefixes" / f"{key}.json"
    templates = _read_templates(path) if cache else None
    if templates is None:
        templates = generate_templates(model, tokenizer, lengths, seed)
        if cache:
            # Processes that start on an empty cache together (DDP ranks, parallel commands) each generate the
            # same seeded entry and write it whole; no lock, since a sharded model's forward needs every rank.
            atomic_write_json(path, {"templates": templates}, indent=1)
    _MEMO[key] = list(templates)
    return templates


def _read_templates(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    try:
        return [str(t) for t in json.loads(path.read_text())["templates"]]
    except (ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is regenerated


def generate_templates(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, lengths: Sequence[tuple[int, int]], seed: int
) -> list[str]:
    """``"{}"`` and, per ``(length, count)``, ``count`` generated prefixes of ``length`` tokens (``"<prefix>. {}"``)."""
    templates = ["{}"]
    for length, count in lengths:
        templates += [f"{text}. {{}}" for text in generate_prefixes(model, tokenizer, length, count, seed=seed)]
    return templates
