"""Null-space projection of AlphaEdit (Fang et al., 2025), as pure float64 tensor functions.

The keys ``K₀`` a layer usually sees are summarised by their second moment ``C = E[k kᵀ]`` (``dk x dk``).
Its eigenvectors whose eigenvalues are small (together holding at most ``threshold`` of the keys' energy, or
each below ``threshold`` times the largest) span the directions that those keys (almost) never take: the
*null space* of ``K₀``. With ``Û`` (``dk x r``) an orthonormal basis of it
and ``P = Û Ûᵀ`` the projection onto it, any update of the form ``Δ = Γ Ûᵀ`` leaves ``Δ k₀ = Γ Ûᵀ k₀ ≈ 0``
for every preserved key: the outputs the model gave before stay as they were (AlphaEdit, eq. 8-10).

AlphaEdit's update minimises ``‖(W + ΔP) K₁ − V₁‖² + ‖ΔP K_p‖² + α ‖ΔP‖²`` over the new keys ``K₁`` and the
keys ``K_p`` of the earlier edits made with it, whose closed form is (eq. 14, column notation)

    Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹,   R = V₁ − W K₁.

That ``dk x dk`` system is not symmetric. Writing ``Δ = Γ Ûᵀ`` turns it into the symmetric positive definite
``r x r`` ridge regression ``Γ = R K̃₁ᵀ (K̃₁ K̃₁ᵀ + K̃_p K̃_pᵀ + α I)⁻¹`` with the reduced keys ``K̃ = Ûᵀ K``,
solved here by Cholesky; it equals the paper's formula (the tests compare both). With row-major keys
(``(n, dk)``) the update is ``U Vᵀ`` with ``U = Rᵀ`` and ``V = Û S⁻¹ K̃ᵀ``: rank at most ``n``, like MEMIT.

Example:
    >>> import torch
    >>> preserved = torch.randn(50, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)
    >>> basis = null_space_basis(preserved.T @ preserved / 50, threshold=1e-8)
    >>> basis.shape
    torch.Size([8, 5])
    >>> delta = alphaedit_solve(torch.randn(2, 8), torch.randn(2, 4), basis, alpha=1e-9)
    >>> float((preserved @ delta.T).abs().max()) < 1e-9
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

from .solvers import LowRankUpdate, SolverError

#: How :func:`null_space_basis` reads its threshold: a share of the keys' energy, or of the largest eigenvalue.
NULL_SPACE_RULES = ("energy", "eigenvalue")

__all__ = [
    "NULL_SPACE_RULES",
    "alphaedit_factors",
    "alphaedit_solve",
    "null_space_basis",
    "null_space_projection",
]


def _float64(name: str, tensor: Tensor, ndim: int) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`{name}` must be a tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"`{name}` must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    out = tensor.detach().to("cpu", torch.float64)
    if not torch.isfinite(out).all():
        raise SolverError(f"`{name}` holds non-finite values (nan or inf); the inputs of the solve are broken")
    return out


def null_space_basis(second_moment: Tensor, *, threshold: float = 1e-2, rule: str = "energy") -> Tensor:
    """An orthonormal basis ``Û`` (``dk x r``) of the directions the preserved keys (almost) never take.

    Args:
        second_moment: ``(dk, dk)`` ``C = E[k kᵀ]`` of the keys to preserve (symmetrised before use).
        threshold: in ``(0, 1]``, read by ``rule``.
        rule: ``"energy"`` (the default): the eigenvectors of the smallest eigenvalues that together hold at most
            ``threshold`` of the keys' energy ``trace(C)``, so that ``E‖P k‖² ≤ threshold · E‖k‖²`` whatever
            the spectrum. ``"eigenvalue"``: the eigenvectors whose eigenvalue is below ``threshold · λ_max(C)``.
            The second rule fails on spectra with a few outlier directions: on SmolLM2's layer 8 the largest
            eigenvalue is 120× the mean, and ``1e-2 · λ_max`` keeps 1,272 of 1,536 directions holding 40% of the
            energy (docs/editing-that-lasts.md).

    Returns:
        ``Û`` in float64, columns ordered by increasing eigenvalue.

    Raises:
        SolverError: the null space is empty (raise ``threshold``), or ``C`` is zero.

    Example:
        >>> import torch
        >>> c = torch.diag(torch.tensor([1.0, 1e-4, 0.0]))
        >>> null_space_basis(c, threshold=1e-2).shape, null_space_basis(c, threshold=1e-2, rule="eigenvalue").shape
        (torch.Size([3, 2]), torch.Size([3, 2]))
    """
    c = _float64("second_moment", second_moment, 2)
    if c.shape[0] != c.shape[1]:
        raise ValueError(f"`second_moment` must be square, got {tuple(c.shape)}")
    if rule not in NULL_SPACE_RULES:
        raise ValueError(f"`rule`={rule!r} is not one of {', '.join(NULL_SPACE_RULES)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"`threshold` must lie in (0, 1] (a share of the {rule}), got {threshold}")
    eigenvalues, eigenvectors = torch.linalg.eigh((c + c.T) / 2)
    top = float(eigenvalues[-1])
    if not top > 0:
        raise SolverError("the key second moment C is zero: collect key statistics over some text first")
    if rule == "energy":
        # Cumulative energy from the smallest direction up; negative round-off eigenvalues count as zero.
        energy = torch.cumsum(eigenvalues.clamp_min(0.0), 0)
        keep = energy <= threshold * float(energy[-1])
        smallest = f"the smallest direction holds {float(energy[0] / energy[-1]):.3g} of the energy"
    else:
        keep = eigenvalues < threshold * top
        smallest = f"the smallest ratio is {float(eigenvalues[0]) / top:.3g}"
    if not bool(keep.any()):
        raise SolverError(
            f"no direction of C passes threshold={threshold:g} under the {rule!r} rule: the null space is empty; "
            f"raise the threshold ({smallest})"
        )
    return eigenvectors[:, keep].contiguous()


def null_space_projection(second_moment: Tensor, *, threshold: float = 1e-2, rule: str = "energy") -> Tensor:
    """The projection ``P = Û Ûᵀ`` (``dk x dk``) onto the null space of :func:`null_space_basis`.

    Example:
        >>> import torch
        >>> p = null_space_projection(torch.diag(torch.tensor([1.0, 0.0])))  # holds none of the energy
        >>> p.tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """
    basis = null_space_basis(second_moment, threshold=threshold, rule=rule)
    return basis @ basis.T


def alphaedit_factors(
    keys: Tensor,
    residuals: Tensor,
    basis: Tensor,
    *,
    alpha: float,
    previous_gram: Tensor | None = None,
) -> LowRankUpdate:
    """AlphaEdit's update ``Δ = R K₁ᵀ P (K_p K_pᵀ P + K₁ K₁ᵀ P + α I)⁻¹`` as exact factors ``U Vᵀ``.

    Args:
        keys: ``(n, dk)`` keys to write, one per row.
        residuals: ``(n, dv)`` change wanted in the projection's output for each key (``V₁ − W K₁``).
        basis: ``(dk, r)`` orthonormal null-space basis ``Û`` (:func:`null_space_basis`).
        alpha: ``α > 0``, the weight of ``‖Δ‖²`` (keeps the reduced system positive definite).
        previous_gram: ``(dk, dk)`` ``Σ k_p k_pᵀ`` over the keys of earlier edits whose outputs must be kept
            (``K_p K_pᵀ``); None when there are none.

    Returns:
        ``LowRankUpdate(u=Rᵀ (dv, n), v=Û S⁻¹ Ûᵀ K₁ᵀ (dk, n))``, ``S = Ûᵀ (K₁K₁ᵀ + K_pK_pᵀ) Û + α I``, float64.
        Its dense form equals ``Δ P``: the update never leaves the null space.

    Raises:
        SolverError: non-finite inputs, or ``S`` not positive definite.

    Example:
        >>> import torch
        >>> f = alphaedit_factors(torch.randn(2, 6), torch.randn(2, 3), torch.eye(6)[:, :4], alpha=1.0)
        >>> f.u.shape, f.v.shape
        (torch.Size([3, 2]), torch.Size([6, 2]))
    """
    k = _float64("keys", keys, 2)
    r = _float64("residuals", residuals, 2)
    u_hat = _float64("basis", basis, 2)
    if k.shape[0] != r.shape[0]:
        raise ValueError(f"`keys` has {k.shape[0]} rows but `residuals` has {r.shape[0]}; give one per key")
    if k.shape[0] == 0:
        raise ValueError("`keys` is empty; give at least one key to write")
    if u_hat.shape[0] != k.shape[1]:
        raise ValueError(f"`basis` must have {k.shape[1]} rows (the key size), got shape {tuple(u_hat.shape)}")
    if not alpha > 0:
        raise ValueError(f"`alpha` must be > 0, got {alpha}")
    reduced = k @ u_hat  # K̃₁ᵀ in row form, (n, r)
    system = reduced.T @ reduced + alpha * torch.eye(u_hat.shape[1], dtype=torch.float64)
    if previous_gram is not None:
        gram = _float64("previous_gram", previous_gram, 2)
        if tuple(gram.shape) != (k.shape[1], k.shape[1]):
            raise ValueError(f"`previous_gram` must be ({k.shape[1]}, {k.shape[1]}), got {tuple(gram.shape)}")
        system = system + u_hat.T @ gram @ u_hat
    factor, info = torch.linalg.cholesky_ex((system + system.T) / 2)
    if int(info) != 0:
        raise SolverError(f"the reduced AlphaEdit system (rank {u_hat.shape[1]}) is not positive definite; "
                          "increase `alpha`")
    v = u_hat @ torch.cholesky_solve(reduced.T, factor)
    return LowRankUpdate(u=r.T.contiguous(), v=v)


def alphaedit_solve(
    keys: Tensor,
    residuals: Tensor,
    basis: Tensor,
    *,
    alpha: float,
    previous_gram: Tensor | None = None,
) -> Tensor:
    """The dense AlphaEdit update ``(dv, dk)``; see :func:`alphaedit_factors` for the arguments.

    Example:
        >>> import torch
        >>> alphaedit_solve(torch.randn(2, 6), torch.randn(2, 3), torch.eye(6), alpha=1.0).shape
        torch.Size([3, 6])
    """
    return alphaedit_factors(keys, residuals, basis, alpha=alpha, previous_gram=previous_gram).dense()
