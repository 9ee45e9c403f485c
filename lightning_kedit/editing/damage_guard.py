"""A guard against edits that damage the model: measure a small fixed probe before and after, reject past a limit.

An edit that writes its facts can still wreck the rest of the model (an over-weighted update, a target value
pushed far off the hidden-state scale, layers where the method's assumptions do not hold). The guard measures,
with the edit applied temporarily and the weights restored bit for bit after:

- the perplexity of a fixed probe: the first ``probe_tokens`` tokens of a text (by default the bundled corpus
  excerpt the key statistics come from), scored in windows of ``window`` tokens;
- the neighbourhood of the requests: on up to ``max_neighborhood_prompts`` of their neighbourhood prompts, the
  mean probability that the neighbour's own answer beats the edit's new target,
  ``q = σ(NLL_new − NLL_own)`` (the ``prob`` form of :class:`~lightning_kedit.evaluation.metrics.EditSpecificity`).

It rejects the edit when the relative perplexity rise exceeds ``max_perplexity_rise`` (or the perplexity is
not finite), or the neighbourhood falls by more than ``max_neighborhood_drop``. The report says what was
measured and which setting to change.

Example:
    >>> guard = DamageGuard(max_perplexity_rise=0.10)
    >>> report = guard.check(model, tokenizer, delta, requests)  # doctest: +SKIP
    >>> report.passed, round(report.perplexity_rise, 3)  # doctest: +SKIP
    (True, 0.004)
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_kedit.errors import KeditError

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta
    from lightning_kedit.requests import EditRequest

__all__ = ["DamageGuard", "DamageReport", "EditRejectedError"]


@dataclass(frozen=True)
class DamageReport:
    """What an edit did to the guard's probe.

    Args:
        perplexity_before: probe perplexity of the unedited model.
        perplexity_after: probe perplexity with the edit applied.
        perplexity_rise: ``after / before − 1`` (``inf`` when the edited perplexity is not finite).
        neighborhood_before: mean probability that the neighbours keep their own answer, unedited (None
            without neighbourhood prompts).
        neighborhood_after: the same with the edit applied.
        neighborhood_prompts: how many neighbourhood prompts were scored.
        probe_tokens: how many text tokens were scored.
        seconds: the time the measurement took.
        passed: both measures are within the guard's limits.
        message: one line naming the measured damage and, when rejected, the settings to change.
    """

    perplexity_before: float
    perplexity_after: float
    perplexity_rise: float
    neighborhood_before: float | None
    neighborhood_after: float | None
    neighborhood_prompts: int
    probe_tokens: int
    seconds: float
    passed: bool
    message: str

    @property
    def neighborhood_drop(self) -> float | None:
        """``before − after`` of the neighbourhood (None without neighbourhood prompts)."""
        if self.neighborhood_before is None or self.neighborhood_after is None:
            return None
        return self.neighborhood_before - self.neighborhood_after

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``kedit edit --json`` writes it under ``"guard"``)."""
        return {**asdict(self), "neighborhood_drop": self.neighborhood_drop}


class EditRejectedError(KeditError):
    """An edit whose measured damage passes the :class:`DamageGuard`'s limits; ``report`` holds the figures."""

    def __init__(self, report: DamageReport) -> None:
        super().__init__(report.message)
        self.report = report


def _finite(value: float) -> bool:
    return math.isfinite(value)


def _advice(hparams: Mapping[str, Any], method: str) -> str:
    """The settings that make an edit gentler, with their current values (CLI option / Python field)."""
    layers = hparams.get("layers")
    where = f"choose other --layers (now {list(layers)})" if layers is not None else "choose other --layers"
    if method == "ft":
        return (f"lower the hyper-parameters ft_lr (now {hparams.get('ft_lr')}) or ft_norm_bound "
                f"(now {hparams.get('ft_norm_bound')}), or {where}")
    return (
        f"raise --lambda / mom2_weight (now {hparams.get('mom2_weight')}), lower --clamp / clamp_norm "
        f"(now {hparams.get('clamp_norm')}) or --v-lr / v_lr (now {hparams.get('v_lr')}), or {where}"
    )


@dataclass(frozen=True)
class DamageGuard:
    """Limits on the damage an edit may do, and the probe it is measured on.

    Args:
        max_perplexity_rise: largest relative rise of the probe perplexity (0.10 = +10%).
        max_neighborhood_drop: largest fall of the neighbourhood probability (absolute, in [0, 1]).
        probe_tokens: text tokens scored for the perplexity (a few hundred keep the cost to seconds).
        window: tokens per scored window.
        max_neighborhood_prompts: most neighbourhood prompts scored (taken round-robin over the requests).
        text: the probe text; None for the bundled corpus excerpt.

    Raises:
        KeditError: a limit that is not positive, a count below its minimum, or a text that is not a file.

    Example:
        >>> DamageGuard(max_perplexity_rise=0.05).max_perplexity_rise
        0.05
        >>> DamageGuard(max_perplexity_rise=-1)
        Traceback (most recent call last):
        ...
        lightning_kedit.errors.KeditError: `max_perplexity_rise` must be a positive number, got -1
    """

    max_perplexity_rise: float = 0.10
    max_neighborhood_drop: float = 0.10
    probe_tokens: int = 256
    window: int = 128
    max_neighborhood_prompts: int = 32
    text: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        for name in ("max_perplexity_rise", "max_neighborhood_drop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
                    or not math.isfinite(value):
                raise KeditError(f"`{name}` must be a positive number, got {value!r}")
        if self.max_neighborhood_drop > 1:
            raise KeditError(
                f"`max_neighborhood_drop` is a probability drop in (0, 1], got {self.max_neighborhood_drop}"
            )
        for name, least in (("probe_tokens", 16), ("window", 8), ("max_neighborhood_prompts", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise KeditError(f"`{name}` must be an integer >= {least}, got {value!r}")
        if self.text is not None and not Path(self.text).is_file():
            raise KeditError(f"guard probe text {str(self.text)!r} is not a file; give a UTF-8 text file or None")

    # ------------------------------------------------------------------------------------------ probe
    def _text(self) -> Path:
        from lightning_kedit.requests import bundled_corpus_path

        return Path(self.text) if self.text is not None else bundled_corpus_path()

    def _neighbours(self, requests: Sequence[EditRequest]) -> tuple[list[str], list[str], list[str]]:
        """Prompts, own answers and new targets of up to ``max_neighborhood_prompts`` neighbours, round-robin."""
        prompts: list[str] = []
        own: list[str] = []
        new: list[str] = []
        depth = max((len(r.neighborhood) for r in requests), default=0)
        for i in range(depth):
            for request in requests:
                if len(prompts) >= self.max_neighborhood_prompts:
                    return prompts, own, new
                if i < len(request.neighborhood):
                    prompts.append(request.neighborhood[i].prompt)
                    own.append(request.neighborhood[i].answer)
                    new.append(request.target_new)
        return prompts, own, new

    @torch.no_grad()
    def _measure(
        self, model: nn.Module, tokenizer: Any, neighbours: tuple[list[str], list[str], list[str]]
    ) -> tuple[float, float | None]:
        from lightning_kedit.evaluation.metrics import preference_probability
        from lightning_kedit.evaluation.perplexity import perplexity
        from lightning_kedit.evaluation.scoring import score_answers

        ppl = perplexity(model, tokenizer, self._text(), max_tokens=self.probe_tokens, window=self.window,
                         batch_size=4)
        prompts, own, new = neighbours
        if not prompts:
            return ppl, None
        scores = score_answers(model, tokenizer, prompts + prompts, own + new)
        nll = scores.nll
        q = preference_probability(nll[: len(prompts)], nll[len(prompts):])
        return ppl, float(q.mean())

    # ------------------------------------------------------------------------------------------ public
    def measure(
        self,
        model: nn.Module,
        tokenizer: Any,
        delta: EditDelta,
        requests: Sequence[EditRequest] = (),
        *,
        baseline: tuple[float, float | None] | None = None,
    ) -> DamageReport:
        """Measure the damage of ``delta`` on ``model`` (which must not hold it yet); the model is left unchanged.

        Args:
            model: the unedited model the delta was computed on.
            tokenizer: its tokenizer.
            delta: the edit; applied for the measurement and reverted bit for bit after (also on errors).
            requests: the edit's requests, whose neighbourhood prompts are part of the probe.
            baseline: ``(perplexity, neighbourhood)`` of the unedited model measured earlier on the same probe
                and requests (skips measuring them again).

        Returns:
            The :class:`DamageReport`; ``passed`` says whether the edit is within the limits.
        """
        start = time.perf_counter()
        neighbours = self._neighbours(list(requests))
        was_training = model.training
        model.eval()
        try:
            ppl_before, neigh_before = baseline if baseline is not None else self._measure(model, tokenizer, neighbours)
            with delta.applied(model):
                ppl_after, neigh_after = self._measure(model, tokenizer, neighbours)
        finally:
            model.train(was_training)
        rise = ppl_after / ppl_before - 1 if _finite(ppl_after) and _finite(ppl_before) else math.inf
        drop = None if neigh_before is None or neigh_after is None else neigh_before - neigh_after
        ppl_ok = rise <= self.max_perplexity_rise
        neigh_ok = drop is None or drop <= self.max_neighborhood_drop
        passed = ppl_ok and neigh_ok
        measured = (f"probe perplexity {ppl_before:.2f} -> {ppl_after:.2f} "
                    f"({rise:+.1%}, limit +{self.max_perplexity_rise:.0%})")
        if drop is not None:
            measured += (f", neighbourhood {neigh_before:.3f} -> {neigh_after:.3f} "
                         f"(-{max(drop, 0.0):.3f}, limit -{self.max_neighborhood_drop:.2f})")
        if passed:
            message = f"edit within the damage guard's limits: {measured}"
        else:
            message = (f"edit rejected by the damage guard: {measured}; to damage less, "
                       f"{_advice(delta.hparams, delta.method)} (or --force / force=True to keep it)")
        return DamageReport(
            perplexity_before=ppl_before,
            perplexity_after=ppl_after,
            perplexity_rise=rise,
            neighborhood_before=neigh_before,
            neighborhood_after=neigh_after,
            neighborhood_prompts=len(neighbours[0]),
            probe_tokens=self.probe_tokens,
            seconds=time.perf_counter() - start,
            passed=passed,
            message=message,
        )

    def check(
        self, model: nn.Module, tokenizer: Any, delta: EditDelta, requests: Sequence[EditRequest] = (),
        *, force: bool = False,
    ) -> DamageReport:
        """:meth:`measure`, then raise :class:`EditRejectedError` when the edit fails (unless ``force``).

        Example:
            >>> DamageGuard().check(model, tokenizer, delta, requests)  # doctest: +SKIP
        """
        report = self.measure(model, tokenizer, delta, requests)
        if not report.passed and not force:
            raise EditRejectedError(report)
        return report
