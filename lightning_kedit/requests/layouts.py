"""The request file layouts `load_requests` recognises, and how each record becomes `EditRequest`s.

Every parser takes one record (a JSON object) and its `RecordLocation`, and returns its requests or raises a
`RequestFormatError` naming the file, the record, the field and the fix. `detect_layout` picks the layout
from a record's fields; `LAYOUTS` maps each layout's name to its parser and its key fields.

Example:
    >>> from pathlib import Path
    >>> record = {"prompt": "BBC One, by", "subject": "BBC One", "target_new": "Sega", "ground_truth": "BBC"}
    >>> layout = detect_layout(record)
    >>> layout.name
    'knowedit-counterfact'
    >>> layout.parse(record, RecordLocation(Path("f.json"), 0, None, layout.name))[0].prompt
    '{}, by'
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lightning_kedit.errors import RequestFormatError
from lightning_kedit.requests.edit_request import EditRequest, PromptAnswer

__all__ = ["LAYOUTS", "Layout", "RecordLocation", "detect_layout", "unknown_layout_error"]

_MISSING: Any = object()

# Field access with errors that name the file, the record, the field and the fix.


@dataclass(frozen=True)
class RecordLocation:
    """Where a record sits, for error messages."""

    path: Path
    index: int
    line: int | None
    layout: str

    def error(self, name: str, problem: str, fix: str) -> RequestFormatError:
        line = f", line {self.line}" if self.line is not None else ""
        return RequestFormatError(
            f"{self.path}: record {self.index}{line} ({self.layout} layout), field `{name}` {problem}; {fix}"
        )


def _value(record: Mapping[str, Any], name: str, where: RecordLocation, default: Any = _MISSING) -> Any:
    """The value at a dotted field name (``requested_rewrite.target_new.str``)."""
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is not _MISSING:
                return default
            raise where.error(name, "is missing", f"add `{name}` to the record")
        value = value[part]
    return value


def _check_text(value: Any, name: str, where: RecordLocation) -> str:
    if not isinstance(value, str):
        raise where.error(name, f"must be a string, got {type(value).__name__} {value!r}", "write it as text")
    if not value.strip():
        raise where.error(
            name, "is empty", f"give a non-empty `{name}` or drop the record (skip_invalid=True drops such records)"
        )
    return value


def _text(record: Mapping[str, Any], name: str, where: RecordLocation) -> str:
    return _check_text(_value(record, name, where), name, where)


def _texts(record: Mapping[str, Any], name: str, where: RecordLocation) -> tuple[str, ...]:
    """A string or a list of strings; missing or null gives no strings."""
    value = _value(record, name, where, default=None)
    if value is None:
        return ()
    if isinstance(value, str):
        return (_check_text(value, name, where),)
    if not isinstance(value, list):
        raise where.error(name, f"must be a string or a list of strings, got {type(value).__name__}", "fix it")
    return tuple(_check_text(item, f"{name}[{i}]", where) for i, item in enumerate(value))


def _answers(value: Any, name: str, where: RecordLocation) -> tuple[str, ...]:
    """Answers as given by KnowEdit and MQuAKE: a string, a list of strings or a list of alias lists."""
    if isinstance(value, str):
        return (_check_text(value, name, where).strip(),)
    if isinstance(value, list) and value:
        return tuple(answer for i, item in enumerate(value) for answer in _answers(item, f"{name}[{i}]", where))
    raise where.error(name, f"must be an answer or a non-empty list of answers, got {value!r}", "give the answer")


def _case_id(record: Mapping[str, Any], where: RecordLocation) -> str:
    value = record.get("case_id", where.index)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
        raise where.error("case_id", f"must be a number or a non-empty string, got {value!r}", "fix the id")
    return str(value).strip()


def _template(prompt: str, subject: str, name: str, where: RecordLocation) -> tuple[str, str]:
    """The prompt with ``{}`` for the subject, and the subject as the prompt spells it."""
    if "{}" in prompt:
        if prompt.count("{}") != 1:
            raise where.error(name, f"holds '{{}}' {prompt.count('{}')} times", "write '{}' once, for the subject")
        return prompt, subject
    # Exact match first; otherwise a case-insensitive match, keeping the prompt's spelling of the subject.
    match = re.search(re.escape(subject), prompt) or re.search(re.escape(subject), prompt, re.IGNORECASE)
    if match is None:
        raise where.error(
            name,
            f"does not contain the subject {subject!r} (prompt {prompt!r})",
            "write the subject into the prompt as `subject` spells it, or put '{}' where it goes",
        )
    return prompt[: match.start()] + "{}" + prompt[match.end() :], match.group(0)


def _edit(
    where: RecordLocation,
    case_id: str,
    prompt: tuple[str, str],
    subject: tuple[str, str],
    target_new: tuple[str, str],
    target_true: tuple[str | None, str],
    **extra: Any,
) -> EditRequest:
    """Checks the edit itself and builds the request; each argument pair is ``(value, field name)``."""
    template, spelled = _template(prompt[0], subject[0].strip(), prompt[1], where)
    new, true = target_new[0].strip(), target_true[0]
    if true is not None and true.strip() == new:
        raise where.error(
            target_new[1],
            f"equals the true target `{target_true[1]}` ({new!r})",
            "an edit must change the answer: give another new target or drop the record",
        )
    return EditRequest(case_id, template, spelled, new, None if true is None else true.strip(), **extra)


def _pairs(value: Any, name: str, where: RecordLocation, prompt_key: str, answer_key: str) -> tuple[PromptAnswer, ...]:
    """A list of ``{prompt, answer}`` objects (one object alone is accepted)."""
    items = [value] if isinstance(value, Mapping) else value
    if not isinstance(items, list):
        raise where.error(name, f"must be a list of {{{prompt_key}, {answer_key}}} objects", "fix its shape")
    pairs = []
    for i, item in enumerate(items):
        at = f"{name}[{i}]"
        if not isinstance(item, Mapping):
            raise where.error(at, f"must be a {{{prompt_key}, {answer_key}}} object, got {item!r}", "fix it")
        for key in (prompt_key, answer_key):
            if key not in item:
                raise where.error(f"{at}.{key}", "is missing", f"add `{key}` to each entry of `{name}`")
        answers = _answers(item[answer_key], f"{at}.{answer_key}", where)
        if "aliases" in item:
            answers += _texts(item, "aliases", where)
        pairs.append(PromptAnswer(_check_text(item[prompt_key], f"{at}.{prompt_key}", where), *_split(answers)))
    return tuple(pairs)


def _split(answers: tuple[str, ...]) -> tuple[str, tuple[str, ...]]:
    """The first answer and its distinct aliases."""
    return answers[0], tuple(dict.fromkeys(a for a in answers[1:] if a != answers[0]))


# ---------------------------------------------------------------------------------------------------------
# Layouts: each parser turns one record into requests.


def _parse_kedit(record: Mapping[str, Any], where: RecordLocation) -> list[EditRequest]:
    unknown = [str(key) for key in record if key not in _KEDIT_FIELDS]
    if unknown:
        raise where.error(
            unknown[0], "is not a field of the kedit schema", f"use only {', '.join(sorted(_KEDIT_FIELDS))}"
        )
    target_true = _value(record, "target_true", where, default=None)
    chain_id = record.get("chain_id")
    return [
        _edit(
            where,
            _case_id(record, where),
            (_text(record, "prompt", where), "prompt"),
            (_text(record, "subject", where), "subject"),
            (_text(record, "target_new", where), "target_new"),
            (None if target_true is None else _check_text(target_true, "target_true", where), "target_true"),
            paraphrase_prompts=_texts(record, "paraphrase_prompts", where),
            neighborhood=_pairs(record.get("neighborhood") or [], "neighborhood", where, "prompt", "answer"),
            consistency=_pairs(record.get("consistency") or [], "consistency", where, "prompt", "answer"),
            generation_prompts=_texts(record, "generation_prompts", where),
            chain_id=None if chain_id is None else str(chain_id),
            attribute_prompts=_texts(record, "attribute_prompts", where),
        )
    ]


def _parse_rome(record: Mapping[str, Any], where: RecordLocation) -> list[EditRequest]:
    rewrite = "requested_rewrite"
    if not isinstance(record[rewrite], Mapping):
        raise where.error(rewrite, "must be an object {prompt, subject, target_new, target_true}", "fix its shape")
    target_true = _text(record, f"{rewrite}.target_true.str", where)
    return [
        _edit(
            where,
            _case_id(record, where),
            (_text(record, f"{rewrite}.prompt", where), f"{rewrite}.prompt"),
            (_text(record, f"{rewrite}.subject", where), f"{rewrite}.subject"),
            (_text(record, f"{rewrite}.target_new.str", where), f"{rewrite}.target_new.str"),
            (target_true, f"{rewrite}.target_true.str"),
            paraphrase_prompts=_texts(record, "paraphrase_prompts", where),
            # ROME's neighbour prompts are about other subjects that share the TRUE answer.
            neighborhood=tuple(
                PromptAnswer(p, target_true.strip()) for p in _texts(record, "neighborhood_prompts", where)
            ),
            generation_prompts=_texts(record, "generation_prompts", where),
            attribute_prompts=_texts(record, "attribute_prompts", where),
        )
    ]


def _parse_knowedit_counterfact(record: Mapping[str, Any], where: RecordLocation) -> list[EditRequest]:
    prompts = _texts(record, "locality_prompt", where)
    answers = _texts(record, "locality_ground_truth", where)
    if len(prompts) != len(answers):
        raise where.error(
            "locality_ground_truth",
            f"gives {len(answers)} answers for {len(prompts)} `locality_prompt`s",
            "give one answer per locality prompt",
        )
    return [
        _edit(
            where,
            _case_id(record, where),
            (_text(record, "prompt", where), "prompt"),
            (_text(record, "subject", where), "subject"),
            (_text(record, "target_new", where), "target_new"),
            (_answers(_value(record, "ground_truth", where), "ground_truth", where)[0], "ground_truth"),
            paraphrase_prompts=_texts(record, "rephrase_prompt", where),
            neighborhood=tuple(PromptAnswer(p, a.strip()) for p, a in zip(prompts, answers, strict=True)),
        )
    ]


def _first_other(answers: Sequence[str], target_new: str) -> str | None:
    """zsRE gold answers are not counterfactual: the first that differs from the new target, if any."""
    return next((a for a in answers if a != target_new.strip()), None)


def _grouped_pairs(record: Mapping[str, Any], name: str, where: RecordLocation) -> tuple[PromptAnswer, ...]:
    """KnowEdit's ``{kind: [{prompt, ground_truth}]}`` groups, flattened in order."""
    groups = _value(record, name, where, default=None) or {}
    if not isinstance(groups, Mapping):
        raise where.error(name, "must be an object {kind: [{prompt, ground_truth}]}", "fix its shape")
    return tuple(
        pair
        for kind, items in groups.items()
        for pair in _pairs(items, f"{name}.{kind}", where, "prompt", "ground_truth")
    )


def _parse_knowedit_zsre(record: Mapping[str, Any], where: RecordLocation) -> list[EditRequest]:
    target_new = _text(record, "target_new", where)
    gold = _answers(_value(record, "ground_truth", where), "ground_truth", where)
    return [
        _edit(
            where,
            _case_id(record, where),
            (_text(record, "prompt", where), "prompt"),
            (_text(record, "subject", where), "subject"),
            (target_new, "target_new"),
            (_first_other(gold, target_new), "ground_truth"),
            paraphrase_prompts=_texts(record, "rephrase_prompt", where) + _texts(record, "rephrase", where),
            neighborhood=_grouped_pairs(record, "locality", where),
            consistency=_grouped_pairs(record, "portability", where),
        )
    ]


def _question(text: str) -> str:
    """MEND's ``nq question: who wrote x`` as a plain question ending in ``?``."""
    text = text.strip().removeprefix("nq question:").strip()
    return text if text.endswith("?") else f"{text}?"


def _parse_mend_zsre(record: Mapping[str, Any], where: RecordLocation) -> list[EditRequest]:
    target_new = _text(record, "alt", where)
    gold = _answers(_value(record, "answers", where), "answers", where)
    neighborhood: tuple[PromptAnswer, ...] = ()
    if "loc" in record:
        answer = _answers(_value(record, "loc_ans", where), "loc_ans", where)
        neighborhood = (PromptAnswer(_question(_text(record, "loc", where)), *_split(answer)),)
    return [
        _edit(
            where,
            _case_id(record, where),
            (_text(record, "src", where), "src"),
            (_text(record, "subject", where), "subject"),
            (target_new, "alt"),
            (_first_other(gold, target_new), "answers"),
            paraphrase_prompts=_texts(record, "rephrase", where),
            neighborhood=neighborhood,
        )
    ]


def _parse_mquake(record: Mapping[str, Any], where: RecordLocation) -> list[EditRequest]:
    chain_id = _case_id(record, where)
    rewrites = record["requested_rewrite"]
    if not rewrites:
        raise where.error("requested_rewrite", "is an empty chain", "give at least one rewrite")
    answers = _answers(_value(record, "new_answer", where), "new_answer", where)
    answers += _texts(record, "new_answer_alias", where)
    # One multi-hop check per chain: it holds once every rewrite is in, so it rides on the last request.
    _value(record, "questions", where)  # required: the chain's multi-hop check
    check = tuple(PromptAnswer(q, *_split(answers)) for q in _texts(record, "questions", where))
    requests = []
    for k, rewrite in enumerate(rewrites):
        at = f"requested_rewrite[{k}]"
        if not isinstance(rewrite, Mapping):
            raise where.error(at, "must be an object {prompt, subject, target_new, target_true}", "fix it")
        requests.append(
            _edit(
                where,
                f"{chain_id}.{k}",
                (_text(rewrite, "prompt", where), f"{at}.prompt"),
                (_text(rewrite, "subject", where), f"{at}.subject"),
                (_text(rewrite, "target_new.str", where), f"{at}.target_new.str"),
                (_text(rewrite, "target_true.str", where), f"{at}.target_true.str"),
                paraphrase_prompts=_texts(rewrite, "question", where),
                consistency=check if k == len(rewrites) - 1 else (),
                chain_id=chain_id,
            )
        )
    return requests


@dataclass(frozen=True)
class Layout:
    """A request file layout: its name, its key fields (for messages) and its record parser."""

    name: str
    key_fields: str
    parse: Callable[[Mapping[str, Any], RecordLocation], list[EditRequest]]


LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout("kedit", "case_id, prompt ('{}' for the subject), subject, target_new, target_true", _parse_kedit),
        Layout(
            "rome-counterfact",
            "requested_rewrite{prompt, subject, target_new{str}, target_true{str}}, neighborhood_prompts",
            _parse_rome,
        ),
        Layout(
            "knowedit-counterfact",
            "prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth",
            _parse_knowedit_counterfact,
        ),
        Layout(
            "knowedit-zsre",
            "prompt, subject, target_new, ground_truth (a list), locality{kind: [...]}, portability{kind: [...]}",
            _parse_knowedit_zsre,
        ),
        Layout("mend-zsre", "src, subject, alt, answers, rephrase, loc, loc_ans", _parse_mend_zsre),
        Layout("mquake", "requested_rewrite (a list), questions, new_answer", _parse_mquake),
    )
}


_KNOWEDIT_FIELDS = {  # fields only KnowEdit layouts have
    "ground_truth",
    "rephrase_prompt",
    "locality_prompt",
    "locality_ground_truth",
    "locality",
    "portability",
}
_KEDIT_FIELDS = frozenset(f.name for f in fields(EditRequest))


def detect_layout(record: Mapping[str, Any]) -> Layout | None:
    """The layout a record's fields identify, or None."""
    keys = record.keys()
    if "requested_rewrite" in keys:
        return LAYOUTS["mquake" if isinstance(record["requested_rewrite"], list) else "rome-counterfact"]
    if "src" in keys:
        return LAYOUTS["mend-zsre"]
    if "prompt" in keys:
        if not keys & _KNOWEDIT_FIELDS:
            return LAYOUTS["kedit"]
        nested = "locality" in keys or "portability" in keys or isinstance(record.get("ground_truth"), list)
        flat = "locality_prompt" in keys
        return LAYOUTS["knowedit-zsre" if nested and not flat else "knowedit-counterfact"]
    return None


def unknown_layout_error(path: Path, record: Mapping[str, Any]) -> RequestFormatError:
    """The error for a first record whose fields match no layout: it lists the layouts and key fields."""
    known = "; ".join(f"{layout.name}: {layout.key_fields}" for layout in LAYOUTS.values())
    return RequestFormatError(
        f"{path}: record 0 has an unknown layout (fields: {', '.join(map(str, record)) or 'none'}); "
        f"the recognised layouts and their key fields are {known}. Convert the file to one of them "
        "(see docs/requests.md)"
    )
