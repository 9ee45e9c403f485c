"""Editing: keys, target values, MEMIT / ROME / FT solvers, and the reversible :class:`EditDelta` they produce.

Example:
    >>> from lightning_kedit.editing import compute_edit, EditHyperParams  # doctest: +SKIP
    >>> delta = compute_edit(model, tokenizer, requests, method="memit")  # doctest: +SKIP
"""

from lightning_kedit.editing.delta import EditDelta, LayerUpdate, RevertReport
from lightning_kedit.editing.edit_inputs import resolve_statistics
from lightning_kedit.editing.editor import compute_edit, edit
from lightning_kedit.editing.hparams import METHODS, EditHyperParams, HyperParamError
from lightning_kedit.editing.keys import SubjectNotFoundError, subject_states
from lightning_kedit.editing.memit import memit_updates
from lightning_kedit.editing.prefixes import context_templates
from lightning_kedit.editing.rome import rome_updates
from lightning_kedit.editing.solvers import LowRankUpdate, memit_factors, memit_solve, rome_factors, rome_solve
from lightning_kedit.editing.target_values import TargetValues
from lightning_kedit.editing.targets import NonFiniteEditError, compute_target_values

__all__ = [
    "METHODS",
    "EditDelta",
    "EditHyperParams",
    "HyperParamError",
    "LayerUpdate",
    "LowRankUpdate",
    "NonFiniteEditError",
    "RevertReport",
    "SubjectNotFoundError",
    "TargetValues",
    "compute_edit",
    "compute_target_values",
    "context_templates",
    "edit",
    "memit_factors",
    "memit_solve",
    "memit_updates",
    "resolve_statistics",
    "rome_factors",
    "rome_solve",
    "rome_updates",
    "subject_states",
]
