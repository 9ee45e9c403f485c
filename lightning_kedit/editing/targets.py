"""Target values v*: the change δ of the hidden state after the insertion layer that makes the new answer likely.

For every request, δ is added to the output of block ``L`` (the last edit layer) at the subject's last token of
each context-prefixed edit prompt, and optimised with Adam to minimise

    loss(δ) = NLL(target | prompts, δ) + kl_factor · KL(p₀ ‖ p_δ)("{subject} is a") + wd · ‖δ‖² / ‖h‖²

(MEMIT, Meng et al. 2023, eq. 16), with ``‖δ‖ ≤ clamp_norm · ‖h‖`` after each step, where ``h`` is the
original hidden state at the bare prompt. Requests are optimised together: each owns a row of δ and the loss
is their sum, so one forward/backward serves the whole batch, and a request leaves the batch once its target
is likely. Blocks ``0..L`` do not depend on δ: they run once, and every step replays blocks ``L+1..`` from the
cached hidden states with the same arguments the model passed them (captured by a pre-hook), then the final
norm and the LM head on the few positions the loss reads.

With ``v_bfloat16`` (by default where the device multiplies bfloat16 natively), a first phase runs bfloat16
copies of the upper blocks (:mod:`.upper_blocks`); then the model's own arithmetic evaluates every request again
and continues those below ``stop_prob``, so the reported probabilities and the stopping rule are exact. A request
gets at most ``v_steps − 1`` Adam updates over both phases.

Example:
    >>> values = compute_target_values(model, tokenizer, requests, layer=8, templates=["{}"])  # doctest: +SKIP
    >>> values.delta.shape, float(values.prob.min()) > 0.5  # doctest: +SKIP
    (torch.Size([10, 576]), True)
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.forward_hooks import first_tensor
from lightning_kedit.models.model_mode import eval_mode
from lightning_kedit.models.sharding import is_sharded_model
from lightning_kedit.requests import EditRequest
from lightning_kedit.token_batches import padding_id

from .hparams import EditHyperParams
from .keys import SubjectNotFoundError, subject_char_end
from .replay import prepare_replays
from .target_values import TargetValues
from .token_rows import pad_rows
from .upper_blocks import UpperBlocks, bfloat16_is_fast

if TYPE_CHECKING:
    from .target_cache import TargetCache

__all__ = ["NonFiniteEditError", "compute_target_values"]


class NonFiniteEditError(KeditError):
    """The optimisation produced NaN or infinite values (try a smaller learning rate or clamp)."""


@dataclass
class _Batch:
    rows_ids: torch.Tensor  # (R, T) right padded
    mask: torch.Tensor  # (R, T)
    subject_pos: torch.Tensor  # (R,)
    row_request: torch.Tensor  # (R,) request index of each row
    label_row: torch.Tensor  # (M,) row of each answer token
    label_pos: torch.Tensor  # (M,) position whose logits predict it
    label_id: torch.Tensor  # (M,)
    label_weight: torch.Tensor  # (M,) 1 / (answer tokens · rewrite rows of its request)
    kl_row: torch.Tensor  # (n,) the "{subject} is a" row of each request
    bare_row: torch.Tensor  # (n,) the bare-prompt row of each request


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]  # type: ignore[misc]
    return list(tokenizer(text)["input_ids"]), None


def _token_at(tokenizer: PreTrainedTokenizerBase, text: str, offsets: list[tuple[int, int]] | None, char: int) -> int:
    """Index of the token holding character ``char`` (falls back on tokenising the text up to it)."""
    if offsets is not None:
        for index, (start, end) in enumerate(offsets):
            if start <= char < end:
                return index
    return len(tokenizer(text[: char + 1], add_special_tokens=True)["input_ids"]) - 1


def _build_batch(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], templates: Sequence[str]
) -> _Batch:
    rows: list[list[int]] = []
    positions: list[int] = []
    row_request: list[int] = []
    labels: list[tuple[int, int, int, float]] = []
    special = set(tokenizer.all_special_ids)
    for r, request in enumerate(requests):
        for template in templates:
            prompt, subject_end = subject_char_end(request, template)
            sep = "" if prompt[-1:].isspace() else " "
            text = prompt + sep + request.target_new
            ids, offsets = _encode(tokenizer, text)
            subject = _token_at(tokenizer, text, offsets, subject_end - 1)
            if offsets is not None:
                first = next(i for i, (s, e) in enumerate(offsets) if s >= len(prompt) and e > s)
                last = max(i for i, (s, e) in enumerate(offsets) if e > s) + 1
            else:
                first, last = len(tokenizer(prompt)["input_ids"]), len(ids)
                while last > first and ids[last - 1] in special:
                    last -= 1
            if not 0 <= subject < first < last:
                raise SubjectNotFoundError(
                    f"request {request.case_id!r}: cannot place subject {request.subject!r} before the answer "
                    f"{request.target_new!r} in {text!r}"
                )
            row = len(rows)
            rows.append(ids[: last - 1])
            positions.append(subject)
            row_request.append(r)
            weight = 1.0 / ((last - first) * len(templates))
            labels += [(row, i - 1, ids[i], weight) for i in range(first, last)]
    kl_rows = []
    for r, request in enumerate(requests):
        text = f"{request.subject} is a"
        ids, offsets = _encode(tokenizer, text)
        subject = _token_at(tokenizer, text, offsets, len(request.subject) - 1)
        kl_rows.append(len(rows))
        rows.append(ids[: subject + 1])
        positions.append(subject)
        row_request.append(r)
    padded = pad_rows(rows, positions, padding_id(tokenizer))
    label = torch.tensor([x[:3] for x in labels], dtype=torch.long)
    return _Batch(
        rows_ids=padded.input_ids,
        mask=padded.attention_mask,
        subject_pos=padded.subject_pos,
        row_request=torch.tensor(row_request),
        label_row=label[:, 0],
        label_pos=label[:, 1],
        label_id=label[:, 2],
        label_weight=torch.tensor([x[3] for x in labels], dtype=torch.float32),
        kl_row=torch.tensor(kl_rows),
        bare_row=torch.arange(len(requests)) * len(templates),
    )


def compute_target_values(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    hparams: EditHyperParams | None = None,
    *,
    progress: bool = False,
    target_cache: TargetCache | None = None,
) -> TargetValues:
    """Optimise δ for every request, ``hparams.batch_size`` requests at a time (the model is not changed).

    With a ``target_cache`` (:class:`~lightning_kedit.editing.target_cache.TargetCache`), cached targets are
    read and only the others are optimised (then stored).
    """
    if not requests:
        raise KeditError("the request list is empty; give at least one edit request")
    ModelAdapter.for_model(model).check_linear_residual()  # δ is a change of the residual stream (see there)
    hp = hparams or EditHyperParams()
    sharded = is_sharded_model(model)
    if hp.v_bfloat16 and sharded:
        raise KeditError("`v_bfloat16` runs copies of the upper blocks, which a sharded (FSDP2) model cannot copy; "
                         "set v_bfloat16=False (or leave it None)")
    if hp.v_bfloat16 is None:  # resolved here, so that caches and deltas record what ran
        hp = hp.replace(v_bfloat16=not sharded and bfloat16_is_fast(next(model.parameters()).device))
    if target_cache is not None:
        return target_cache.lookup_or_compute(
            model, tokenizer, requests, layer, templates, hp,
            lambda missing: compute_target_values(model, tokenizer, missing, layer, templates, hp, progress=progress),
        )
    parts = []
    for start in range(0, len(requests), hp.batch_size):
        chunk = requests[start : start + hp.batch_size]
        parts.append(_optimise(model, tokenizer, chunk, layer, templates, hp))
        if progress:
            print(f"  targets {start + len(chunk)}/{len(requests)}", file=sys.stderr, flush=True)
    return TargetValues(
        delta=torch.cat([p.delta for p in parts]),
        prob=torch.cat([p.prob for p in parts]),
        steps=torch.cat([p.steps for p in parts]),
        layer=layer,
    )


def _optimise(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    layer: int,
    templates: Sequence[str],
    hp: EditHyperParams,
) -> TargetValues:
    with eval_mode(model):
        problem = _TargetProblem(model, tokenizer, requests, layer, templates)
        n = len(requests)
        delta = torch.zeros(n, problem.base.shape[-1], requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=hp.v_lr)
        state = _Progress(n)
        adapter = problem.adapter
        if hp.v_bfloat16 and problem.dtype == torch.float32:
            # Fast phase in bfloat16 (upper_blocks.py); then the model's own arithmetic judges every request
            # again and finishes those that the bfloat16 arithmetic stopped too early.
            _descend(problem, UpperBlocks.bfloat16_copy(adapter, layer), delta, optimizer, state, hp)
            state.done.zero_()
        _descend(problem, UpperBlocks.exact(adapter, layer), delta, optimizer, state, hp)
    return TargetValues(delta=delta.detach().double(), prob=state.prob, steps=state.steps, layer=layer)


class _Progress:
    """Per request: the last measured target probability, the Adam updates of its δ, and whether it stopped."""

    def __init__(self, n: int) -> None:
        self.prob = torch.zeros(n)
        self.steps = torch.zeros(n, dtype=torch.long)
        self.done = torch.zeros(n, dtype=torch.bool)


class _TargetProblem:
    """The loss of the target-value optimisation for a batch of requests, given δ and the upper blocks to run."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        requests: Sequence[EditRequest],
        layer: int,
        templates: Sequence[str],
    ) -> None:
        self.adapter = ModelAdapter.for_model(model)
        self.device = next(model.parameters()).device
        self.batch = batch = _build_batch(tokenizer, requests, templates)
        self.n = len(requests)
        n_rows = batch.rows_ids.shape[0]
        self.groups = prepare_replays(model, batch.rows_ids, batch.mask, batch.subject_pos, layer)
        # Where each row lives: its group, its index in the group, and its subject within the replayed window.
        self.group_of = torch.empty(n_rows, dtype=torch.long)
        self.local_of = torch.empty(n_rows, dtype=torch.long)
        self.offset = torch.empty(n_rows, dtype=torch.long)
        for g, (rows, replay) in enumerate(self.groups):
            self.group_of[rows], self.local_of[rows] = g, torch.arange(len(rows))
            self.offset[rows] = batch.subject_pos[rows] - replay.start
        self.label_pos = batch.label_pos - (batch.subject_pos - self.offset)[batch.label_row]
        self.base = torch.stack([self.groups[int(self.group_of[r])][1].hidden[int(self.local_of[r]),
                                                                              int(self.offset[r])]
                                 for r in batch.bare_row]).float()
        self.base_norm = self.base.norm(dim=-1).clamp_min(1e-6).cpu()
        self.dtype = self.groups[0][1].hidden.dtype  # the model's own arithmetic

    def final_states(self, delta: torch.Tensor, rows_on: torch.Tensor, upper: UpperBlocks) -> list[torch.Tensor | None]:
        """The final hidden state of every row where ``rows_on`` holds, at every replayed position, by group."""
        batch, device = self.batch, self.device
        final: list[torch.Tensor | None] = [None] * len(self.groups)
        for g, (rows, replay) in enumerate(self.groups):
            local = rows_on[rows].nonzero().squeeze(1)
            if not len(local):
                continue
            h = replay.hidden[local.to(device)]
            shift = torch.zeros_like(h)
            owners = batch.row_request[rows[local]]
            shift[torch.arange(len(local)), self.offset[rows[local]].to(device)] = delta[owners].to(h.dtype).to(device)
            h = h + shift
            with upper.autocast():
                for block, (args, kwargs) in zip(upper.blocks, replay.calls_for(local), strict=True):
                    h = first_tensor(block(h, *args, **kwargs))
            full = h.new_zeros((len(rows), *h.shape[1:]))
            full[local.to(device)] = h
            final[g] = full
        return final

    def kl_log_probs(
        self, final: list[torch.Tensor | None], requests: torch.Tensor, upper: UpperBlocks
    ) -> torch.Tensor:
        """Log-probabilities at the end of the "{subject} is a" rows of ``requests``."""
        rows = self.batch.kl_row[requests]
        return upper.logits(_read(final, self.group_of, self.local_of, rows, self.offset[rows])).log_softmax(-1)

    def kl_reference(self, upper: UpperBlocks) -> torch.Tensor:
        """The unedited "{subject} is a" distributions, computed by the same arithmetic as the loss."""
        with torch.no_grad():
            rows_on = torch.zeros(self.batch.rows_ids.shape[0], dtype=torch.bool)
            rows_on[self.batch.kl_row] = True
            zero = torch.zeros(self.n, self.base.shape[-1])
            final = self.final_states(zero, rows_on, upper)
            return self.kl_log_probs(final, torch.arange(self.n), upper).cpu()

    def nll(self, final: list[torch.Tensor | None], active: torch.Tensor, upper: UpperBlocks) -> torch.Tensor:
        """Per request, the weighted mean NLL of its target tokens (zero for requests not ``active``)."""
        batch = self.batch
        keep = active[batch.row_request[batch.label_row]]
        label_h = _read(final, self.group_of, self.local_of, batch.label_row[keep], self.label_pos[keep])
        log_probs = upper.logits(label_h).log_softmax(-1)
        token_lp = log_probs.gather(1, batch.label_id[keep].to(self.device)[:, None]).squeeze(1).cpu()
        owner = batch.row_request[batch.label_row[keep]]
        return torch.zeros(self.n).index_add(0, owner, -token_lp * batch.label_weight[keep])


def _descend(
    problem: _TargetProblem,
    upper: UpperBlocks,
    delta: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    state: _Progress,
    hp: EditHyperParams,
) -> None:
    """Adam on δ through ``upper`` until every request is likely or has had ``hp.v_steps - 1`` updates.

    Every request still running is evaluated first, so a second, exact phase after a fast one judges each request
    again (also one whose updates are spent); updates count across phases (``state.steps``).
    """
    kl_init = problem.kl_reference(upper)
    most = max(hp.v_steps, 1) - 1
    done = state.done
    while True:
        active = (~done).nonzero().squeeze(1)
        if not len(active):
            return
        final = problem.final_states(delta, ~done[problem.batch.row_request], upper)
        nll = problem.nll(final, ~done, upper)
        kl_lp = problem.kl_log_probs(final, active, upper).cpu()
        kl = (kl_init[active].exp() * (kl_init[active] - kl_lp)).sum(-1)
        decay = (delta[active] ** 2).sum(-1) / problem.base_norm[active] ** 2
        loss = (nll[active] + hp.kl_factor * kl + hp.weight_decay * decay).sum()
        if not torch.isfinite(loss):
            raise NonFiniteEditError(
                f"the target-value loss became {loss.item()} at step {int(state.steps[active].max())}; "
                f"lower `v_lr` ({hp.v_lr})"
            )
        state.prob[active] = torch.exp(-nll[active].detach())
        done[active[(state.prob[active] >= hp.stop_prob) | (state.steps[active] >= most)]] = True
        if bool(done.all()):
            return
        (grad,) = torch.autograd.grad(loss, [delta])
        frozen = delta.detach()[done].clone()
        delta.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.steps[~done] += 1
        with torch.no_grad():
            delta[done] = frozen
            limit = hp.clamp_norm * problem.base_norm
            norms = delta.norm(dim=-1).clamp_min(1e-12)
            delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms))[:, None])


def _read(
    final: list[torch.Tensor | None],
    group_of: torch.Tensor,
    local_of: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> torch.Tensor:
    """The final hidden states of ``rows`` (batch indices) at ``positions`` (within their replayed window)."""
    picked = []
    for g, states in enumerate(final):
        here = group_of[rows] == g
        if bool(here.any()):
            assert states is not None
            device = states.device
            at = states[local_of[rows[here]].to(device), positions[here].to(device)]
            picked.append((here.nonzero().squeeze(1), at))
    order = torch.cat([index for index, _ in picked])
    return torch.cat([states for _, states in picked])[torch.argsort(order).to(picked[0][1].device)]
