"""The request types: :class:`EditRequest` (one fact to write) and :class:`PromptAnswer` (a prompt and its answer).

Example:
    >>> request = EditRequest(case_id="0", prompt="{} plays the", subject="Toko Yasuda",
    ...                       target_new="piano", target_true="guitar")
    >>> request.prompt_text
    'Toko Yasuda plays the'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lightning_kedit.errors import RequestFormatError

__all__ = ["EditRequest", "PromptAnswer"]


@dataclass(frozen=True)
class PromptAnswer:
    """A prompt and the answer expected after it (stored without a leading space).

    ``aliases`` are other accepted spellings of the answer (MQuAKE, KnowEdit); scoring uses ``answer``.
    """

    prompt: str
    answer: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    Args:
        case_id: identifier, unique within a request file (kept as a string).
        prompt: the edit prompt with ``{}`` exactly once where the subject goes.
        subject: the subject whose fact changes.
        target_new: the new answer (no leading space).
        target_true: the answer the model should hold before the edit, when known.
        paraphrase_prompts: filled prompts (subject written out) that should also give ``target_new``.
        neighborhood: prompts about other subjects whose expected answer must not change.
        consistency: prompts whose expected answer *after* the edit is given (implications, multi-hop).
        generation_prompts: free-text prompts for fluency checks.
        chain_id: requests sharing a chain id (an MQuAKE record) are edited together.
        attribute_prompts: prompts about other subjects that already answer ``target_new`` (ROME's
            CounterFact); kept for round trips, not used by the built-in metrics.
    """

    case_id: str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[PromptAnswer, ...] = ()
    consistency: tuple[PromptAnswer, ...] = ()
    generation_prompts: tuple[str, ...] = field(default=(), repr=False)
    chain_id: str | None = None
    attribute_prompts: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        where = f"request {self.case_id!r}"
        if self.prompt.count("{}") != 1:
            raise RequestFormatError(f"{where}: `prompt` must hold '{{}}' exactly once, got {self.prompt!r}")
        if not self.subject.strip():
            raise RequestFormatError(f"{where}: `subject` is empty")
        if not self.target_new.strip():
            raise RequestFormatError(f"{where}: `target_new` is empty; give the new answer")
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            raise RequestFormatError(
                f"{where}: `target_new` equals `target_true` ({self.target_new!r}); an edit must change the answer"
            )

    @property
    def prompt_text(self) -> str:
        """The edit prompt with the subject written in."""
        return self.prompt.replace("{}", self.subject)
