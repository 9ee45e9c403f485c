"""MEMIT and ROME solvers against naive float64 formulas, and on real keys of Linear and Conv1D projections."""

from __future__ import annotations

import pytest
import torch
from tiny_models import _CORPUS, tiny_model, tiny_tokenizer

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.editing.solvers import (
    LowRankUpdate,
    SolverError,
    memit_factors,
    memit_solve,
    rome_factors,
    rome_solve,
    spread_residuals,
)
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.forward_hooks import capture_inputs

ARCHS = ["llama", "gpt2"]


def _spd(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, 4 * dim, generator=gen, dtype=torch.float64)
    return a @ a.T / (4 * dim)


def _real_keys(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """The projection inputs of ``layer`` on a short text (more tokens than the key size), one row per token."""
    projection = ModelAdapter.for_model(model).mlp_out(layer)
    ids = tiny_tokenizer()(_CORPUS, return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture_inputs({"p": projection}) as seen:
        model(input_ids=ids)
    return seen["p"][0].reshape(-1, seen["p"][0].shape[-1]).double()


def test_memit_matches_the_normal_equations_solved_naively():
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    residuals = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    c, lam = _spd(12, 1), 0.7
    k, r = keys.T, residuals.T  # the paper's column notation
    reference = r @ k.T @ torch.linalg.inv(lam * c + k @ k.T)
    delta = memit_solve(keys, residuals, c, lam)
    assert delta.dtype == torch.float64 and delta.shape == (5, 12)
    torch.testing.assert_close(delta, reference, rtol=1e-10, atol=1e-12)
    # Δ is the stationary point of λ‖Δ C^½‖² + ‖Δ K − R‖²: Δ (λC + KKᵀ) = R Kᵀ.
    torch.testing.assert_close(delta @ (lam * c + k @ k.T), r @ k.T, rtol=1e-10, atol=1e-10)


def test_memit_factors_are_exact_and_of_rank_n():
    keys, residuals = torch.randn(3, 10), torch.randn(3, 4)
    factors = memit_factors(keys, residuals, _spd(10, 2), lam=2.0)
    assert isinstance(factors, LowRankUpdate) and factors.rank == 3 and factors.shape == (4, 10)
    torch.testing.assert_close(factors.dense(), memit_solve(keys, residuals, _spd(10, 2), 2.0), rtol=0, atol=0)
    assert torch.equal(factors.u, residuals.double().T)


@pytest.mark.parametrize("arch", ARCHS)
def test_memit_with_vanishing_lambda_maps_real_keys_exactly_to_w_k_plus_r(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter.for_model(model)
    keys_all = _real_keys(model, 1)
    c = keys_all.T @ keys_all / len(keys_all)
    keys = keys_all[:6]  # n <= dk: the keys are independent
    residuals = torch.randn(6, adapter.value_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    projection = adapter.mlp_out(1)
    with torch.no_grad():
        before = projection(keys.float()).double()
        EditDelta.from_model(model, {1: memit_factors(keys, residuals, c, lam=1e-8)}, method="memit").apply(model)
        after = projection(keys.float()).double()
    torch.testing.assert_close(after - before, residuals, rtol=0, atol=2e-4)


def test_memit_with_large_lambda_leaves_usual_keys_alone():
    keys, residuals, c = torch.randn(4, 16), torch.randn(4, 3), _spd(16, 3)
    small = memit_solve(keys, residuals, c, lam=1.0)
    large = memit_solve(keys, residuals, c, lam=1e4)
    assert large.norm() < small.norm() / 100


def test_memit_errors_name_the_fix():
    keys = torch.randn(2, 6)
    with pytest.raises(SolverError, match="increase `lam`"):
        memit_solve(keys, torch.randn(2, 3), torch.zeros(6, 6), lam=0.0)
    with pytest.raises(SolverError, match="non-finite"):
        memit_solve(keys, torch.full((2, 3), float("nan")), torch.eye(6), lam=1.0)
    with pytest.raises(ValueError, match="rows"):
        memit_solve(keys, torch.randn(3, 3), torch.eye(6), lam=1.0)
    with pytest.raises(ValueError, match=r"\(6, 6\)"):
        memit_solve(keys, torch.randn(2, 3), torch.eye(5), lam=1.0)
    with pytest.raises(ValueError, match="`lam`"):
        memit_solve(keys, torch.randn(2, 3), torch.eye(6), lam=-1.0)
    with pytest.raises(ValueError, match="empty"):
        memit_solve(torch.zeros(0, 6), torch.zeros(0, 3), torch.eye(6), lam=1.0)


def test_rome_matches_the_formula_and_preserves_c_orthogonal_keys():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    k = torch.randn(9, generator=gen, dtype=torch.float64)
    v_star = torch.randn(5, generator=gen, dtype=torch.float64)
    c = _spd(9, 5)
    c_inv_k = torch.linalg.inv(c) @ k
    reference = torch.outer(v_star - w @ k, c_inv_k) / (k @ c_inv_k)
    delta = rome_solve(w, k, v_star, c)
    torch.testing.assert_close(delta, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close((w + delta) @ k, v_star, rtol=1e-10, atol=1e-10)
    other = torch.randn(9, generator=gen, dtype=torch.float64)
    orthogonal = other - (other @ c_inv_k) / (k @ c_inv_k) * k  # kᵀ C⁻¹ (this) = 0
    torch.testing.assert_close(delta @ orthogonal, torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-10)
    # The current output W k may be given instead of W; C's scale cancels.
    torch.testing.assert_close(rome_solve(w @ k, k, v_star, 3.0 * c), delta, rtol=1e-10, atol=1e-12)
    factors = rome_factors(w, k, v_star, c)
    assert factors.rank == 1 and torch.allclose(factors.dense(), delta)


@pytest.mark.parametrize("arch", ARCHS)
def test_rome_maps_the_key_to_the_target_value_in_the_model(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter.for_model(model)
    keys = _real_keys(model, 2)
    c = keys.T @ keys / len(keys)
    key = keys[3]
    projection = adapter.mlp_out(2)
    with torch.no_grad():
        now = projection(key.float()[None]).double()[0]
        target = now + torch.randn(adapter.value_size, generator=torch.Generator().manual_seed(1)) * 0.5
        w = adapter.from_stored_layout(adapter.weight(2))
        bias = now - w.double() @ key  # the projection's bias (zero for llama)
        update = rome_factors(w, key, target - bias, c, ridge=1e-6)
        EditDelta.from_model(model, {2: update}, method="rome").apply(model)
        after = projection(key.float()[None]).double()[0]
    torch.testing.assert_close(after, target, rtol=0, atol=2e-4)


def test_rome_errors():
    c = torch.zeros(4, 4)
    c[0, 0] = 1.0  # rank one: not invertible without a ridge
    with pytest.raises(SolverError, match="ridge"):
        rome_solve(torch.randn(3, 4), torch.randn(4), torch.randn(3), c)
    assert torch.isfinite(rome_solve(torch.randn(3, 4), torch.randn(4), torch.randn(3), c, ridge=0.1)).all()
    with pytest.raises(SolverError, match="not positive"):
        rome_solve(torch.randn(3, 4), torch.zeros(4), torch.randn(3), torch.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        rome_solve(torch.randn(4, 3), torch.randn(4), torch.randn(3), torch.eye(4))
    with pytest.raises(ValueError, match="`ridge`"):
        rome_solve(torch.randn(3, 4), torch.randn(4), torch.randn(3), torch.eye(4), ridge=-1.0)


def test_spread_residuals_divides_over_the_remaining_layers():
    z, h = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(spread_residuals(z, h, 4), (z.double() - h.double()) / 4)
    with pytest.raises(ValueError, match="remaining_layers"):
        spread_residuals(z, h, 0)
    with pytest.raises(ValueError, match="same shape"):
        spread_residuals(z, h[:2], 1)
