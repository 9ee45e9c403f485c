"""Closed-form weight updates of locate-then-edit methods, as pure tensor functions.

Every solver works in float64 and never forms an explicit inverse: symmetric positive definite systems are
factorised once with a Cholesky decomposition and solved against that factor. Shapes follow the library's
conventions: keys and values are *rows* (``(n, dk)`` and ``(n, dv)``), and updates are ``out x in``
matrices ``(dv, dk)`` like an ``nn.Linear`` weight.

In the MEMIT paper's column notation (``K`` is ``dk x n``, ``R`` is ``dv x n``) the update is
``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹`` (MEMIT, eq. 14). With row-major keys ``K_r = Kᵀ`` and residuals ``R_r = Rᵀ``
it reads ``Δ = R_rᵀ K_r A⁻¹`` with ``A = λ C + K_rᵀ K_r``, and since ``A`` is symmetric
``Δ = U Vᵀ`` with ``U = R_rᵀ`` (``dv x n``) and ``V = A⁻¹ K_rᵀ`` (``dk x n``): an exact factorisation of
rank at most ``n``, without any SVD.

Example:
    >>> import torch
    >>> keys, residuals = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    >>> delta = memit_solve(keys, residuals, torch.eye(8, dtype=torch.float64), lam=1e-9)
    >>> torch.allclose(keys @ delta.T, residuals)
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lightning_kedit.errors import KeditError

__all__ = [
    "LowRankUpdate",
    "SolverError",
    "memit_factors",
    "memit_solve",
    "rome_factors",
    "rome_solve",
    "spread_residuals",
]


class SolverError(KeditError):
    """A linear system of an editing method that cannot be solved as posed (names the fix)."""


class LowRankUpdate(NamedTuple):
    """An ``out x in`` update stored as ``u @ v.T``.

    Args:
        u: ``(dv, r)`` left factor (output side).
        v: ``(dk, r)`` right factor (input side).

    Example:
        >>> import torch
        >>> update = LowRankUpdate(torch.ones(4, 1), torch.ones(6, 1))
        >>> update.dense().shape, update.rank
        (torch.Size([4, 6]), 1)
    """

    u: Tensor
    v: Tensor

    @property
    def rank(self) -> int:
        """The number of factor columns (an upper bound of the matrix rank)."""
        return int(self.u.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """The ``(dv, dk)`` shape of the dense update."""
        return int(self.u.shape[0]), int(self.v.shape[0])

    def dense(self) -> Tensor:
        """The update as a dense ``(dv, dk)`` matrix."""
        return self.u @ self.v.T


def _as_float64(name: str, tensor: Tensor, ndim: int) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    out = tensor.detach().to(torch.float64)
    if not torch.isfinite(out).all():
        raise SolverError(f"`{name}` holds non-finite values (nan or inf); the inputs of the solve are broken")
    return out


def _check_second_moment(second_moment: Tensor, key_size: int) -> Tensor:
    c = _as_float64("second_moment", second_moment, 2)
    if tuple(c.shape) != (key_size, key_size):
        raise ValueError(
            f"`second_moment` must be ({key_size}, {key_size}) to match the keys, got {tuple(c.shape)}"
        )
    return c


def _cholesky(matrix: Tensor, what: str, fix: str) -> Tensor:
    """The lower Cholesky factor of a symmetric matrix, or a :class:`SolverError` naming the fix."""
    factor, info = torch.linalg.cholesky_ex((matrix + matrix.T) / 2)
    if int(info) != 0:
        raise SolverError(
            f"{what} is not positive definite (leading minor {int(info)} of {matrix.shape[0]} fails); {fix}"
        )
    return factor


def memit_factors(keys: Tensor, residuals: Tensor, second_moment: Tensor, lam: float) -> LowRankUpdate:
    """The MEMIT update ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹`` as exact factors ``U Vᵀ`` of rank at most ``n``.

    Args:
        keys: ``(n, dk)`` keys to write, one per row.
        residuals: ``(n, dv)`` change wanted in the projection's output for each key.
        second_moment: ``(dk, dk)`` ``C = E[k kᵀ]`` of the keys the layer usually sees.
        lam: ``λ``, the weight of preserving the usual keys' outputs (``mom2_weight``); ``>= 0``.

    Returns:
        ``LowRankUpdate(u=Rᵀ (dv, n), v=(λ C + K Kᵀ)⁻¹ Kᵀ (dk, n))`` in float64.

    Raises:
        SolverError: ``λ C + K Kᵀ`` is not positive definite.

    Example:
        >>> import torch
        >>> f = memit_factors(torch.randn(2, 5), torch.randn(2, 3), torch.eye(5), lam=1.0)
        >>> f.u.shape, f.v.shape
        (torch.Size([3, 2]), torch.Size([5, 2]))
    """
    k = _as_float64("keys", keys, 2)
    r = _as_float64("residuals", residuals, 2)
    if k.shape[0] != r.shape[0]:
        raise ValueError(f"`keys` has {k.shape[0]} rows but `residuals` has {r.shape[0]}; give one per key")
    if k.shape[0] == 0:
        raise ValueError("`keys` is empty; give at least one key to write")
    if not lam >= 0:
        raise ValueError(f"`lam` must be >= 0, got {lam}")
    c = _check_second_moment(second_moment, k.shape[1])
    system = lam * c + k.T @ k
    factor = _cholesky(
        system,
        f"λC + KKᵀ (λ={lam:g}, {k.shape[0]} keys of size {k.shape[1]})",
        "increase `lam` (mom2_weight) or collect key statistics over more tokens so that C has full rank",
    )
    v = torch.cholesky_solve(k.T, factor)
    return LowRankUpdate(u=r.T.contiguous(), v=v)


def memit_solve(keys: Tensor, residuals: Tensor, second_moment: Tensor, lam: float) -> Tensor:
    """The dense MEMIT update ``(dv, dk)``; see :func:`memit_factors` for the arguments.

    Example:
        >>> import torch
        >>> memit_solve(torch.randn(2, 5), torch.randn(2, 3), torch.eye(5), lam=1.0).shape
        torch.Size([3, 5])
    """
    return memit_factors(keys, residuals, second_moment, lam).dense()


def rome_factors(
    current: Tensor, key: Tensor, target_value: Tensor, second_moment: Tensor, *, ridge: float = 0.0
) -> LowRankUpdate:
    """The ROME rank-one update ``Δ = (v* − W k) (C⁻¹ k)ᵀ / (kᵀ C⁻¹ k)`` (ROME, eq. 2).

    After the update, ``(W + Δ) k = v*`` exactly, while keys ``C``-orthogonal to ``k`` keep their outputs.
    The same ``key`` is used for the residual ``v* − W k`` and for the direction ``C⁻¹ k`` (the original
    implementation mixed a prefix-averaged key with a single-prompt one, so its edit missed ``v*``).

    Args:
        current: either the ``(dv, dk)`` weight ``W`` (``out x in``), or the ``(dv,)`` current output
            ``W k`` of the projection for ``key`` (without bias).
        key: ``(dk,)`` the key whose output is rewritten.
        target_value: ``(dv,)`` ``v*``, the output wanted for ``key`` (without bias).
        second_moment: ``(dk, dk)`` ``C = E[k kᵀ]``; only its direction matters (the scale cancels).
        ridge: added to the diagonal of ``C`` as ``ridge * mean(diag C)``, for a rank-deficient ``C``.

    Returns:
        ``LowRankUpdate(u=(v* − W k) (dv, 1), v=C⁻¹k / (kᵀC⁻¹k) (dk, 1))`` in float64.

    Example:
        >>> import torch
        >>> w, k, v = torch.randn(3, 5), torch.randn(5), torch.randn(3)
        >>> delta = rome_factors(w, k, v, torch.eye(5)).dense()
        >>> torch.allclose((w.double() + delta) @ k.double(), v.double())
        True
    """
    k = _as_float64("key", key, 1)
    v_star = _as_float64("target_value", target_value, 1)
    if current.ndim == 2:
        w = _as_float64("current", current, 2)
        if tuple(w.shape) != (v_star.shape[0], k.shape[0]):
            raise ValueError(
                f"`current` (the weight) must be (dv, dk) = ({v_star.shape[0]}, {k.shape[0]}), "
                f"got {tuple(w.shape)}"
            )
        now = w @ k
    else:
        now = _as_float64("current", current, 1)
        if now.shape != v_star.shape:
            raise ValueError(
                f"`current` (W k) has shape {tuple(now.shape)} but `target_value` has {tuple(v_star.shape)}"
            )
    if not ridge >= 0:
        raise ValueError(f"`ridge` must be >= 0, got {ridge}")
    c = _check_second_moment(second_moment, k.shape[0])
    if ridge:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    factor = _cholesky(
        c, "the key second moment C", "pass `ridge` > 0 or collect key statistics over more tokens"
    )
    c_inv_k = torch.cholesky_solve(k[:, None], factor)
    denominator = float(k @ c_inv_k[:, 0])
    if not denominator > 0:
        raise SolverError(f"kᵀ C⁻¹ k = {denominator:g} is not positive: the key is zero or C is degenerate")
    return LowRankUpdate(u=(v_star - now)[:, None], v=c_inv_k / denominator)


def rome_solve(
    current: Tensor, key: Tensor, target_value: Tensor, second_moment: Tensor, *, ridge: float = 0.0
) -> Tensor:
    """The dense ROME update ``(dv, dk)``; see :func:`rome_factors` for the arguments.

    Example:
        >>> import torch
        >>> rome_solve(torch.randn(3, 5), torch.randn(5), torch.randn(3), torch.eye(5)).shape
        torch.Size([3, 5])
    """
    return rome_factors(current, key, target_value, second_moment, ridge=ridge).dense()


def spread_residuals(targets: Tensor, current: Tensor, remaining_layers: int) -> Tensor:
    """MEMIT's share of the residual for the current edit layer: ``(z − h) / (L − l + 1)``.

    MEMIT (Alg. 1, line 10) writes the change ``z − h`` of the last edit layer's hidden state over the edit
    layers still to be updated, giving each an equal share; the layers after it see the already-updated
    weights, so the residual left shrinks as the loop advances.

    Args:
        targets: ``(n, dv)`` target hidden states ``z`` at the last edit layer.
        current: ``(n, dv)`` hidden states ``h`` at the last edit layer with the current weights.
        remaining_layers: edit layers not yet updated, this one included (``L − l + 1``), ``>= 1``.

    Example:
        >>> import torch
        >>> spread_residuals(torch.full((1, 2), 3.0), torch.zeros(1, 2), 3)
        tensor([[1., 1.]], dtype=torch.float64)
    """
    if remaining_layers < 1:
        raise ValueError(f"`remaining_layers` must be >= 1, got {remaining_layers}")
    z = _as_float64("targets", targets, 2)
    h = _as_float64("current", current, 2)
    if z.shape != h.shape:
        raise ValueError(f"`targets` {tuple(z.shape)} and `current` {tuple(h.shape)} must have the same shape")
    return (z - h) / remaining_layers
