"""The lifelong method's cumulative solve (eq. 3): the pure solve against its normal equations built by a naive
loop in float64, a whole sequence on a tiny Llama whose total update solves eq. (3) over every batch's recorded
rows, one batch equal to the batch solve, and the refusals (another kind of history, an unknown solve)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing import compute_edit
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.lifelong_cumulative import cumulative_total
from lightning_kedit.editing.sequential import edit_sequentially
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest
from lightning_kedit.statistics import load_or_collect_statistics

SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Leonardo da Vinci", "Marie Curie", "Ada Lovelace", "Alan Turing"]
TARGETS = ["Paris", "London", "Tokyo", "Lima", "Oslo", "Cairo"]
REQUESTS = [EditRequest(str(i), "{} was born in", s, t, "Rome")
            for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS, strict=True))]
LAYERS = (1, 2)


def hparams(model, **extra) -> EditHyperParams:
    return EditHyperParams.for_model(model, "lifelong").replace(
        layers=LAYERS, extra={"step": 2.0, "ridge": 1.0, "solve": "cumulative", **extra})


def dense_weights(model) -> dict[int, torch.Tensor]:
    adapter = ModelAdapter.for_model(model)
    return {la: adapter.from_stored_layout(adapter.weight(la).detach()).to(torch.float64) for la in LAYERS}


def normal_equations(keys, targets, scale, ridge, preserve):
    """``S = Σ k kᵀ + λ₀C + λ diag(s²)`` and ``M = Σ r kᵀ``, row by row."""
    dk = keys.shape[1]
    system = ridge * torch.diag(scale**2) + (preserve if preserve is not None else torch.zeros(dk, dk,
                                                                                               dtype=torch.float64))
    moment = torch.zeros(targets.shape[1], dk, dtype=torch.float64)
    for k, r in zip(keys, targets, strict=True):
        system = system + torch.outer(k, k)
        moment = moment + torch.outer(r, k)
    return system, moment


@pytest.mark.parametrize("with_preserve", [False, True])
def test_cumulative_total_solves_its_normal_equations(with_preserve):
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    targets = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    scale = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    half = torch.randn(12, 40, generator=gen, dtype=torch.float64)
    preserve = half @ half.T / 40 if with_preserve else None
    total = cumulative_total(keys, targets, scale, ridge=0.7, preserve=preserve)
    system, moment = normal_equations(keys, targets, scale, 0.7, preserve)
    torch.testing.assert_close(total @ system, moment, rtol=1e-10, atol=1e-10)


def test_a_sequence_total_solves_eq3_over_every_batch_rows():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    first = dense_weights(model)
    stats = load_or_collect_statistics(model, tok, list(LAYERS), cache=False, max_tokens=5000)
    hp = hparams(model, preserve_weight=0.5, rounds=2)
    history = edit_sequentially(model, tok, REQUESTS, method="lifelong", batch_size=2, hparams=hp,
                                statistics=stats)
    assert len(history) == 3 and all(e.delta.hparams["solve"] == "cumulative" for e in history)
    adapter = ModelAdapter.for_model(model)
    for layer in LAYERS:
        rows = [(e.extras[f"layers.{layer}.rows.key"], e.extras[f"layers.{layer}.rows.target"]) for e in history]
        assert all(k.shape == (2, adapter.key_size) and t.shape == (2, adapter.value_size) for k, t in rows)
        keys, targets = torch.cat([k for k, _ in rows]), torch.cat([t for _, t in rows])
        # The key scale: the root mean square of every key the batches read, in every round.
        count = sum(float(e.extras[f"layers.{layer}.key.count"]) for e in history)
        scale = (sum(e.extras[f"layers.{layer}.key.sumsq"] for e in history) / count).sqrt()
        from lightning_kedit.editing.memit import scaled_second_moment
        preserve = 0.5 * scaled_second_moment(stats, layer, hp.lambda_relative)
        system, moment = normal_equations(keys, targets, scale, 1.0, preserve)
        total = dense_weights(model)[layer] - first[layer]
        residual = (total @ system - moment).norm() / moment.norm()
        assert residual < 1e-4, residual  # float32 weights; a batch alone, or a stale total, is off by O(1)
        # The newest batch's rows alone do not give this total: earlier batches are still in it.
        own, own_moment = normal_equations(keys[-2:], targets[-2:], scale, 1.0, preserve)
        assert (total @ own - own_moment).norm() / own_moment.norm() > 1e-2


def test_one_batch_without_a_history_is_the_batch_solve():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    cumulative = compute_edit(model, tok, REQUESTS[:3], method="lifelong", hparams=hparams(model, rounds=1))
    batch = compute_edit(model, tok, REQUESTS[:3], method="lifelong",
                         hparams=hparams(model, rounds=1, solve="batch"))
    for layer in LAYERS:
        a, b = cumulative.update(layer).dense(), batch.update(layer).dense()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10 * float(b.abs().max()))


def test_a_history_of_another_kind_or_an_unknown_solve_is_refused_and_leaves_the_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    history = edit_sequentially(model, tok, REQUESTS[:2], method="lifelong", batch_size=2,
                                hparams=hparams(model, solve="batch"))
    before = dense_weights(model)
    with pytest.raises(KeditError, match=r"batch 1 \(method 'lifelong'\) recorded no rows at layer 1"):
        edit_sequentially(model, tok, REQUESTS[2:4], method="lifelong", batch_size=2, hparams=hparams(model),
                          history=history)
    with pytest.raises(KeditError, match="'batch'.*'cumulative'"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model, solve="total"))
    assert len(history) == 1 and isinstance(history, EditHistory)
    assert all(torch.equal(before[la], dense_weights(model)[la]) for la in LAYERS)
