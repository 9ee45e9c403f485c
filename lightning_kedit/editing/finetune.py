"""Constrained fine-tuning (FT-L): the baseline that locate-then-edit methods must beat.

One layer's MLP output projection is optimised with Adam on the negative log-likelihood of each request's
new target after its edit prompt (the ROME paper's FT-L baseline, §4): after every step the change is
clamped to an L∞ ball ``|W − W₀|∞ <= ε`` around the original weight, which keeps the edit local. The
optimisation runs on a float32 copy of the weight passed to the model with ``torch.func.functional_call``,
so the model itself is never changed; the result is a dense :class:`EditDelta` to apply.

Defaults follow the FT-L configuration of the ROME repository (``hparams/FT/*_constr.json``: 25 steps,
learning rate 5e-4, L∞ bound 5e-4, early stop once the mean NLL is below 1e-2).

Example:
    >>> from lightning_kedit import load_model  # doctest: +SKIP
    >>> model, tokenizer = load_model("smollm2")  # doctest: +SKIP
    >>> delta = compute_finetune_delta(model, tokenizer, requests, linf_bound=1e-3)  # doctest: +SKIP
    >>> delta.apply(model)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.scoring import encode_pairs
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

__all__ = ["compute_finetune_delta"]

log = logging.getLogger(__name__)


def _batches(
    tokenizer: Any, requests: Sequence[EditRequest], batch_size: int, device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Right-padded ``(input_ids, attention_mask, answer_mask)`` batches of prompt + new target.

    ``answer_mask[b, t]`` is 1 where the token at ``t + 1`` is an answer token, i.e. where the logits at
    ``t`` are scored.
    """
    pairs = encode_pairs(tokenizer, [r.prompt_text for r in requests], [r.target_new for r in requests])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        answer = torch.zeros((len(chunk), width - 1), dtype=torch.float32)
        for row, (ids, context) in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            answer[row, context - 1 : len(ids) - 1] = 1.0
        batches.append((input_ids.to(device), attention.to(device), answer.to(device)))
    return batches


def _batch_nll(model: nn.Module, params: dict[str, Tensor], batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Sum over the batch's requests of the mean NLL per answer token, with the model's parameters ``params``."""
    input_ids, attention, answer = batch
    inputs = {"input_ids": input_ids, "attention_mask": attention, "use_cache": False}
    logits = functional_call(model, params, args=(), kwargs=inputs).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return ((token_nll * answer).sum(1) / answer.sum(1)).sum()


def compute_finetune_delta(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[EditRequest],
    *,
    layer: int | None = None,
    steps: int = 25,
    lr: float = 5e-4,
    linf_bound: float = 5e-4,
    batch_size: int = 32,
    min_loss: float = 1e-2,
) -> EditDelta:
    """Fine-tune one layer's projection on the edit prompts, within an L∞ bound, and return the change.

    Args:
        model: a causal LM (left exactly as it was).
        tokenizer: its tokenizer.
        requests: the facts to write; the loss is each request's mean NLL of ``target_new`` after
            ``prompt_text``, averaged over requests.
        layer: the layer whose MLP output projection is tuned; the middle default edit layer when None.
        steps: Adam steps at most (each over all requests).
        lr: Adam learning rate.
        linf_bound: ``ε``, the largest change of any weight entry.
        batch_size: requests per forward pass (gradients are accumulated over the batches of a step).
        min_loss: stop early once the mean NLL is below this.

    Returns:
        A dense :class:`EditDelta` with ``method="ft"`` on ``layer``.

    Raises:
        KeditError: the request list is empty.
    """
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    for name, number in (("lr", lr), ("linf_bound", linf_bound)):
        if not number > 0:
            raise ValueError(f"`{name}` must be > 0, got {number!r}")
    adapter = ModelAdapter.for_model(model)
    if layer is None:
        defaults = adapter.default_layers()
        layer = defaults[len(defaults) // 2]
    layer = adapter.check_layers([layer], "layer")[0]
    param_name = adapter.weight_name(layer)
    base = adapter.weight(layer).detach()
    batches = _batches(tokenizer, requests, batch_size, base.device)

    # Every other parameter is passed detached: autograd then records the graph only from the tuned layer up.
    frozen = {name: p.detach() for name, p in model.named_parameters()}
    master = base.float().clone().requires_grad_(True)
    lower, upper = master.detach() - linf_bound, master.detach() + linf_bound
    optimizer = torch.optim.Adam([master], lr=lr)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for step in range(steps):
                loss = 0.0
                master.grad = torch.zeros_like(master)
                for batch in batches:
                    # autograd.grad (not backward) leaves the model's own parameters' .grad untouched.
                    params = {**frozen, param_name: master.to(base.dtype)}
                    nll = _batch_nll(model, params, batch) / len(requests)
                    (grad,) = torch.autograd.grad(nll, [master])
                    master.grad += grad
                    loss += float(nll.detach())
                log.debug("ft step %d: mean NLL %.4f", step, loss)
                if loss < min_loss:
                    break
                optimizer.step()
                with torch.no_grad():
                    master.copy_(torch.minimum(torch.maximum(master, lower), upper))
    finally:
        model.train(was_training)
    change = adapter.from_stored_layout(master.detach().double() - base.double())
    hparams = {"layer": layer, "steps": steps, "lr": lr, "linf_bound": linf_bound, "batch_size": batch_size,
               "min_loss": min_loss}
    return EditDelta.from_model(model, {layer: change}, method="ft", hparams=hparams,
                                request_ids=[r.case_id for r in requests], tokenizer=tokenizer)
