"""``POST /v1/completions``: OpenAI's completions API on the served model, at a known weights version.

:class:`CompletionAPI` is a LitServe ``LitAPI``. Each worker process loads the model, and before every batch
of requests brings it to the committed weights version (:class:`~.follower.WeightsFollower`); the whole batch
runs on that version and every response reports it as ``"kedit_version"``. Weights therefore change between
two batches, never inside one. Each prompt is generated on its own (no padding), so that its output depends
on the prompt and the weights only: ``temperature: 0`` is greedy decoding, token for token reproducible.

Example:
    >>> import litserve as ls
    >>> api = CompletionAPI("smollm2", "history", ServeKeys(None, "w"))  # doctest: +SKIP
    >>> ls.LitServer([api]).run(port=8000)  # doctest: +SKIP
"""

# No ``from __future__ import annotations``: LitServe reads decode_request's annotation as a type.
import os
import time
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from lightning_kedit.models.adapters import forward_parameters, kv_cache_argument

from .keys import ServeKeys
from .store import HistoryStore

__all__ = ["Completion", "CompletionAPI", "CompletionRequest", "generate_text"]


class CompletionRequest(BaseModel):
    """The fields of OpenAI's completions request that the server honours (others are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    prompt: str | list[str]
    model: str | None = None
    max_tokens: int = Field(16, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Completion:
    """One generated continuation: its text, tokens, why it stopped, and the prompt's length in tokens."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int


@torch.no_grad()
def generate_text(model: torch.nn.Module, tokenizer: Any, prompt: str, *, max_tokens: int = 16,
                  temperature: float = 0.0, top_p: float = 1.0, stop: list[str] | None = None,
                  seed: int | None = None) -> Completion:
    """Continue ``prompt``: greedy when ``temperature`` is 0, else sampled (nucleus ``top_p``, ``seed``).

    One sequence, no padding, with the key/value cache: the output depends on the prompt and the weights only.

    Example:
        >>> generate_text(model, tokenizer, "The Eiffel Tower is in", max_tokens=3).text  # doctest: +SKIP
        ' Paris, France'
    """
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    past = None
    step_ids = ids
    finish = "length"
    cache_name = kv_cache_argument(model)
    last_only: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in forward_parameters(model) else {}
    for _ in range(max_tokens):
        cache: dict[str, Any] = {cache_name: past} if past is not None else {}
        out = model(input_ids=step_ids, use_cache=True, **last_only, **cache)
        past = out.get(cache_name)
        logits = out.logits[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < top_p  # the smallest set holding top_p of the mass
            kept = sorted_probs * keep
            token = int(order[torch.multinomial(kept / kept.sum(), 1, generator=generator)])
        if eos is not None and token == eos:
            finish = "stop"
            break
        tokens.append(token)
        if stop and any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop):
            finish = "stop"
            break
        step_ids = torch.tensor([[token]], dtype=torch.long, device=device)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for s in stop or []:
        if s in text:
            text = text[: text.index(s)]
    return Completion(text, tokens, finish, int(ids.shape[1]))


class CompletionAPI(ls.LitAPI):
    """OpenAI completions on the served model; every response says the weights version that produced it.

    Args:
        model: the model spec (``"smollm2"``, a Hugging Face folder, a ``.gguf`` file).
        history: the history folder.
        keys: the server's keys (reading needs the read or the write key).
        threads: torch threads per worker (None: leave torch's default).
        traffic_statistics: record the served prompts' keys (see :mod:`.traffic`).
        max_batch_size: requests per batch (weights never change inside one).
        batch_timeout: seconds a batch waits to fill.
    """

    def __init__(self, model: str, history: str | os.PathLike[str], keys: ServeKeys, *, threads: int | None = None,
                 traffic_statistics: bool = False, max_batch_size: int = 8, batch_timeout: float = 0.01) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/completions")
        self.model_spec = model
        self.history = str(history)
        self._keys = keys
        self.threads = threads
        self.traffic_statistics = traffic_statistics

    def authorize(self, authorization: Annotated[str | None, Header()] = None) -> None:
        """FastAPI dependency: the read or the write key."""
        code = self._keys.status(authorization, write=False)
        if code is not None:
            raise HTTPException(code, "give the read or write key as 'Authorization: Bearer KEY'")

    def setup(self, device: str) -> None:
        """Load the model, bring it to the committed version, and hook traffic statistics when asked."""
        from lightning_kedit.editing.hparams import EditHyperParams
        from lightning_kedit.models.fingerprint import model_fingerprint
        from lightning_kedit.models.loading import load_model

        from .follower import WeightsFollower
        from .traffic import TrafficStatistics

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model, self.tokenizer = load_model(self.model_spec, device=device)
        store = HistoryStore(self.history)
        self.traffic: TrafficStatistics | None = None
        if self.traffic_statistics:
            layers = list(EditHyperParams.for_model(self.model, "memit").layers)
            fingerprint = model_fingerprint(self.model, self.tokenizer, layers)
            self.traffic = TrafficStatistics(self.model, layers, store.traffic_dir / f"{uuid.uuid4().hex}.safetensors",
                                             fingerprint)
        self.follower = WeightsFollower(self.model, store)
        self.follower.sync()

    def decode_request(self, request: CompletionRequest, **kwargs: Any) -> CompletionRequest:
        """The validated request (FastAPI answered 422 to a malformed one)."""
        return request

    def batch(self, inputs: list[CompletionRequest]) -> list[CompletionRequest]:
        """Requests stay a list: each prompt runs alone."""
        return inputs

    def predict(self, batch: list[CompletionRequest], **kwargs: Any) -> list[dict[str, Any]]:
        """Sync the weights (between batches), then complete every prompt of the batch on that version."""
        version = self.follower.sync()
        outputs = []
        for request in batch:
            prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
            stop = [request.stop] if isinstance(request.stop, str) else request.stop
            completions = []
            for prompt in prompts:
                scope: AbstractContextManager[None] = self.traffic.prompt() if self.traffic else nullcontext()
                with scope:
                    completions.append(generate_text(
                        self.model, self.tokenizer, prompt, max_tokens=request.max_tokens,
                        temperature=request.temperature, top_p=request.top_p, stop=stop, seed=request.seed,
                    ))
            outputs.append({"completions": completions, "version": version, "model": request.model})
        return outputs

    def unbatch(self, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One output per request."""
        return output

    def encode_response(self, output: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """OpenAI's ``text_completion`` object, plus ``kedit_version``, ``kedit_worker`` (the worker's process id)
        and each choice's ``token_ids``."""
        completions: list[Completion] = output["completions"]
        prompt_tokens = sum(c.prompt_tokens for c in completions)
        completion_tokens = sum(len(c.tokens) for c in completions)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": output["model"] or self.model_spec,
            "choices": [{"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason,
                         "token_ids": c.tokens} for i, c in enumerate(completions)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "kedit_version": output["version"],
            "kedit_worker": os.getpid(),
        }
