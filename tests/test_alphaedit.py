"""AlphaEdit: null-space projection against the paper's formula, preservation to 1e-6 on a tiny model, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from lightning_kedit.editing import compute_edit, memit, weight_edits
from lightning_kedit.editing.alphaedit import DEFAULT_ALPHA, DEFAULT_THRESHOLD, alphaedit_updates, compute_alphaedit
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.hparams import METHODS, EditHyperParams, HyperParamError, resolve_hparams
from lightning_kedit.editing.keys import subject_states
from lightning_kedit.editing.nullspace import (
    alphaedit_factors,
    alphaedit_solve,
    null_space_basis,
    null_space_projection,
)
from lightning_kedit.editing.solvers import SolverError
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest
from lightning_kedit.statistics import KeyStatistics

REQUESTS = [
    EditRequest("a", "{} plays the", "Toko Yasuda", "Paris", "guitar"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "London", "French"),
]
MORE = [EditRequest("c", "{} is a citizen of", "Leonardo da Vinci", "Japan", "Italy")]


def rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def low_rank_keys(n: int, size: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` keys spanning a random ``rank``-dimensional subspace, and an orthonormal basis of it."""
    basis, _ = torch.linalg.qr(torch.randn(size, rank, dtype=torch.float64, generator=rng(seed)))
    return torch.randn(n, rank, dtype=torch.float64, generator=rng(seed + 1)) @ basis.T, basis


def paper_formula(keys, residuals, projection, alpha, previous=None):
    """Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹ in column notation, solved directly (AlphaEdit, eq. 14)."""
    k1, r = keys.T, residuals.T
    system = k1 @ k1.T @ projection + alpha * torch.eye(projection.shape[0], dtype=torch.float64)
    if previous is not None:
        system = system + previous.T @ previous @ projection
    # X A = B  <=>  Aᵀ Xᵀ = Bᵀ
    return torch.linalg.solve(system.T, (r @ k1.T @ projection).T).T


def test_basis_is_the_small_eigenvalue_eigenspace():
    c = torch.diag(torch.tensor([4.0, 1.0, 0.05, 0.001, 0.0], dtype=torch.float64))
    rotation, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=rng()))
    c = rotation @ c @ rotation.T
    basis = null_space_basis(c, threshold=1e-2, rule="eigenvalue")  # below 0.04: the last two
    assert basis.shape == (5, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(basis @ basis.T, rotation[:, 3:] @ rotation[:, 3:].T)
    assert null_space_basis(c, threshold=1e-1, rule="eigenvalue").shape == (5, 3)
    p = null_space_projection(c, threshold=1e-2, rule="eigenvalue")
    torch.testing.assert_close(p @ p, p)


def test_energy_rule_bounds_the_preserved_energy_whatever_the_spectrum():
    """The energy rule keeps the smallest directions holding at most `threshold` of trace C (a naive loop)."""
    # One outlier direction, as in SmolLM2's MLP keys: the eigenvalue rule would take nearly everything.
    values = torch.cat([torch.tensor([400.0]), torch.linspace(0.5, 1.5, 99)]).double()
    rotation, _ = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64, generator=rng(3)))
    c = rotation @ torch.diag(values) @ rotation.T
    assert null_space_basis(c, threshold=1e-2, rule="eigenvalue").shape[1] == 99
    basis = null_space_basis(c, threshold=1e-2)
    ordered, budget, expected = sorted(values.tolist()), 1e-2 * float(values.sum()), 0
    total = 0.0
    for value in ordered:
        total += value
        if total > budget:
            break
        expected += 1
    assert basis.shape[1] == expected > 0
    held = float(torch.trace(basis.T @ c @ basis))
    assert held <= 1e-2 * float(torch.trace(c)) + 1e-9
    with pytest.raises(ValueError, match="rule"):
        null_space_basis(c, rule="magic")
    with pytest.raises(SolverError, match="raise the threshold"):
        null_space_basis(torch.eye(3), threshold=0.2)


def test_basis_refuses_bad_threshold_and_empty_null_space():
    with pytest.raises(ValueError, match="threshold"):
        null_space_basis(torch.eye(3), threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        null_space_basis(torch.eye(3), threshold=2.0)
    with pytest.raises(SolverError, match="raise the threshold"):
        null_space_basis(torch.eye(3), threshold=0.5, rule="eigenvalue")
    with pytest.raises(SolverError, match="zero"):
        null_space_basis(torch.zeros(3, 3))


@pytest.mark.parametrize("with_previous", [False, True])
def test_reduced_solve_equals_the_papers_formula(with_previous):
    """The Cholesky solve in the null-space coordinates equals the paper's dk x dk formula."""
    preserved, _ = low_rank_keys(200, 12, 5)
    basis = null_space_basis(preserved.T @ preserved / 200, threshold=1e-9)
    keys = torch.randn(3, 12, dtype=torch.float64, generator=rng(3))
    residuals = torch.randn(3, 7, dtype=torch.float64, generator=rng(4))
    previous = torch.randn(4, 12, dtype=torch.float64, generator=rng(5)) if with_previous else None
    gram = previous.T @ previous if previous is not None else None
    ours = alphaedit_solve(keys, residuals, basis, alpha=0.3, previous_gram=gram)
    expected = paper_formula(keys, residuals, basis @ basis.T, 0.3, previous)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(ours @ basis @ basis.T, ours)  # Δ = Δ P: the update lives in the null space


def test_projection_keeps_preserved_and_earlier_keys_and_writes_new_ones():
    """Δ K₀ = 0 and Δ K_p = 0 to 1e-6 while K₁ maps to the residuals, with room to spare in the null space."""
    preserved, _ = low_rank_keys(500, 40, 20)
    basis = null_space_basis(preserved.T @ preserved / 500, threshold=1e-9)
    assert basis.shape[1] == 20
    previous = torch.randn(5, 40, dtype=torch.float64, generator=rng(7))
    keys = torch.randn(4, 40, dtype=torch.float64, generator=rng(8))
    residuals = torch.randn(4, 16, dtype=torch.float64, generator=rng(9))
    factors = alphaedit_factors(keys, residuals, basis, alpha=1e-10, previous_gram=previous.T @ previous)
    delta = factors.dense()
    assert float((preserved @ delta.T).abs().max()) < 1e-6
    assert float((previous @ delta.T).abs().max()) < 1e-6
    torch.testing.assert_close(keys @ delta.T, residuals, rtol=0, atol=1e-6)
    assert factors.rank == 4


def test_solver_refuses_bad_input():
    basis = torch.eye(6, dtype=torch.float64)[:, :3]
    with pytest.raises(ValueError, match="alpha"):
        alphaedit_factors(torch.randn(2, 6), torch.randn(2, 3), basis, alpha=0.0)
    with pytest.raises(ValueError, match="rows"):
        alphaedit_factors(torch.randn(2, 6), torch.randn(3, 3), basis, alpha=1.0)
    with pytest.raises(ValueError, match="basis"):
        alphaedit_factors(torch.randn(2, 5), torch.randn(2, 3), basis, alpha=1.0)
    with pytest.raises(SolverError, match="non-finite"):
        alphaedit_factors(torch.full((2, 6), float("nan")), torch.randn(2, 3), basis, alpha=1.0)


# ---------------------------------------------------------------------------------------------------- tiny model
def peaky(num_layers: int = 4) -> torch.nn.Module:
    model = tiny_model("llama", num_layers=num_layers).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def low_rank_statistics(model, layers, rank):
    """Statistics whose keys span a ``rank``-dimensional subspace; returns them and sample preserved keys."""
    adapter = ModelAdapter.for_model(model)
    stats = KeyStatistics(layers, adapter.key_size)
    preserved = {}
    for layer in layers:
        keys, _ = low_rank_keys(4 * adapter.key_size, adapter.key_size, rank, seed=layer)
        stats.update(layer, keys)
        preserved[layer] = keys
    return stats, preserved


def hparams(layers, **kw) -> EditHyperParams:
    base = dict(layers=layers, v_steps=6, clamp_norm=50.0, kl_factor=0.0, weight_decay=0.0,
                prefix_lengths=((3, 1),), mom2_weight=1.0)
    base.update(kw)
    return EditHyperParams(**base)


def test_tiny_model_keeps_preserved_outputs_and_writes_the_edited_keys(tokenizer):
    """Single layer: Δ k₀ = 0 to 1e-6 for preserved keys, and the edit layer's output reaches h + δ."""
    model = peaky()
    stats, preserved = low_rank_statistics(model, [2], rank=32)  # a 32-dimensional null space of 64
    hp = hparams((2,))
    factors, keys, values = alphaedit_updates(model, tokenizer, REQUESTS, stats, hp, threshold=1e-9, alpha=1e-12)
    delta = factors[2].dense()
    assert float((preserved[2] @ delta.T).abs().max()) < 1e-6
    templates = memit.context_templates(model, tokenizer, hp.prefix_lengths, seed=hp.seed)
    states = subject_states(model, tokenizer, REQUESTS, templates, key_layers=[2], out_layer=2)
    torch.testing.assert_close(keys[2], states.keys[2])
    torch.testing.assert_close(keys[2] @ delta.T, values.delta, rtol=0, atol=1e-6)  # edited keys reach h + δ
    weight_edits.add_to_weight(ModelAdapter.for_model(model), 2, delta)
    after = subject_states(model, tokenizer, REQUESTS, templates, key_layers=[2], out_layer=2).outputs
    torch.testing.assert_close(after, states.outputs + values.delta, rtol=1e-3, atol=1e-3)


def test_preserve_weight_adds_memits_second_moment_inside_the_null_space(tokenizer):
    """With λ₀ > 0 the single-layer update equals the paper's formula with λ₀ C added to K_p K_pᵀ (float64)."""
    model = peaky()
    stats, _ = low_rank_statistics(model, [2], rank=32)
    hp = hparams((2,))
    weight, alpha = 7.0, 1e-3
    factors, keys, values = alphaedit_updates(model, tokenizer, REQUESTS, stats, hp, threshold=0.3, alpha=alpha,
                                              preserve_weight=weight)
    c = stats.second_moment(2).to(torch.float64)
    basis = null_space_basis(c, threshold=0.3)
    assert 32 < basis.shape[1] < 64  # the null space holds some of the keys' energy: λ₀ C matters there
    eigenvalues, vectors = torch.linalg.eigh(c)
    root = (eigenvalues.clamp_min(0).sqrt()[:, None] * vectors.T) * weight**0.5  # rootᵀ root = λ₀ C
    scale = float(c.diagonal().mean())
    expected = paper_formula(keys[2].double(), values.delta.double(), basis @ basis.T, alpha * scale, root)
    torch.testing.assert_close(factors[2].dense(), expected, rtol=1e-7, atol=1e-9)
    plain, _, _ = alphaedit_updates(model, tokenizer, REQUESTS, stats, hp, threshold=0.3, alpha=alpha)
    assert not torch.allclose(plain[2].dense(), expected)  # the weight changed the solve
    hp_extra = hp.replace(extra={"nullspace_threshold": 0.3, "alpha": alpha, "preserve_weight": weight})
    delta = compute_alphaedit(model, tokenizer, REQUESTS, statistics=stats, hparams=hp_extra)
    assert delta.hparams["preserve_weight"] == weight
    torch.testing.assert_close(delta.update(2).dense().double(), expected, rtol=1e-5, atol=1e-7)


def test_relative_lambda_weighs_the_preserved_second_moment_by_its_mean_diagonal(tokenizer):
    """With ``lambda_relative`` the λ₀ C term uses MEMIT's relative C: λ₀ C / mean(diag C) (float64 formula)."""
    model = peaky()
    stats, _ = low_rank_statistics(model, [2], rank=32)
    hp = hparams((2,)).replace(lambda_relative=True)
    weight, alpha = 7.0, 1e-3
    factors, keys, values = alphaedit_updates(model, tokenizer, REQUESTS, stats, hp, threshold=0.3, alpha=alpha,
                                              preserve_weight=weight)
    c = stats.second_moment(2).to(torch.float64)
    scale = float(c.diagonal().mean())
    basis = null_space_basis(c, threshold=0.3)
    eigenvalues, vectors = torch.linalg.eigh(c)
    root = (eigenvalues.clamp_min(0).sqrt()[:, None] * vectors.T) * (weight / scale) ** 0.5  # λ₀ C / mean diag
    expected = paper_formula(keys[2].double(), values.delta.double(), basis @ basis.T, alpha * scale, root)
    torch.testing.assert_close(factors[2].dense(), expected, rtol=1e-7, atol=1e-9)


def test_history_keys_are_kept_by_the_next_batch(tokenizer):
    """A second batch, given the first one's keys, leaves their outputs unchanged (Δ₂ K₁ ≈ 0)."""
    model = peaky()
    stats, preserved = low_rank_statistics(model, [1, 2], rank=24)
    hp = hparams((1, 2))
    history, found = EditHistory(), {}
    first = compute_alphaedit(model, tokenizer, REQUESTS, statistics=stats, hparams=hp, threshold=1e-9,
                              alpha=1e-10, keys=found, history=history)
    first.apply(model)
    history.push(first, found)
    second = compute_alphaedit(model, tokenizer, MORE, statistics=stats, hparams=hp, threshold=1e-9, alpha=1e-10,
                               history=history)
    for layer in (1, 2):
        delta = second.update(layer).dense()
        written = history.keys(layer)
        assert written.shape == (2, 64)
        assert float((written @ delta.T).abs().max()) < 1e-5 * float(delta.abs().max() * written.abs().max())
        assert float((preserved[layer] @ delta.T).abs().max()) < 1e-6
    assert second.hparams["previous_edits"] == 2 and second.hparams["nullspace_threshold"] == 1e-9


def test_compute_edit_dispatches_alphaedit_and_leaves_the_model(tokenizer):
    model = peaky()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, _ = low_rank_statistics(model, [1, 2], rank=24)
    hp = hparams((1, 2), extra={"nullspace_threshold": 1e-9})
    delta = compute_edit(model, tokenizer, REQUESTS, method="alphaedit", statistics=stats, hparams=hp)
    assert delta.method == "alphaedit" and delta.layers == [1, 2] and delta.request_ids == ("a", "b")
    assert delta.hparams["nullspace_threshold"] == 1e-9
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_options_are_refused_with_the_model_unchanged(tokenizer):
    model = peaky()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats, _ = low_rank_statistics(model, [2], rank=24)
    hp = hparams((2,))
    with pytest.raises(HyperParamError, match="threshold"):
        compute_alphaedit(model, tokenizer, REQUESTS, statistics=stats, hparams=hp, threshold=0.0)
    with pytest.raises(HyperParamError, match="alpha"):
        compute_alphaedit(model, tokenizer, REQUESTS, statistics=stats, hparams=hp, alpha=-1.0)
    with pytest.raises(HyperParamError, match="layer"):
        compute_alphaedit(model, tokenizer, REQUESTS, statistics=stats, hparams=hp, layers=[9])
    with pytest.raises(HyperParamError, match="preserve_weight"):
        negative = hp.replace(extra={"preserve_weight": -1.0})
        compute_alphaedit(model, tokenizer, REQUESTS, statistics=stats, hparams=negative)
    with pytest.raises(KeditError, match="empty"):
        compute_alphaedit(model, tokenizer, [], statistics=stats, hparams=hp)
    full = KeyStatistics([2], 64)
    full.update(2, torch.randn(400, 64, generator=rng()))
    with pytest.raises(SolverError, match="null space is empty"):  # isotropic keys: nothing below 1e-3 x max
        compute_alphaedit(model, tokenizer, REQUESTS, statistics=full, hparams=hp, threshold=1e-3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------- default settings
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_alphaedit_defaults_are_memits_with_the_null_space_settings(model_type):
    model = tiny_model(model_type)
    memit_defaults = EditHyperParams.for_model(model, "memit")
    defaults = EditHyperParams.for_model(model, "alphaedit")
    assert "alphaedit" in METHODS
    assert defaults.to_dict() == memit_defaults.to_dict()  # the same layers, clamp and target optimisation
    assert defaults.extra == {
        "nullspace_threshold": DEFAULT_THRESHOLD, "nullspace_rule": "energy", "alpha": DEFAULT_ALPHA,
        "preserve_weight": memit_defaults.mom2_weight,
    }
    assert EditHyperParams.for_model(model, "alphaedit", [2, 1]).layers == (1, 2)
    assert defaults.replace(v_steps=3).extra == defaults.extra  # overrides keep the null-space settings
    assert resolve_hparams(model, "alphaedit", [3]).extra == defaults.extra
    with pytest.raises(HyperParamError, match="layers outside"):
        resolve_hparams(model, "alphaedit", [9])
    with pytest.raises(HyperParamError, match="method"):
        EditHyperParams.for_model(model, "alpha-edit")


def test_compute_edit_without_hparams_uses_the_alphaedit_defaults(tokenizer):
    model = peaky()
    defaults = EditHyperParams.for_model(model, "alphaedit")
    stats, _ = low_rank_statistics(model, list(defaults.layers), rank=24)
    delta = compute_edit(model, tokenizer, REQUESTS, method="alphaedit", statistics=stats)
    assert delta.method == "alphaedit" and delta.layers == list(defaults.layers)
    assert delta.hparams["nullspace_threshold"] == DEFAULT_THRESHOLD and delta.hparams["alpha"] == DEFAULT_ALPHA
    assert delta.hparams["v_steps"] == defaults.v_steps
