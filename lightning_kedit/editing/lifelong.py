"""Lifelong editing: one gradient per fact, running feature statistics, a closed-form ridge update per batch.

The method (``method="lifelong"``; the idea of UltraEdit, Gu et al., 2025) has no per-fact optimisation loop.
For each fact one forward and one backward pass of ``prompt + answer`` give, at every edit layer ``l`` and at
the subject's last token (``positions="subject"``, where causal tracing finds facts stored; the default) or at
each position that predicts an answer token (``positions="answer"``, UltraEdit's choice),

- the key ``k`` (the input of the MLP's down-projection) and
- the value gradient ``g = ∂L/∂v`` (the gradient of the answer's negative log-likelihood with respect to the
  down-projection's output ``v = W k``).

*Lifelong normalisation*: each layer carries running sums (count, ``Σx``, ``Σx²``) of its keys and of its
value gradients over every batch written so far; their per-feature root mean square ``s = √(Σx²/N)``
(= ``√(var + mean²)``) scales the features: ``k̂ = k / s_k``, ``ĝ = g / s_g``. The down-projection has no bias,
so the keys are scaled, not centred. The value shift asked of each key is one normalised gradient step,
``v* = −η ĝ``, and the batch's update solves the ridge regression, in closed form,

    Δ̂ = argmin_Δ ‖Δ K̂ᵀ − V*ᵀ‖² + λ ‖Δ‖²  =  V*ᵀ (K̂ K̂ᵀ + λ I_n)⁻¹ K̂                          (1)

(``K̂``: ``n × d_k`` normalised keys, ``V*``: ``n × d_v`` shifts; the ``n × n`` dual form), written in the
weight's coordinates as ``ΔW = Δ̂ diag(1/s_k)`` so that ``ΔW k = Δ̂ k̂``. It is stored as the exact factors
``U = V*ᵀ (K̂K̂ᵀ + λI)⁻¹`` and ``V = diag(1/s_k) K̂ᵀ`` of an :class:`~.delta.EditDelta`.

*Preservation* (``preserve_weight`` ``λ₀ > 0``): eq. (1) fits only the batch's keys, so nothing keeps the
outputs of ordinary text. MEMIT's term ``λ₀ tr(ΔW C ΔWᵀ)``, with ``C = E[k kᵀ]`` the keys' second moment on
ordinary text (the key statistics), penalises each direction by how much text uses it:

    ΔW = V*ᵀ K (KᵀK + λ₀ C + λ D²)⁻¹,   D = diag(s_k)                                         (2)

which is eq. (1) when ``λ₀ = 0`` (push-through identity). It is solved in its ``d_k × d_k`` primal form in the
normalised coordinates, ``Δ̂ = V*ᵀ K̂ (K̂ᵀK̂ + λ₀ D⁻¹CD⁻¹ + λI)⁻¹``, and stored as ``U = V*ᵀ``,
``V = D⁻¹ (K̂ᵀK̂ + λ₀ D⁻¹CD⁻¹ + λI)⁻¹ K̂ᵀ``.

*Rounds* (``rounds`` ``r``, default 3): one normalised step moves each value the right way but not far enough.
A batch takes ``r`` closed-form steps; round ``j`` reads the features of the model with rounds ``1…j−1`` added
(only while the edit is computed) and normalises them with the running sums that include those rounds. The
delta holds the ``r`` factor pairs side by side, which equals ``r`` one-round edits of the batch in sequence.

The running sums of each batch are recorded in the :class:`~.history.EditHistory` (``HistoryEntry.extras``),
and the statistics a batch uses are the ordered float64 sum over the earlier entries: a sequence stopped,
saved and resumed computes bit-identical updates, and reverting the last ``k`` batches also rewinds the
statistics. Under ``torch.distributed`` each process computes the features of its share of the facts and one
``all_reduce(SUM)`` of a zero-filled, globally indexed buffer gives every process all of them.

Example:
    >>> from lightning_kedit.editing import compute_edit
    >>> delta = compute_edit(model, tokenizer, requests, method="lifelong", history=history)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.model_mode import eval_mode
from lightning_kedit.requests import EditRequest
from lightning_kedit.token_batches import padded_batch, padding_id

from .delta import EditDelta
from .edit_inputs import check_statistics, resolve_statistics
from .hparams import DEFAULT_LIFELONG_RIDGE, DEFAULT_LIFELONG_ROUNDS, DEFAULT_LIFELONG_STEP, EditHyperParams
from .keys import locate_token, subject_char_end
from .lifelong_cumulative import SOLVES, cumulative_total, recorded_rows, row_tensors
from .memit import scaled_second_moment
from .solvers import LowRankUpdate
from .weight_edits import add_to_weight, current_weight, temporary_updates

if TYPE_CHECKING:
    from .history import EditHistory

__all__ = [
    "DEFAULT_RIDGE",
    "DEFAULT_ROUNDS",
    "DEFAULT_STEP",
    "FeatureSums",
    "LifelongFeatures",
    "compute_lifelong",
    "fact_features",
    "lifelong_factors",
    "running_sums",
]

#: ``η`` of eq. (1): the size of the normalised value step asked of each key.
DEFAULT_STEP = DEFAULT_LIFELONG_STEP
#: ``λ`` of eq. (1), in normalised key units (a normalised key has squared norm ≈ ``d_k``).
DEFAULT_RIDGE = DEFAULT_LIFELONG_RIDGE
#: Closed-form steps per batch, each on the model with the ones before it added.
DEFAULT_ROUNDS = DEFAULT_LIFELONG_ROUNDS
_FLOOR = 1e-12


@dataclass
class FeatureSums:
    """Sufficient statistics of a set of feature rows: ``count``, ``Σx`` and ``Σx²`` per feature (float64).

    Example:
        >>> sums = FeatureSums.of(torch.tensor([[1.0, 2.0], [3.0, 2.0]]))
        >>> sums.rms().tolist(), sums.mean().tolist()
        ([2.23606797749979, 2.0], [2.0, 2.0])
    """

    count: Tensor
    total: Tensor
    squares: Tensor

    @classmethod
    def of(cls, rows: Tensor) -> FeatureSums:
        """The sums of ``rows`` (``n × d``)."""
        rows = rows.to(torch.float64)
        return cls(torch.tensor(float(rows.shape[0]), dtype=torch.float64), rows.sum(0), (rows * rows).sum(0))

    @classmethod
    def zeros(cls, size: int) -> FeatureSums:
        """Empty sums of ``size`` features."""
        z = torch.zeros(size, dtype=torch.float64)
        return cls(torch.zeros((), dtype=torch.float64), z, z.clone())

    def __add__(self, other: FeatureSums) -> FeatureSums:
        return FeatureSums(self.count + other.count, self.total + other.total, self.squares + other.squares)

    def mean(self) -> Tensor:
        """The running mean per feature."""
        return self.total / self.count.clamp_min(1.0)

    def variance(self) -> Tensor:
        """The running (population) variance per feature."""
        return (self.squares / self.count.clamp_min(1.0) - self.mean() ** 2).clamp_min(0.0)

    def rms(self) -> Tensor:
        """The per-feature root mean square ``√(var + mean²)``, the scale of the lifelong normalisation."""
        return (self.squares / self.count.clamp_min(1.0)).sqrt().clamp_min(_FLOOR)

    def as_tensors(self, prefix: str) -> dict[str, Tensor]:
        """Flat tensors for saving in a history entry."""
        return {f"{prefix}.count": self.count.reshape(1), f"{prefix}.sum": self.total, f"{prefix}.sumsq": self.squares}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], prefix: str) -> FeatureSums:
        """Read what :meth:`as_tensors` wrote."""
        return cls(tensors[f"{prefix}.count"].reshape(()), tensors[f"{prefix}.sum"], tensors[f"{prefix}.sumsq"])


@dataclass
class LifelongFeatures:
    """Per edit layer, the keys ``(n, d_k)`` and value gradients ``(n, d_v)`` of a batch (float64)."""

    keys: dict[int, Tensor]
    grads: dict[int, Tensor]

    def sums(self) -> dict[str, Tensor]:
        """The batch's running-statistics contribution, flat (``layers.{l}.key.*``, ``layers.{l}.grad.*``)."""
        out: dict[str, Tensor] = {}
        for layer in self.keys:
            out.update(FeatureSums.of(self.keys[layer]).as_tensors(f"layers.{layer}.key"))
            out.update(FeatureSums.of(self.grads[layer]).as_tensors(f"layers.{layer}.grad"))
        return out


def running_sums(history: EditHistory | None, layer: int, key_size: int, value_size: int) -> tuple[FeatureSums,
                                                                                                     FeatureSums]:
    """The key and gradient sums of every batch ``history`` recorded at ``layer``, added in order."""
    keys, grads = FeatureSums.zeros(key_size), FeatureSums.zeros(value_size)
    for entry in history or ():
        extras = entry.extras
        if f"layers.{layer}.key.sum" in extras:
            keys = keys + FeatureSums.from_tensors(extras, f"layers.{layer}.key")
            grads = grads + FeatureSums.from_tensors(extras, f"layers.{layer}.grad")
    return keys, grads


def lifelong_factors(keys: Tensor, grads: Tensor, key_scale: Tensor, grad_scale: Tensor, *, step: float = DEFAULT_STEP,
                     ridge: float = DEFAULT_RIDGE, preserve: Tensor | None = None) -> LowRankUpdate:
    """Eq. (1): the factors of ``ΔW = −η Ĝᵀ (K̂K̂ᵀ + λI)⁻¹ K̂ diag(1/s_k)``, ``K̂ = K/s_k``, ``Ĝ = G/s_g``;
    with ``preserve`` (``λ₀ C``), eq. (2): ``ΔW = −η Ĝᵀ K (KᵀK + λ₀C + λD²)⁻¹``.

    Args:
        keys: ``(n, d_k)`` keys.
        grads: ``(n, d_v)`` value gradients.
        key_scale: ``(d_k,)`` per-feature key scale ``s_k`` (> 0).
        grad_scale: ``(d_v,)`` per-feature gradient scale ``s_g`` (> 0).
        step: ``η`` (> 0).
        ridge: ``λ`` (> 0).
        preserve: ``(d_k, d_k)`` ``λ₀ C``, symmetric positive semi-definite; None for eq. (1).

    Example:
        >>> k, g = torch.eye(2, 3, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
        >>> lifelong_factors(k, g, torch.ones(3), torch.ones(4), ridge=1.0).dense().shape
        torch.Size([4, 3])
    """
    if not (step > 0 and ridge > 0):
        raise KeditError(f"the lifelong step and ridge must be > 0, got step={step}, ridge={ridge}")
    if keys.shape[0] != grads.shape[0] or keys.shape[0] == 0:
        raise KeditError(f"keys {tuple(keys.shape)} and gradients {tuple(grads.shape)} need the same, non-zero rows")
    scale = key_scale.to(torch.float64)
    k_hat = keys.to(torch.float64) / scale
    shifts = -step * grads.to(torch.float64) / grad_scale.to(torch.float64)  # V* = −η Ĝ
    if preserve is not None:
        # Eq. (2) in normalised coordinates: (K̂ᵀK̂ + D⁻¹ λ₀C D⁻¹ + λI) is d_k × d_k, symmetric positive definite.
        system = k_hat.T @ k_hat + preserve.to(torch.float64) / scale[:, None] / scale[None, :]
        system = system + ridge * torch.eye(system.shape[0], dtype=torch.float64)
        return LowRankUpdate(shifts.T, torch.linalg.solve(system, k_hat.T) / scale[:, None])
    gram = k_hat @ k_hat.T + ridge * torch.eye(k_hat.shape[0], dtype=torch.float64)
    left = torch.linalg.solve(gram, shifts).T  # V*ᵀ (K̂K̂ᵀ + λI)⁻¹ (gram is symmetric)
    right = (k_hat / scale).T  # (diag(1/s_k) K̂ᵀ): d_k × n
    return LowRankUpdate(left, right)


def _cumulative_change(keys: Tensor, grads: Tensor, key_scale: Tensor, grad_scale: Tensor,
                       memory: tuple[Tensor, Tensor], offset: Tensor, step: float, ridge: float,
                       preserve: Tensor | None, record: dict[str, Tensor] | None, layer: int) -> Tensor:
    """One round of the cumulative solve at ``layer``: the dense change of the total update (eq. 3).

    The batch's rows ask each key for what the layer gives it now plus the value step:
    ``r = (W − W₀) k + v*``, ``v* = −η ĝ`` (``offset`` is ``W − W₀``); ``record`` receives them.
    """
    targets = keys @ offset.T - step * grads / grad_scale
    total = cumulative_total(torch.cat([memory[0], keys]), torch.cat([memory[1], targets]), key_scale,
                             ridge=ridge, preserve=preserve)
    if record is not None:
        record.update(row_tensors(layer, keys, targets))
    return total - offset


def _answer_rows(tokenizer: PreTrainedTokenizerBase, request: EditRequest) -> tuple[list[int], int, int]:
    """Token ids of ``prompt + answer``, how many of them belong to the prompt, and the subject's last token."""
    prompt = request.prompt_text
    sep = "" if prompt[-1:].isspace() else " "
    ids, subject = locate_token(tokenizer, prompt + sep + request.target_new, subject_char_end(request)[1])
    head = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    while head and eos is not None and head[-1] == eos and len(head) > 1:
        head.pop()  # tokenizers that append EOS to every text
    shared = 0
    while shared < min(len(head), len(ids) - 1) and ids[shared] == head[shared]:
        shared += 1
    if shared == 0 or shared >= len(ids):
        raise KeditError(f"request {request.case_id!r}: cannot separate the answer {request.target_new!r} "
                         f"from the prompt {prompt!r} in its tokens")
    return ids, shared, subject


def _check_positions(positions: str) -> None:
    """Refuse a ``positions`` other than ``"subject"`` and ``"answer"``."""
    if positions not in ("subject", "answer"):
        raise KeditError(f"`positions`={positions!r} is neither 'subject' nor 'answer'")


def _capture(layer: int, inputs: dict[int, Tensor], outputs: dict[int, Tensor]) -> Callable[..., None]:
    """A forward hook keeping the module's input (the key) and its output, whose gradient it retains."""

    def capture(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        inputs[layer] = args[0].detach()
        output.retain_grad()
        outputs[layer] = output

    return capture


def _local_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                    layers: Sequence[int], batch_size: int,
                    positions: str) -> tuple[dict[int, list[Tensor]], dict[int, list[Tensor]]]:
    """Per request and layer, the keys and value gradients at ``positions`` ("subject" or "answer")."""
    adapter = ModelAdapter.for_model(model)
    device = next(model.parameters()).device
    keys: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    grads: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    encoded = [_answer_rows(tokenizer, r) for r in requests]
    pad = padding_id(tokenizer)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        input_ids, mask = padded_batch([ids for ids, _, _ in chunk], pad)
        labels = torch.full_like(input_ids, -100)
        for i, (ids, shared, _) in enumerate(chunk):
            labels[i, shared - 1 : len(ids) - 1] = torch.tensor(ids[shared:])  # position t predicts token t+1
        inputs: dict[int, Tensor] = {}
        outputs: dict[int, Tensor] = {}
        handles = [adapter.mlp_out(layer).register_forward_hook(_capture(layer, inputs, outputs)) for layer in layers]
        try:
            with torch.enable_grad():
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                # The sum over facts keeps each fact's gradient its own (causal attention, no cross-row terms).
                loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.to(device).flatten(),
                                                   ignore_index=-100, reduction="sum")
                loss.backward(inputs=[outputs[layer] for layer in layers])
        finally:
            for handle in handles:
                handle.remove()
        if positions == "subject":
            picked = torch.zeros_like(labels, dtype=torch.bool)
            picked[torch.arange(len(chunk)), torch.tensor([subject for _, _, subject in chunk])] = True
        else:
            picked = labels != -100
        for layer in layers:
            x, g = inputs[layer], outputs[layer].grad
            assert g is not None
            if x.ndim == 2:  # OPT flattens (batch, time) before its MLP
                x, g = x.view(*input_ids.shape, -1), g.view(*input_ids.shape, -1)
            for i in range(len(chunk)):
                rows = picked[i].to(x.device)
                keys[layer].append(x[i][rows].double().cpu())
                grads[layer].append(g[i][rows].double().cpu())
    return keys, grads


def fact_features(model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                  layers: Sequence[int], *, batch_size: int = 16, positions: str = "subject") -> LifelongFeatures:
    """One forward/backward per fact: keys and value gradients at every ``layers`` and ``positions``.

    ``positions="subject"``: one row per fact, at the subject's last token (the gradient of the whole answer's
    loss reaches it through attention); ``"answer"``: a row per answer token, at the position that predicts it.
    Rows are in request order, then position order. The gradients are those of the unchanged model (no weight
    gradient is formed; parameters' ``.grad`` stay untouched). Under ``torch.distributed`` with more than one
    process, request ``i`` is computed by process ``i mod world`` and the rows are summed into place across
    processes, so every process returns the same features.
    """
    _check_positions(positions)
    adapter = ModelAdapter.for_model(model)
    layers = adapter.check_layers(list(layers))
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    mine = [i for i in range(len(requests)) if i % world == rank]
    with eval_mode(model):
        keys, grads = _local_features(model, tokenizer, [requests[i] for i in mine], layers, batch_size, positions)
    if world == 1:
        return LifelongFeatures({la: torch.cat(keys[la]) for la in layers}, {la: torch.cat(grads[la]) for la in layers})
    counts = torch.zeros(len(requests), dtype=torch.float64)
    counts[mine] = torch.tensor([float(k.shape[0]) for k in keys[layers[0]]], dtype=torch.float64)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    offsets = [0, *torch.cumsum(counts, 0).long().tolist()]
    out_k, out_g = {}, {}
    for layer in layers:
        buf_k = torch.zeros(offsets[-1], adapter.key_size, dtype=torch.float64)
        buf_g = torch.zeros(offsets[-1], adapter.value_size, dtype=torch.float64)
        for j, i in enumerate(mine):
            buf_k[offsets[i] : offsets[i + 1]] = keys[layer][j]
            buf_g[offsets[i] : offsets[i + 1]] = grads[layer][j]
        dist.all_reduce(buf_k, op=dist.ReduceOp.SUM)
        dist.all_reduce(buf_g, op=dist.ReduceOp.SUM)
        out_k[layer], out_g[layer] = buf_k, buf_g
    return LifelongFeatures(out_k, out_g)


def compute_lifelong(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    *,
    hparams: EditHyperParams,
    statistics: object = None,
    history: EditHistory | None = None,
    extras: dict[str, Tensor] | None = None,
    timings: dict[str, float] | None = None,
) -> EditDelta:
    """The lifelong delta of ``requests`` (``compute_edit(method="lifelong")``); ``model`` is unchanged.

    Every edit layer's update is computed from the same forward/backward pass of the model as it is, each
    asked for ``η / L`` of the value step (``L`` edit layers), so that together they take one step ``η``.

    Args:
        model: the model, as the batches of ``history`` left it.
        tokenizer: its tokenizer.
        requests: the facts of this batch.
        hparams: ``layers``, ``batch_size``, ``lambda_relative`` and ``extra["step"]`` (``η``),
            ``extra["ridge"]`` (``λ``), ``extra["preserve_weight"]`` (``λ₀`` of eq. 2, in MEMIT's units of ``C``;
            0 for eq. 1), ``extra["positions"]`` (``"subject"`` or ``"answer"``), ``extra["grad_scaling"]``:
            ``"feature"`` (default: ``s_g`` per feature) or ``"global"`` (one RMS over all gradient features, which
            keeps the gradient's direction), ``extra["rounds"]`` (closed-form steps per batch, each on the model
            with the earlier ones added), ``extra["solve"]``: ``"batch"`` (default: eq. 2 for the batch alone) or
            ``"cumulative"`` (the total update solves eq. 3 of :mod:`.lifelong_cumulative` over every batch).
        statistics: key statistics for eq. (2) (of the model before a sequence), a file, or None for the cached
            ones; unused when ``preserve_weight`` is 0.
        history: the earlier batches, whose running sums the normalisation starts from; None for none.
        extras: when given, filled with this batch's sums (for ``history.push(delta, extras=extras)``).
        timings: when given, the seconds of the ``features`` and ``solve`` phases are added to it.

    Raises:
        KeditError: a non-positive step or ridge, an answer that cannot be told from its prompt, or a
            non-finite update.
    """
    from .phase_timer import PhaseTimer

    step = float(hparams.extra.get("step", DEFAULT_STEP))
    ridge = float(hparams.extra.get("ridge", DEFAULT_RIDGE))
    if not (step > 0 and ridge > 0):
        raise KeditError(f"the lifelong method's `step` and `ridge` must be > 0, got step={step}, ridge={ridge}")
    scaling = str(hparams.extra.get("grad_scaling", "feature"))
    if scaling not in ("feature", "global"):
        raise KeditError(f"`grad_scaling`={scaling!r} is neither 'feature' (per-feature RMS) nor 'global' (one RMS)")
    preserve_weight = float(hparams.extra.get("preserve_weight", 0.0))
    if not preserve_weight >= 0:
        raise KeditError(f"the lifelong method's `preserve_weight` must be >= 0, got {preserve_weight}")
    positions = str(hparams.extra.get("positions", "subject"))
    _check_positions(positions)
    rounds = hparams.extra.get("rounds", DEFAULT_ROUNDS)
    if not (isinstance(rounds, int) and rounds >= 1):
        raise KeditError(f"the lifelong method's `rounds` must be an integer >= 1, got {rounds!r}")
    solve = str(hparams.extra.get("solve", "batch"))
    if solve not in SOLVES:
        raise KeditError(f"the lifelong method's `solve`={solve!r} is neither 'batch' (each batch alone) nor "
                         "'cumulative' (the total update over every batch)")
    adapter = ModelAdapter.for_model(model)
    layers = adapter.check_layers(list(hparams.layers))
    timer = PhaseTimer()
    memory, offsets = {}, {}
    if solve == "cumulative":  # eq. (3): the rows of every earlier batch, and the change since the first weights
        memory = recorded_rows(history, layers, adapter.key_size, adapter.value_size)
        first = history.weights_after(0) if history is not None else {}
        for layer in layers:
            now = current_weight(adapter, layer)
            offsets[layer] = now - adapter.from_stored_layout(first[layer]).to(torch.float64) if layer in first \
                else torch.zeros_like(now)
    if preserve_weight > 0:
        with timer.phase("statistics"), (history.weights_before(model) if history is not None else nullcontext()):
            statistics = resolve_statistics(model, tokenizer, layers, statistics)  # of the weights before a sequence
            check_statistics(statistics, adapter, layers)
    preserves = {layer: preserve_weight * scaled_second_moment(statistics, layer, hparams.lambda_relative)
                 for layer in layers} if preserve_weight > 0 else {}
    running = {layer: running_sums(history, layer, adapter.key_size, adapter.value_size) for layer in layers}
    parts: dict[int, list[LowRankUpdate]] = {layer: [] for layer in layers}  # the batch solve's factors per round
    changes: dict[int, list[Tensor]] = {layer: [] for layer in layers}  # the cumulative solve's dense changes
    batch_sums: dict[str, Tensor] = {}
    rows: dict[str, Tensor] = {}  # the cumulative solve's rows of this batch (its last round)
    # Round r reads the features of the model with rounds 1..r−1 added (restored afterwards): a few closed-form
    # steps of the batch's loss, each normalised by the running statistics that include the rounds before it.
    with temporary_updates(adapter, layers):
        for round_index in range(rounds):
            with timer.phase("features"):
                features = fact_features(model, tokenizer, requests, layers, batch_size=hparams.batch_size,
                                         positions=positions)
            with timer.phase("solve"):
                sums = features.sums()
                batch_sums = sums if not batch_sums else {k: batch_sums[k] + sums[k] for k in batch_sums}
                for layer in layers:
                    key_sums, grad_sums = running[layer]
                    key_sums = key_sums + FeatureSums.from_tensors(sums, f"layers.{layer}.key")
                    grad_sums = grad_sums + FeatureSums.from_tensors(sums, f"layers.{layer}.grad")
                    running[layer] = (key_sums, grad_sums)
                    grad_scale = grad_sums.rms()
                    if scaling == "global":  # one scale for every gradient feature: the step keeps its direction
                        grad_scale = (grad_scale**2).mean().sqrt().expand_as(grad_scale)
                    if solve == "cumulative":
                        change = _cumulative_change(features.keys[layer], features.grads[layer], key_sums.rms(),
                                                    grad_scale, memory[layer], offsets[layer], step / len(layers),
                                                    ridge, preserves.get(layer), rows if round_index == rounds - 1
                                                    else None, layer)
                        finite = bool(torch.isfinite(change).all())
                        offsets[layer] = offsets[layer] + change
                        changes[layer].append(change)
                    else:
                        update = lifelong_factors(features.keys[layer], features.grads[layer], key_sums.rms(),
                                                  grad_scale, step=step / len(layers), ridge=ridge,
                                                  preserve=preserves.get(layer))
                        finite = bool(torch.isfinite(update.u).all() and torch.isfinite(update.v).all())
                        parts[layer].append(update)
                    if not finite:
                        raise KeditError(f"the lifelong update of layer {layer} is not finite; lower `step` or "
                                         "raise `ridge`")
                    if round_index < rounds - 1:
                        add_to_weight(adapter, layer, change if solve == "cumulative" else update.dense())
    with timer.phase("solve"):
        factors: dict[int, Tensor | LowRankUpdate] = {
            layer: LowRankUpdate(torch.cat([u.u for u in parts[layer]], 1), torch.cat([u.v for u in parts[layer]], 1))
            if solve == "batch" else torch.stack(changes[layer]).sum(0)  # the dense changes of the total
            for layer in layers}
        delta = EditDelta.from_model(
            model, factors, method="lifelong",
            hparams={**hparams.to_dict(), "step": step, "ridge": ridge, "grad_scaling": scaling,
                     "preserve_weight": preserve_weight, "positions": positions, "rounds": rounds, "solve": solve,
                     "previous_edits": history.num_edits if history is not None else 0},
            request_ids=[r.case_id for r in requests], tokenizer=tokenizer,
        )
    if extras is not None:
        extras.update(batch_sums)
        extras.update(rows)
    timer.add_to(timings)
    return delta
