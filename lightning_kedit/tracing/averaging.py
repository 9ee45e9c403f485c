"""Traces averaged over many facts, and the edit layers chosen from them (``layers="auto"``).

:func:`average_trace` traces each fact only at the subject's last token and the prompt's last token, where
ROME reads the MLP and attention effects. :func:`choose_edit_layers` averages the MLP effect at the subject's
last token over known facts and returns a window of consecutive layers where it is large
(:func:`select_edit_window`: the deepest of the adjacent windows that the trace cannot tell from the
best one); the per-fact curves are cached per model, facts and settings.

Example:
    >>> curves = average_trace(model, tokenizer, load_requests("counterfact-val.json"), n=50)  # doctest: +SKIP
    >>> best_window(curves.mean("mlp"), 5)  # doctest: +SKIP
    [3, 4, 5, 6, 7]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.files import atomic_write_json, cache_dir
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

from .results import KINDS, AverageTrace, TracingError
from .trace import causal_trace, check_kinds, encode_prompt
from .tracer import model_device

__all__ = ["average_trace", "best_window", "choose_edit_layers", "select_edit_window"]

_WHERE = ("last_subject", "last_token")  # the two tokens of an averaged trace


def _greedy_token(model: nn.Module, tokenizer: Any, prompt: str) -> int:
    """The token id ``model`` predicts after ``prompt``."""
    ids = torch.tensor([tokenizer(prompt).input_ids], device=model_device(model))
    with torch.no_grad():
        return int(model(input_ids=ids).logits[0, -1].argmax())


def average_trace(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    n: int = 200,
    *,
    kinds: Sequence[str] = KINDS,
    known_only: bool = True,
    noise: float | None = None,
    samples: int = 10,
    seed: int = 0,
    window: int = 10,
    batch_size: int | None = None,
    progress: bool = False,
) -> AverageTrace:
    """Trace up to ``n`` facts at the subject's last token and the last token, for averaged curves.

    Each request's filled prompt is traced with its ``target_true`` as the answer (the model's greedy token
    when it has none). With ``known_only`` (ROME's choice) a fact is traced only when the model's greedy
    next token is the answer's first token, and requests are scanned until ``n`` such facts are found.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        requests: the facts (CounterFact requests, for instance).
        n: how many facts to trace.
        kinds, noise, samples, seed, window, batch_size: as in :func:`causal_trace`.
        known_only: skip facts the model does not predict.
        progress: show a progress bar.

    Example:
        >>> curves = average_trace(model, tokenizer, load_requests("counterfact-val.json"), n=50)  # doctest: +SKIP
        >>> curves.mean("mlp").argmax()  # doctest: +SKIP
    """
    if not isinstance(n, int) or n < 1:
        raise TracingError(f"`n`={n!r} must be a positive integer")
    kinds = check_kinds(kinds)
    rows: dict[str, dict[str, list[Tensor]]] = {where: {k: [] for k in kinds} for where in _WHERE}
    case_ids: list[str] = []
    probs: list[tuple[float, float]] = []
    scanned = 0
    bar = _progress(total=n, enabled=progress, desc="tracing facts")
    for request in requests:
        if len(case_ids) == n:
            break
        scanned += 1
        prompt, answer = request.prompt_text, request.target_true
        if known_only and answer is not None:
            expected = encode_prompt(model, tokenizer, prompt, request.subject, answer).answer_ids[0]
            if _greedy_token(model, tokenizer, prompt) != expected:
                continue
        first_pass = encode_prompt(model, tokenizer, prompt, request.subject, None)
        last_subject, last = first_pass.subject[1] - 1, len(first_pass.ids) - 1
        result = causal_trace(
            model,
            tokenizer,
            prompt,
            request.subject,
            answer,
            kinds=kinds,
            noise=noise,
            samples=samples,
            seed=seed,
            window=window,
            batch_size=batch_size,
            positions=(last_subject, last),
        )
        for kind in kinds:
            rows["last_subject"][kind].append(result.effects[kind][last_subject])
            rows["last_token"][kind].append(result.effects[kind][last])
        case_ids.append(request.case_id)
        probs.append((result.clean_prob, result.corrupted_prob))
        bar.update(1)
    bar.close()
    layers = ModelAdapter.for_model(model).num_layers

    def stack(values: list[Tensor]) -> Tensor:
        return torch.stack(values) if values else torch.empty(0, layers, dtype=torch.float64)

    clean, corrupted = (torch.tensor([p[i] for p in probs], dtype=torch.float64) for i in (0, 1))
    return AverageTrace(
        kinds=kinds,
        case_ids=tuple(case_ids),
        last_subject={k: stack(v) for k, v in rows["last_subject"].items()},
        last_token={k: stack(v) for k, v in rows["last_token"].items()},
        clean_probs=clean,
        corrupted_probs=corrupted,
        scanned=scanned,
        known_only=known_only,
    )


def best_window(curve: Tensor, window: int) -> list[int]:
    """The ``window`` consecutive layers with the largest total of ``curve`` (the first, on ties).

    Example:
        >>> best_window(torch.tensor([0.0, 0.1, 0.5, 0.4, 0.0, 0.2]), 2)
        [2, 3]
    """
    if curve.dim() != 1 or not 1 <= window <= len(curve):
        raise TracingError(f"`window`={window!r} must lie in [1, {len(curve)}] (the number of layers)")
    totals = curve.double().unfold(0, window, 1).sum(-1)
    start = int(torch.argmax(totals))
    return list(range(start, start + window))


def select_edit_window(effects: Tensor, window: int) -> list[int]:
    """Edit layers from per-fact MLP effects: the deepest adjacent window the trace cannot tell from the best.

    ``effects`` holds one row of indirect effects per traced fact (``(facts, layers)``). Each fact's total
    over every window of ``window`` consecutive layers is formed; the best window has the largest mean
    total (:func:`best_window`). A window is *indistinguishable* from it when its mean deficit against the
    best, paired fact by fact, is at most one standard error of that deficit (the one-standard-error rule of
    model selection). Starting at the best window, the choice moves one layer deeper while the next window
    is indistinguishable, and stops at the first that is not; it never jumps over a window the trace
    separates from the best.

    Why deeper: MEMIT writes its target residual at the window's last layer, and on the measured model
    (docs/benchmarks/tracing.md) the window one layer shallower than the tuned one had the larger mean
    effect by less than its noise but edited with a worse neighbourhood score. With one fact there is no
    error estimate and the best window is returned.

    Args:
        effects: ``(facts, layers)`` indirect effects (``AverageTrace.last_subject["mlp"]``), or one
            ``(layers,)`` curve.
        window: how many consecutive layers to return.

    Example:
        >>> effects = torch.tensor([[0.0, 1.0, 1.3, 1.1, 0.0], [0.0, 1.2, 1.0, 0.9, 0.0], [0.0, 1.1, 1.0, 1.05, 0.0]])
        >>> best_window(effects.mean(0), 2)
        [1, 2]
        >>> select_edit_window(effects, 2)  # [2, 3] trails [1, 2] by 0.08 ± 0.12: within the noise
        [2, 3]
    """
    if effects.dim() == 1:
        effects = effects.unsqueeze(0)
    if effects.dim() != 2 or effects.shape[0] == 0:
        raise TracingError(f"`effects` must be a (facts, layers) tensor with a fact; got shape {tuple(effects.shape)}")
    effects = effects.double()
    best = best_window(effects.mean(0), window)[0]
    facts = effects.shape[0]
    if facts < 2:
        return list(range(best, best + window))
    totals = effects.unfold(1, window, 1).sum(-1)  # (facts, windows)
    deficits = totals[:, best : best + 1] - totals  # paired, fact by fact
    mean, error = deficits.mean(0), deficits.std(0) / facts**0.5
    start = best
    while start + 1 < totals.shape[1] and mean[start + 1] <= error[start + 1]:
        start += 1
    return list(range(start, start + window))


def choose_edit_layers(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest] | None = None,
    *,
    window: int = 5,
    n: int = 50,
    samples: int = 10,
    seed: int = 0,
    trace_window: int = 10,
    cache: bool = True,
    progress: bool = False,
) -> list[int]:
    """Edit layers measured rather than guessed: a window where the MLPs carry the facts (``layers="auto"``).

    The MLP indirect effect at the subject's last token is traced for up to ``n`` known facts
    (:func:`average_trace`), and :func:`select_edit_window` returns ``window`` consecutive layers: from the
    window with the largest total effect, moved deeper while the next window is within the trace's noise.
    The per-fact curves are cached in ``cache_dir()/layers/`` under a digest of the model fingerprint, the
    requests and the trace settings, so a later call with other ``window`` sizes is instant.

    Args:
        model: a supported causal LM.
        tokenizer: its tokenizer.
        requests: facts to trace; ``None`` = the bundled CounterFact facts. When the model predicts none of
            them, its own greedy answers are traced instead.
        window: how many consecutive layers to return.
        n: how many facts to average over.
        samples, seed: noise draws per cell and their seed.
        trace_window: layers restored together per MLP cell (ROME's window).
        cache: read and write the cached curve.
        progress: show a progress bar.

    Example:
        >>> choose_edit_layers(model, tokenizer)  # doctest: +SKIP
        [3, 4, 5, 6, 7]
    """
    adapter = ModelAdapter.for_model(model)
    if not isinstance(window, int) or not 1 <= window <= adapter.num_layers:
        raise TracingError(f"`window`={window!r} must lie in [1, {adapter.num_layers}] (the number of layers)")
    if requests is None:
        from lightning_kedit.requests import bundled_requests

        requests = bundled_requests()
    requests = list(requests)
    path = _curve_path(model, tokenizer, requests, n=n, samples=samples, seed=seed, trace_window=trace_window)
    if cache and path.is_file():
        cached = json.loads(path.read_text())
        if "effects" in cached:  # entries of older versions hold only the mean curve: traced again
            return select_edit_window(torch.tensor(cached["effects"], dtype=torch.float64), window)
    settings: dict[str, Any] = dict(kinds=("mlp",), samples=samples, seed=seed, window=trace_window, progress=progress)
    traced = average_trace(model, tokenizer, requests, n, **settings)
    if traced.n == 0:
        unknown = [replace(r, target_true=None) for r in requests]
        traced = average_trace(model, tokenizer, unknown, n, known_only=False, **settings)
    if traced.n == 0:
        raise TracingError("`requests` is empty; give at least one fact to trace")
    effects = traced.last_subject["mlp"]
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "curve": traced.mean("mlp").tolist(),
            "effects": effects.tolist(),
            "case_ids": list(traced.case_ids),
            "known_only": traced.known_only,
        }
        atomic_write_json(path, entry, indent=None)
    return select_edit_window(effects, window)


def _curve_path(model: nn.Module, tokenizer: Any, requests: Sequence[EditRequest], **settings: Any) -> Path:
    """Where the averaged MLP curve for this model, these requests and settings is cached."""
    from lightning_kedit.models.fingerprint import fingerprint_digest, model_fingerprint

    layers = range(ModelAdapter.for_model(model).num_layers)
    facts = hashlib.sha256(
        json.dumps([(r.case_id, r.prompt_text, r.subject, r.target_true) for r in requests]).encode()
    ).hexdigest()
    key = fingerprint_digest(model_fingerprint(model, tokenizer, layers), facts, json.dumps(settings, sort_keys=True))
    return cache_dir() / "layers" / f"{key}.json"


def _progress(total: int, enabled: bool, desc: str) -> Any:
    """A tqdm progress bar, silent unless ``enabled``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)
