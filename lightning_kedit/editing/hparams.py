"""Hyper-parameters of the locate-then-edit methods, with per-architecture defaults and where they come from.

Every field can be overridden from the API (``EditHyperParams.for_model(model, "memit").replace(v_lr=0.2)``)
and from the command line (``kedit edit --lambda 2000 --v-steps 20 ...``).

Sources of the defaults:

- MEMIT (Meng et al., 2023, ``hparams/MEMIT/*.json``) and EasyEdit (``hparams/MEMIT/llama-7b.yaml``): 25 Adam
  steps at learning rate 0.5, clamp factor 4 (0.75 for GPT-2/GPT-J), KL factor 0.0625, weight decay 1e-3,
  five consecutive early-to-middle layers, one bare prompt plus five model-generated prefixes of 10 tokens, keys
  averaged per kind of context (so the bare prompt weighs half: ``bare_weight`` 0.5).
- ROME (Meng et al., 2022, ``hparams/ROME/*.json``): one layer at about 17% of the depth (GPT-2 XL: 17 of 48,
  GPT-J: 5 of 28, Llama: 5), ten prefixes of 5 tokens and ten of 10.
- AlphaEdit (Fang et al., 2025): MEMIT's layers and target optimisation, plus the null-space threshold
  (:data:`DEFAULT_NULLSPACE_THRESHOLD`) and the weight of ``‖Δ‖²`` (:data:`DEFAULT_ALPHA`) in ``extra``
  (``nullspace_threshold``, ``nullspace_rule``, ``alpha``), where :func:`~.alphaedit.compute_alphaedit` reads them.
- ``mom2_weight`` (λ): the reference uses 15,000 with ``C = E[k kᵀ]``. Here λ multiplies ``C / mean(diag C)``
  when ``lambda_relative`` is set, which makes one value transfer across models whose key scales differ. MEMIT
  and AlphaEdit default to the relative λ = key size / 16 (:func:`derived_lambda`, measured on SmolLM2 and
  Qwen2.5-Coder-0.5B, checked on Qwen2.5-Coder-1.5B in docs/benchmarks/models.md); a checkpoint with a tested setting
  (:data:`TESTED_SETTINGS`) gets that instead: SmolLM2's absolute λ = 4,000 from the sweep in
  ``benchmarks/edit_quality.py`` (docs/benchmarks/editing.md). A λ given without ``lambda_relative``
  (:meth:`EditHyperParams.with_overrides`, ``kedit edit --lambda``) is absolute.

Example:
    >>> hp = EditHyperParams(layers=(4, 5, 6), mom2_weight=2000.0)
    >>> hp.replace(v_steps=10).v_steps
    10
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter, default_edit_layers

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_BARE_WEIGHT",
    "DEFAULT_NULLSPACE_RULE",
    "DEFAULT_NULLSPACE_THRESHOLD",
    "DEFAULT_RELATIVE_LAMBDA_PER_KEY",
    "LIFELONG_PRESERVE_FACTOR",
    "METHODS",
    "TESTED_SETTINGS",
    "EditHyperParams",
    "HyperParamError",
    "derived_lambda",
    "hparams_with_overrides",
    "resolve_hparams",
]

#: The edit methods this package computes.
METHODS = ("memit", "rome", "ft", "alphaedit", "lifelong")
#: The lifelong method's normalised value step ``η`` and ridge ``λ`` (editing/lifelong.py, eq. 1). With the
#: features at the subject and MEMIT's ``λ₀ C`` (eq. 2), η = 4 wrote more of a batch than the answer-position
#: features at η = 1 at a fifth of the perplexity cost (SmolLM2, docs/benchmarks/sequential.md).
DEFAULT_LIFELONG_STEP = 4.0
DEFAULT_LIFELONG_RIDGE = 1.0
#: Closed-form rounds per batch and the lifelong method's λ₀ as a multiple of MEMIT's λ. On SmolLM2 over 1,000
#: sequential edits, 3 rounds at 4 λ wrote 0.80 of the facts at +3.7 % perplexity; 3 rounds at 1 λ wrote 0.85 at
#: +17 % and collapsed by 3,000 edits; 1 round at 1 λ wrote 0.55 (docs/benchmarks/sequential.md).
DEFAULT_LIFELONG_ROUNDS = 3
LIFELONG_PRESERVE_FACTOR = 4.0
#: AlphaEdit's null-space threshold: the share of the preserved keys' energy the null space may hold. Half:
#: smaller null spaces force larger updates through directions the edit keys barely use, which hurts more
#: than the energy they exclude (SmolLM2 sweep, docs/benchmarks/sequential.md).
DEFAULT_NULLSPACE_THRESHOLD = 0.5
#: How the threshold is read (:data:`~.nullspace.NULL_SPACE_RULES`): "energy" (a share of ``trace C``) or
#: "eigenvalue" (a share of the largest eigenvalue, which fails on keys with outlier directions).
DEFAULT_NULLSPACE_RULE = "energy"
#: AlphaEdit's weight of ``‖Δ‖²``, relative to the mean diagonal of ``C``.
DEFAULT_ALPHA = 1.0
#: MEMIT's and AlphaEdit's share of the bare prompt in the template-averaged keys (the reference code's weighting).
DEFAULT_BARE_WEIGHT = 0.5
#: λ of a model without a tested setting, relative to the mean diagonal of ``C``, per unit of key size
#: (:func:`derived_lambda`). docs/benchmarks/models.md: SmolLM2's tested λ = 4,000 is about 100 relative at key
#: size 1,536; Qwen2.5-Coder-0.5B (key size 4,864) keeps neighbourhood within 0.02 at 300 relative, where the
#: reference's absolute 15,000 loses 0.05. Both lie on key size / 16. Checked untuned on Qwen2.5-Coder-1.5B (key
#: size 8,960, λ = 560): efficacy 1.00, neighbourhood −0.04, perplexity +0.03 %.
DEFAULT_RELATIVE_LAMBDA_PER_KEY = 1 / 16


class HyperParamError(KeditError):
    """A hyper-parameter outside its valid range (names the field, the value and the range)."""


@dataclass(frozen=True)
class EditHyperParams:
    """What an edit computes and how hard it tries.

    Args:
        layers: edit layers (0-based block indices); the last one is where target values are inserted.
        mom2_weight: λ, the weight of the key second moment ``C`` in ``(λ C + K Kᵀ)``.
        lambda_relative: when True, ``C`` is divided by the mean of its diagonal before weighting by λ.
        v_steps: the largest number of Adam steps of the target-value optimisation.
        v_lr: Adam's learning rate for δ.
        clamp_norm: the largest ``‖δ‖`` as a multiple of the norm of the original hidden state.
        kl_factor: weight of the KL term that keeps the "{subject} is a" distribution.
        weight_decay: weight of ``‖δ‖² / ‖h‖²``.
        stop_prob: a request stops optimising once its target's mean token probability exceeds this.
        prefix_lengths: pairs ``(tokens, count)`` of model-generated context prefixes; a bare prompt is added.
        bare_weight: share of the bare prompt in the template-averaged keys and hidden states (the prefixed
            prompts share the rest evenly); None weighs every template the same.
        batch_size: requests whose target values are optimised in one forward/backward (memory bound).
        seed: seed of prefix generation.
        v_bfloat16: optimise δ through bfloat16 copies of the upper layers first, then judge and finish every
            request in the model's own arithmetic (:mod:`.upper_blocks`); δ, the loss and Adam stay float32.
            None (the default): when the device multiplies bfloat16 natively (a CUDA GPU with bfloat16, a CPU
            with AVX-512 BF16 or AMX), about 2× faster end to end there; elsewhere float32 only.
        ft_norm_bound: L∞ bound on the fine-tuning change (method "ft").
        ft_steps: fine-tuning steps (method "ft").
        ft_lr: fine-tuning learning rate (method "ft").
        extra: method-specific settings outside the fields (AlphaEdit: ``nullspace_threshold`` and ``alpha``);
            not compared, and not part of :meth:`to_dict`.
    """

    layers: tuple[int, ...] = (4, 5, 6, 7, 8)
    mom2_weight: float = 15000.0
    lambda_relative: bool = False
    v_steps: int = 25
    v_lr: float = 0.5
    clamp_norm: float = 4.0
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    stop_prob: float = 0.95
    prefix_lengths: tuple[tuple[int, int], ...] = ((10, 5),)
    bare_weight: float | None = None
    batch_size: int = 32
    seed: int = 0
    v_bfloat16: bool | None = None
    ft_norm_bound: float = 5e-4
    ft_steps: int = 25
    ft_lr: float = 5e-4
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))
        object.__setattr__(self, "prefix_lengths", tuple((int(a), int(b)) for a, b in self.prefix_lengths))
        if not self.layers:
            raise HyperParamError("`layers` is empty; give at least one edit layer")
        positive = {
            "v_lr": self.v_lr, "clamp_norm": self.clamp_norm, "batch_size": self.batch_size,
            "ft_lr": self.ft_lr, "ft_norm_bound": self.ft_norm_bound,
        }
        for name, value in positive.items():
            if not value > 0:
                raise HyperParamError(f"`{name}` must be positive, got {value}")
        non_negative = {
            "mom2_weight": self.mom2_weight, "v_steps": self.v_steps, "kl_factor": self.kl_factor,
            "weight_decay": self.weight_decay, "ft_steps": self.ft_steps,
        }
        for name, value in non_negative.items():
            if not value >= 0:
                raise HyperParamError(f"`{name}` must be >= 0, got {value}")
        if self.bare_weight is not None and not 0 <= self.bare_weight <= 1:
            raise HyperParamError(f"`bare_weight` must lie in [0, 1], got {self.bare_weight}")
        if not 0 < self.stop_prob <= 1:
            raise HyperParamError(f"`stop_prob` must lie in (0, 1], got {self.stop_prob}")
        for length, count in self.prefix_lengths:
            if length < 1 or count < 0:
                raise HyperParamError(
                    f"`prefix_lengths` holds ({length}, {count}); lengths must be >= 1 and counts >= 0"
                )

    def replace(self, **changes: Any) -> EditHyperParams:
        """A copy with ``changes`` applied (None values are ignored, so CLI defaults pass through)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise HyperParamError(f"unknown hyper-parameters {sorted(unknown)}; known: {self.field_names()}")
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def with_overrides(self, changes: Mapping[str, Any]) -> EditHyperParams:
        """:meth:`replace`, except that a ``mom2_weight`` given without ``lambda_relative`` is absolute.

        λ is then read as the MEMIT papers and ``--lambda`` write it (``C = E[k kᵀ]``), whatever the defaults'
        own λ was.

        Example:
            >>> base = EditHyperParams(mom2_weight=300.0, lambda_relative=True)
            >>> base.with_overrides({"mom2_weight": 15000.0}).lambda_relative
            False
            >>> base.with_overrides({"v_steps": 5}).lambda_relative
            True
            >>> alphaedit = base.replace(extra={"preserve_weight": 300.0})  # λ₀ = λ, the default
            >>> alphaedit.with_overrides({"mom2_weight": 15000.0}).extra["preserve_weight"]
            15000.0
        """
        changes = dict(changes)
        if changes.get("mom2_weight") is not None:
            if changes.get("lambda_relative") is None:
                changes["lambda_relative"] = False
            # AlphaEdit's and the lifelong method's λ₀ (extra["preserve_weight"]) defaults to λ: it follows a
            # new λ unless the changes set it too (a λ₀ read against another scale of C would be meaningless).
            extra = dict(changes.get("extra", self.extra))
            if "preserve_weight" not in changes.get("extra", {}) and extra.get("preserve_weight") == self.mom2_weight:
                extra["preserve_weight"] = float(changes["mom2_weight"])
                changes["extra"] = extra
        return self.replace(**changes)

    def uses_key_statistics(self, method: str) -> bool:
        """Whether ``method`` under these hyper-parameters reads key statistics (``C``).

        Example:
            >>> EditHyperParams(extra={"preserve_weight": 0.0}).uses_key_statistics("lifelong")
            False
        """
        if method == "lifelong":
            return float(self.extra.get("preserve_weight", 0.0)) > 0
        return method != "ft"

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "extra"]

    @classmethod
    def default_sources(cls, model: nn.Module, method: str = "memit") -> dict[str, str]:
        """Where each default of :meth:`for_model` that depends on the model comes from.

        ``"tested"``: measured on this exact checkpoint (:data:`TESTED_SETTINGS`, by weights digest);
        ``"derived"``: computed from the model's shape; ``"reference"``: the method's published value.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64))
            >>> EditHyperParams.default_sources(model)["layers"]
            'derived: a window at 13% of the depth'
        """
        tested = tested_setting(model, method) if method in ("memit", "alphaedit", "lifelong") else None
        where = {"rome": "one layer at 17%", "ft": "one layer at 13%"}.get(method, "a window at 13%")
        sources = {
            "layers": f"derived: {where} of the depth",
            "mom2_weight": ("derived: key size / 16, relative to mean(diag C)"
                            if method in ("memit", "alphaedit", "lifelong")
                            else "reference: MEMIT's GPT-J value (C = E[k kᵀ])"),
            "clamp_norm": "reference: MEMIT's value for this family (relative to the hidden state's norm)",
        }
        for name in tested or {}:
            sources[name] = "tested: measured on this checkpoint (docs/benchmarks/editing.md)"
        if method == "lifelong":
            sources["mom2_weight"] = f"{sources['mom2_weight']}, times {LIFELONG_PRESERVE_FACTOR:g} (the lifelong λ₀)"
        return sources

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (stored in a delta's metadata)."""
        out = {name: getattr(self, name) for name in self.field_names()}
        out["layers"] = list(self.layers)
        out["prefix_lengths"] = [list(p) for p in self.prefix_lengths]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EditHyperParams:
        known = {k: v for k, v in data.items() if k in cls.field_names()}
        if "prefix_lengths" in known:
            known["prefix_lengths"] = tuple(tuple(p) for p in known["prefix_lengths"])
        return cls(**known)

    @classmethod
    def for_model(
        cls, model: nn.Module, method: str = "memit", layers: Sequence[int] | None = None
    ) -> EditHyperParams:
        """Per-architecture defaults for ``method`` ("memit", "rome", "ft" or "alphaedit").

        AlphaEdit gets MEMIT's defaults (its layers and target optimisation) with the null-space threshold and
        ``alpha`` in :attr:`extra`.

        Example:
            >>> from transformers import GPT2Config, GPT2LMHeadModel
            >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64))
            >>> EditHyperParams.for_model(model, "rome").layers
            (1,)
            >>> EditHyperParams.for_model(model, "alphaedit").extra
            {'nullspace_threshold': 0.5, 'nullspace_rule': 'energy', 'alpha': 1.0, 'preserve_weight': 8.0}
        """
        if method not in METHODS:
            raise HyperParamError(f"`method`={method!r} is not one of {', '.join(METHODS)}")
        adapter = ModelAdapter.for_model(model)
        n = adapter.num_layers
        # GPT-2 / GPT-J hidden states are larger relative to their MLP outputs: MEMIT clamps at 0.75 there.
        clamp = 0.75 if adapter.model_type in ("gpt2", "gptj") else 4.0
        if method in ("memit", "alphaedit"):
            chosen = tuple(default_edit_layers(n))
            # The reference averages keys per kind of context, so the bare prompt weighs half (keys.py).
            base = cls(layers=chosen, clamp_norm=clamp, bare_weight=DEFAULT_BARE_WEIGHT,
                       mom2_weight=derived_lambda(adapter.key_size), lambda_relative=True)
            tested = tested_setting(model, "memit")
            if tested is not None:  # this exact checkpoint (by weights digest) has a measured setting
                base = base.with_overrides(tested)  # a tested λ is absolute unless it says so
            if method == "alphaedit":
                # AlphaEdit keeps MEMIT's pipeline; λ is not used by its solve.
                base = base.replace(extra={"nullspace_threshold": DEFAULT_NULLSPACE_THRESHOLD,
                                           "nullspace_rule": DEFAULT_NULLSPACE_RULE, "alpha": DEFAULT_ALPHA,
                                           "preserve_weight": base.mom2_weight})
        elif method == "lifelong":
            # One gradient per fact at the subject and a solve per layer (editing/lifelong.py, eq. 2): MEMIT's
            # layers, with a multiple of MEMIT's λ as λ₀ (its only weight of C, so also its mom2_weight).
            memit = cls.for_model(model, "memit")
            weight = LIFELONG_PRESERVE_FACTOR * memit.mom2_weight
            base = cls(layers=memit.layers, mom2_weight=weight, lambda_relative=memit.lambda_relative,
                       extra={"step": DEFAULT_LIFELONG_STEP, "ridge": DEFAULT_LIFELONG_RIDGE,
                              "rounds": DEFAULT_LIFELONG_ROUNDS, "preserve_weight": weight, "positions": "subject"})
        elif method == "rome":
            chosen = (min(n - 1, max(0, round(n * 0.17))),)
            base = cls(layers=chosen, clamp_norm=clamp, prefix_lengths=((5, 10), (10, 10)))
        else:
            # FT-L (Zhu et al., 2020; the ROME paper's baseline): one layer's projection, L∞-bounded.
            chosen = (default_edit_layers(n)[0],)
            base = cls(layers=chosen)
        if layers is not None:
            base = base.replace(layers=_checked_layers(adapter, layers))
        return base


def resolve_hparams(
    model: nn.Module, method: str, layers: Sequence[int] | None = None, hparams: EditHyperParams | None = None
) -> EditHyperParams:
    """The hyper-parameters of an edit: ``hparams`` (the method's defaults when None) with ``layers`` if given.

    Raises:
        HyperParamError: an unknown method, or layers outside the model.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64))
        >>> resolve_hparams(model, "memit", [3, 2], EditHyperParams(layers=(0,))).layers
        (2, 3)
    """
    if method not in METHODS:
        raise HyperParamError(f"`method`={method!r} is not one of {', '.join(METHODS)}")
    adapter = ModelAdapter.for_model(model)
    checked = _checked_layers(adapter, layers) if layers is not None else None
    base = hparams if hparams is not None else EditHyperParams.for_model(model, method)
    if checked is not None:
        base = base.replace(layers=checked)
    _checked_layers(adapter, base.layers)
    return base


def hparams_with_overrides(
    model: nn.Module, method: str, layers: Sequence[int] | None, given: Mapping[str, Any] | EditHyperParams | None
) -> EditHyperParams:
    """``given`` itself (with ``layers`` when given), or the model's defaults for ``method`` with its overrides.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64))
        >>> hparams_with_overrides(model, "memit", [1], {"v_steps": 3}).v_steps
        3
    """
    if isinstance(given, EditHyperParams):
        return given if layers is None else given.replace(layers=tuple(layers))
    return EditHyperParams.for_model(model, method, layers).with_overrides(given or {})


def _checked_layers(adapter: ModelAdapter, layers: Sequence[int]) -> tuple[int, ...]:
    """``layers`` sorted and de-duplicated, as a :class:`HyperParamError` when one lies outside the model."""
    try:
        return tuple(adapter.check_layers(list(layers)))
    except ValueError as err:
        raise HyperParamError(str(err)) from err


def derived_lambda(key_size: int) -> float:
    """λ relative to the mean diagonal of ``C`` for a model without a tested setting: key size / 16.

    The ``K Kᵀ`` term of ``(λ C + K Kᵀ)`` grows with ``‖k‖² = trace C`` of a key, that is with the key size
    times the mean diagonal, so a relative λ that keeps the same balance grows with the key size.

    Example:
        >>> derived_lambda(4864)
        304.0
    """
    return key_size * DEFAULT_RELATIVE_LAMBDA_PER_KEY


def tested_setting(model: nn.Module, method: str) -> dict[str, Any] | None:
    """The setting measured on this exact checkpoint for ``method`` (:data:`TESTED_SETTINGS`), or None."""
    if method in ("alphaedit", "lifelong"):  # both take MEMIT's layers and λ
        method = "memit"
    from lightning_kedit.models.fingerprint import model_digest

    return TESTED_SETTINGS.get(model_digest(model), {}).get(method)


#: Defaults chosen by the sweep on SmolLM2-135M + CounterFact (benchmarks/edit_quality.py, first 100 validation
#: cases, docs/benchmarks/editing.md): layers 3-8 (GPT-J's MEMIT window: one more layer shares the residual),
#: λ = 4,000 and the bare prompt at half the key weight give 0.97 / 0.88 / 0.72 at +1.4% perplexity, where the
#: reference default (λ = 15,000, layers 4-8) gives 0.66 / 0.60 / 0.74.
_SMOLLM2_MEMIT: dict[str, Any] = {"mom2_weight": 4000.0, "lambda_relative": False, "layers": (3, 4, 5, 6, 7, 8)}

#: Settings measured on exact checkpoints, by :func:`~lightning_kedit.models.fingerprint.model_digest`, then method.
#: A model is matched by its weights, never by its family or layer count: any other model gets the derived and
#: reference defaults.
TESTED_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "08759a4a71b3fc61": {"memit": _SMOLLM2_MEMIT},  # SmolLM2-135M-Instruct, the embedded model
}
