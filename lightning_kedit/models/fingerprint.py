"""The identity of a model, for caches and deltas: what was it made for?

Key statistics and edit deltas are only valid for the model they were computed on. A fingerprint is a small
``dict[str, str]`` — the model type, its sizes, a hash of the edited layers' projection weights and a hash of
the tokenizer vocabulary — stored with the artefact and compared when it is loaded. Hashing only the
projection weights of the named layers keeps it fast (a few MB for SmolLM2) while telling apart any two
checkpoints in practice.

Example:
    >>> import torch
    >>> weights_hash(torch.zeros(2, 3)) == weights_hash(torch.zeros(2, 3))
    True
    >>> weights_hash(torch.zeros(2, 3)) == weights_hash(torch.zeros(3, 2))
    False
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_kedit.files import short_digest
from lightning_kedit.models.adapters import ModelAdapter

__all__ = [
    "fingerprint_digest", "fingerprint_mismatches", "model_digest", "model_fingerprint", "vocab_hash", "weights_hash",
]

_HASH_CHARS = 16


def _update_with_tensor(digest: Any, tensor: torch.Tensor) -> None:
    from lightning_kedit.models.sharding import full_weight

    # A sharded (FSDP2) weight is gathered first (a collective call): the hash is that of the whole weight.
    flat = full_weight(tensor).detach().to("cpu").contiguous().reshape(-1)
    digest.update(f"{str(flat.dtype).removeprefix('torch.')}:{tuple(tensor.shape)}:".encode())
    # Viewing the storage as bytes works for every dtype, bfloat16 included (numpy has no bfloat16).
    digest.update(flat.view(torch.uint8).numpy().tobytes())


def weights_hash(tensor: torch.Tensor) -> str:
    """A short hex digest of a tensor's dtype, shape and exact values.

    Args:
        tensor: any tensor, on any device.

    Returns:
        16 hex characters of a SHA-256; equal tensors give equal hashes, a single changed bit changes it.

    Example:
        >>> len(weights_hash(torch.ones(4)))
        16
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`tensor` must be a torch.Tensor, got {type(tensor).__name__}")
    digest = hashlib.sha256()
    _update_with_tensor(digest, tensor)
    return digest.hexdigest()[:_HASH_CHARS]


def vocab_hash(tokenizer: Any) -> str:
    """A short hex digest of a tokenizer's vocabulary (token -> id) and its special tokens.

    Example:
        >>> class Tok:
        ...     all_special_tokens = ["<eos>"]
        ...     def get_vocab(self):
        ...         return {"a": 0, "<eos>": 1}
        >>> len(vocab_hash(Tok()))
        16
    """
    vocab = tokenizer.get_vocab()
    special = sorted(str(token) for token in getattr(tokenizer, "all_special_tokens", []))
    payload = json.dumps([sorted(vocab.items()), special], separators=(",", ":"), ensure_ascii=False)
    return short_digest(payload, _HASH_CHARS)


def model_fingerprint(model: nn.Module, tokenizer: Any | None, layers: Sequence[int]) -> dict[str, str]:
    """The identity of ``model`` (and ``tokenizer``) as far as artefacts for ``layers`` are concerned.

    Args:
        model: a causal LM supported by :class:`~lightning_kedit.models.adapters.ModelAdapter`.
        tokenizer: its tokenizer, or ``None`` to leave the vocabulary out.
        layers: the layers whose MLP output projection weights are hashed (the edit layers).

    Returns:
        ``{"model_type", "num_layers", "key_size", "value_size", "vocab_size", "layers", "weights"}`` and,
        with a tokenizer, ``"tokenizer"``; all values are strings, so that the dict fits safetensors metadata.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> fp = model_fingerprint(model, None, [0, 1])
        >>> fp["model_type"], fp["layers"], fp["key_size"]
        ('gpt2', '0,1', '128')
    """
    adapter = ModelAdapter.for_model(model)
    checked = adapter.check_layers(list(layers))
    digest = hashlib.sha256()
    for layer in checked:
        _update_with_tensor(digest, adapter.weight(layer))
    config = getattr(model, "config", None)
    fingerprint = {
        "model_type": adapter.model_type,
        "num_layers": str(adapter.num_layers),
        "key_size": str(adapter.key_size),
        "value_size": str(adapter.value_size),
        "vocab_size": str(getattr(config, "vocab_size", "")),
        "layers": ",".join(str(layer) for layer in checked),
        "weights": digest.hexdigest()[:_HASH_CHARS],
    }
    if tokenizer is not None:
        fingerprint["tokenizer"] = vocab_hash(tokenizer)
    return fingerprint


def model_digest(model: nn.Module) -> str:
    """A short digest of an exact checkpoint: its model type, sizes and first and last MLP projection weights.

    Keys settings tested on one exact model (not on a family or a layer count); any fine-tuning changes it.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> len(model_digest(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))))
        16
    """
    adapter = ModelAdapter.for_model(model)
    fingerprint = model_fingerprint(model, None, sorted({0, adapter.num_layers - 1}))
    return fingerprint_digest(fingerprint)


def fingerprint_digest(fingerprint: Mapping[str, str], *extra: str) -> str:
    """A short digest of a fingerprint (and of ``extra`` strings), usable as a file name.

    Example:
        >>> fingerprint_digest({"a": "1"}) == fingerprint_digest({"a": "1"})
        True
    """
    payload = json.dumps([sorted(fingerprint.items()), list(extra)], separators=(",", ":"))
    return short_digest(payload, _HASH_CHARS)


def fingerprint_mismatches(
    stored: Mapping[str, str], current: Mapping[str, str], keys: Iterable[str] | None = None
) -> list[str]:
    """The human-readable differences between two fingerprints, over the keys both hold (or ``keys``).

    Example:
        >>> fingerprint_mismatches({"model_type": "gpt2"}, {"model_type": "llama"})
        ["model_type: stored 'gpt2', current 'llama'"]
    """
    names = [k for k in stored if k in current] if keys is None else [k for k in keys if k in stored and k in current]
    return [
        f"{name}: stored {stored[name]!r}, current {current[name]!r}" for name in names if stored[name] != current[name]
    ]
