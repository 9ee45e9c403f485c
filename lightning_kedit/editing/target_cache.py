"""On-disk cache of target values δ, so that editing the same fact on the same model is optimised only once.

The target value of a request (the change δ of the hidden state after the insertion layer that makes the new
answer likely, see :mod:`lightning_kedit.editing.targets`) depends only on the model's weights, the request,
the context templates and the optimisation's hyper-parameters. It does not depend on the other requests of
its batch: every request owns one row of δ and the loss is a sum over requests, so Adam moves each row alone.
A benchmark that edits the first 100 facts and then the first 1,000 can therefore reuse the first 100
targets, and a run that was interrupted can pick up where it stopped.

Files live under ``<root>/<fingerprint digest>/<settings digest>/<request digest>.safetensors`` with ``root``
defaulting to ``cache_dir()/targets``:

- the fingerprint digest is that of :func:`~lightning_kedit.models.fingerprint.model_fingerprint` over the edit
  layers (so a sequential run, whose edit layers change after every edit, never reads a stale target);
- the settings digest covers the insertion layer, the templates, every hyper-parameter that the optimisation
  reads, the device type and a hash of the source code of the target computation (a code change empties the
  cache rather than serving targets the new code would not compute);
- the request digest covers the prompt, subject and both targets.

Every write goes to a temporary file that is renamed into place, so a killed process never leaves a truncated
file behind; a file that cannot be read is treated as a miss and rewritten.

Example:
    >>> cache = TargetCache("/tmp/kedit-targets")  # doctest: +SKIP
    >>> values = compute_target_values(model, tokenizer, requests, 8, ["{}"], hp, target_cache=cache)  # doctest: +SKIP
    >>> cache.hits, cache.misses  # doctest: +SKIP
    (0, 10)
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.target_values import TargetValues
from lightning_kedit.files import atomic_save_safetensors, short_digest
from lightning_kedit.models.fingerprint import fingerprint_digest, model_fingerprint
from lightning_kedit.requests import EditRequest

__all__ = ["CachedTarget", "TargetCache", "request_digest"]

#: Hyper-parameters that do not change a request's target value (solver, fine-tuning and batching settings).
_NOT_TARGET_FIELDS = frozenset(
    {"batch_size", "mom2_weight", "lambda_relative", "bare_weight", "ft_norm_bound", "ft_steps", "ft_lr"}
)
#: Modules whose source code decides the target values (hashed into the settings digest).
_CODE_MODULES = (
    "lightning_kedit.editing.targets",
    "lightning_kedit.editing.replay",
    "lightning_kedit.editing.keys",
    "lightning_kedit.editing.upper_blocks",
)
_DIGEST_CHARS = 24

CachedTarget = tuple[torch.Tensor, float, int]
"""One request's ``(delta (value_size,) float64, probability of the target, optimisation steps)``."""


def _sha(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return short_digest(text, _DIGEST_CHARS)


@cache
def _code_digest() -> str:
    """A hash of the source code that computes target values (empty modules hash to a constant)."""
    digest = hashlib.sha256()
    for name in _CODE_MODULES:
        module = sys.modules.get(name) or __import__(name, fromlist=["_"])
        try:
            digest.update(inspect.getsource(module).encode())
        except (OSError, TypeError):  # pragma: no cover - frozen or source-less installs
            digest.update(name.encode())
    return digest.hexdigest()[:_DIGEST_CHARS]


def request_digest(request: EditRequest) -> str:
    """A digest of the fields of ``request`` that its target value depends on.

    Example:
        >>> a = EditRequest("1", "{} is in", "Paris", "Rome", "France")
        >>> b = EditRequest("2", "{} is in", "Paris", "Rome", "France")
        >>> request_digest(a) == request_digest(b)  # the case id does not matter
        True
    """
    return _sha([request.prompt, request.subject, request.target_new, request.target_true])


class TargetCache:
    """Target values on disk, keyed by (model fingerprint, request, hyper-parameters).

    Args:
        root: the cache folder; ``cache_dir()/targets`` (``$KEDIT_CACHE/targets``) when None.
        enabled: when False, :meth:`lookup_or_compute` computes everything and writes nothing.

    Attributes:
        hits: targets read from disk since construction.
        misses: targets computed since construction.

    Example:
        >>> cache = TargetCache("/tmp/kedit-targets-doc")
        >>> cache.root.name, cache.hits, cache.misses
        ('kedit-targets-doc', 0, 0)
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, enabled: bool = True) -> None:
        if root is None:
            from lightning_kedit.files import cache_dir

            root = cache_dir() / "targets"
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"`root` must be a path, got {type(root).__name__}")
        self.root = Path(root).expanduser()
        self.enabled = bool(enabled)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"TargetCache(root={str(self.root)!r}, hits={self.hits}, misses={self.misses})"

    # ------------------------------------------------------------------ keys
    def folder(
        self,
        model: nn.Module,
        tokenizer: Any,
        layer: int,
        templates: Sequence[str],
        hparams: EditHyperParams,
    ) -> Path:
        """The folder holding the targets of ``model`` at ``layer`` under these templates and hyper-parameters."""
        layers = sorted({*hparams.layers, int(layer)})
        fingerprint = fingerprint_digest(model_fingerprint(model, tokenizer, layers))
        settings = {name: value for name, value in hparams.to_dict().items() if name not in _NOT_TARGET_FIELDS}
        settings.update(
            layer=int(layer),
            templates=list(templates),
            device=next(model.parameters()).device.type,
            dtype=str(next(model.parameters()).dtype),
            code=_code_digest(),
        )
        return self.root / fingerprint / _sha(settings)

    # ------------------------------------------------------------------ one request
    def get(self, folder: Path, request: EditRequest) -> CachedTarget | None:
        """The cached ``(delta, prob, steps)`` of ``request`` in ``folder``, or None (also for a corrupt file)."""
        path = folder / f"{request_digest(request)}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            delta = tensors["delta"].to(torch.float64)
            return delta, float(tensors["prob"][0]), int(tensors["steps"][0])
        except Exception:  # a truncated or foreign file is a miss; it is rewritten on put
            return None

    def put(self, folder: Path, request: EditRequest, delta: torch.Tensor, prob: float, steps: int) -> Path:
        """Store one request's target value atomically (a temporary file renamed into place)."""

        if delta.dim() != 1:
            raise ValueError(f"`delta` must be one request's vector (value_size,), got shape {tuple(delta.shape)}")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{request_digest(request)}.safetensors"
        tensors = {
            "delta": delta.detach().to("cpu", torch.float64).contiguous(),
            "prob": torch.tensor([float(prob)], dtype=torch.float64),
            "steps": torch.tensor([int(steps)], dtype=torch.int64),
        }
        metadata = {"case_id": request.case_id, "prompt": request.prompt_text, "target_new": request.target_new}
        return atomic_save_safetensors(tensors, path, metadata)

    # ------------------------------------------------------------------ many requests
    def lookup_or_compute(
        self,
        model: nn.Module,
        tokenizer: Any,
        requests: Sequence[EditRequest],
        layer: int,
        templates: Sequence[str],
        hparams: EditHyperParams,
        compute: Callable[[Sequence[EditRequest]], TargetValues],
    ) -> TargetValues:
        """Target values of ``requests``: cached ones read, the others computed together by ``compute`` and stored.

        Args:
            model: the model the targets are for (its current weights).
            tokenizer: its tokenizer.
            requests: the requests, in the order of the returned rows.
            layer: the insertion layer.
            templates: the context templates of the optimisation.
            hparams: the hyper-parameters of the optimisation.
            compute: computes the target values of a list of requests (called once, on the misses only).

        Returns:
            :class:`~lightning_kedit.editing.target_values.TargetValues` with one row per request, in order.
        """
        if not self.enabled:
            self.misses += len(requests)
            return compute(requests)
        folder = self.folder(model, tokenizer, layer, templates, hparams)
        found = [self.get(folder, request) for request in requests]
        missing = [i for i, hit in enumerate(found) if hit is None]
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        if missing:
            computed = compute([requests[i] for i in missing])
            for row, index in enumerate(missing):
                entry = (computed.delta[row].double().cpu(), float(computed.prob[row]), int(computed.steps[row]))
                self.put(folder, requests[index], *entry)
                found[index] = entry
        rows = [hit for hit in found if hit is not None]
        return TargetValues(
            delta=torch.stack([delta for delta, _, _ in rows]),
            prob=torch.tensor([prob for _, prob, _ in rows]),
            steps=torch.tensor([steps for _, _, steps in rows], dtype=torch.long),
            layer=int(layer),
        )
