"""The cumulative solve of the lifelong method: the total update fits every edit of the sequence at once.

With ``extra["solve"] = "batch"`` (the default) each batch's update solves eq. (2) of :mod:`.lifelong` for the
batch alone, and the preservation term weighs that batch's update only: a later batch may undo an earlier one,
and the updates' damage adds up batch after batch. ``solve="cumulative"`` instead keeps, for every batch, the
rows it asked for (its keys ``K_b`` and the outputs ``R_b`` it wanted, as changes from the first weights
``W₀``) and makes the **total** update ``ΔW = W − W₀`` solve the ridge regression over all of them:

    ΔW = argmin_Δ Σ_b ‖Δ K_bᵀ − R_bᵀ‖² + λ₀ tr(Δ C Δᵀ) + λ ‖Δ D‖²
       = Rᵀ K (KᵀK + λ₀ C + λ D²)⁻¹,    K = [K_1; …; K_B],  R = [R_1; …; R_B]                   (3)

(MEMIT's normal equations with every edit of the sequence and the preservation term on the total; ``D`` is the
running key scale of the lifelong normalisation). A batch's rows are the keys of its facts on the model as it
stands and the outputs ``r = (W − W₀) k + v*``: what the layer gives the key now, plus the value step ``v*``
of eq. (1). Each batch's delta is the change of the total, ``ΔW_B − (W − W₀)``, a dense ``d_v × d_k`` matrix:
the price of a solve whose earlier edits stay constraints, and of a preservation term that bounds the whole
sequence's change rather than each batch's.

The rows are recorded in the :class:`~.history.EditHistory` (``layers.{l}.rows.key`` and
``layers.{l}.rows.target`` in ``HistoryEntry.extras``), and eq. (3) is solved from them in history order, so
a resumed sequence computes the same updates. A cumulative batch can only follow cumulative batches of the same
layers: a batch of another method left no rows, and eq. (3) would undo it.

Example:
    >>> k = torch.eye(2, 3, dtype=torch.float64)
    >>> total = cumulative_total(k, 2 * k[:, :2], torch.ones(3, dtype=torch.float64), ridge=1e-9)
    >>> torch.allclose(total @ k.T, 2 * k[:, :2].T)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_kedit.errors import KeditError

if TYPE_CHECKING:
    from .history import EditHistory

__all__ = ["SOLVES", "cumulative_total", "recorded_rows", "row_tensors"]

#: ``extra["solve"]`` of the lifelong method: each batch alone (eq. 2) or the total over the sequence (eq. 3).
SOLVES = ("batch", "cumulative")


def cumulative_total(keys: Tensor, targets: Tensor, key_scale: Tensor, *, ridge: float,
                     preserve: Tensor | None = None) -> Tensor:
    """Eq. (3): the total ``d_v × d_k`` update ``Rᵀ K (KᵀK + λ₀C + λD²)⁻¹``, ``D = diag(key_scale)``.

    Solved in the normalised coordinates ``K̂ = K D⁻¹`` of the lifelong method, where the system
    ``K̂ᵀK̂ + D⁻¹λ₀CD⁻¹ + λI`` is symmetric positive definite and as well conditioned as eq. (2)'s.

    Args:
        keys: ``(N, d_k)`` keys of every row of the sequence.
        targets: ``(N, d_v)`` the outputs asked of them, as changes from the first weights.
        key_scale: ``(d_k,)`` the key scale ``s_k`` (> 0).
        ridge: ``λ`` (> 0).
        preserve: ``(d_k, d_k)`` ``λ₀ C``; None for none.
    """
    if not ridge > 0:
        raise KeditError(f"the lifelong ridge must be > 0, got {ridge}")
    if keys.shape[0] != targets.shape[0] or keys.shape[0] == 0:
        raise KeditError(f"keys {tuple(keys.shape)} and targets {tuple(targets.shape)} need the same, non-zero rows")
    scale = key_scale.to(torch.float64)
    k_hat = keys.to(torch.float64) / scale
    system = k_hat.T @ k_hat + ridge * torch.eye(k_hat.shape[1], dtype=torch.float64)
    if preserve is not None:
        system = system + preserve.to(torch.float64) / scale[:, None] / scale[None, :]
    moment = targets.to(torch.float64).T @ k_hat  # Rᵀ K̂: d_v × d_k
    # Δ̂ = Rᵀ K̂ (system)⁻¹, i.e. system Δ̂ᵀ = K̂ᵀ R (the system is symmetric); ΔW = Δ̂ D⁻¹.
    return torch.linalg.solve(system, moment.T).T / scale


def row_tensors(layer: int, keys: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """A batch's rows at ``layer``, flat for ``HistoryEntry.extras``."""
    return {f"layers.{layer}.rows.key": keys, f"layers.{layer}.rows.target": targets}


def recorded_rows(history: EditHistory | None, layers: Sequence[int], key_size: int,
                  value_size: int) -> dict[int, tuple[Tensor, Tensor]]:
    """Per layer, the keys and targets every batch of ``history`` recorded, in history order.

    Raises:
        KeditError: a batch of ``history`` recorded no rows at one of ``layers`` (another method, the batch
            solve, or other layers): eq. (3) would undo it.
    """
    rows: dict[int, tuple[list[Tensor], list[Tensor]]] = {layer: ([], []) for layer in layers}
    for index, entry in enumerate(history or (), start=1):
        extras: Mapping[str, Tensor] = entry.extras
        for layer in layers:
            if f"layers.{layer}.rows.key" not in extras:
                raise KeditError(
                    f"solve='cumulative' continues only a history of cumulative lifelong batches at layers "
                    f"{list(layers)}; batch {index} (method {entry.delta.method!r}) recorded no rows at layer {layer}. "
                    "Start a new history, or keep solve='batch' for this one")
            rows[layer][0].append(extras[f"layers.{layer}.rows.key"])
            rows[layer][1].append(extras[f"layers.{layer}.rows.target"])
    return {layer: (torch.cat(k) if k else torch.zeros(0, key_size, dtype=torch.float64),
                    torch.cat(t) if t else torch.zeros(0, value_size, dtype=torch.float64))
            for layer, (k, t) in rows.items()}
