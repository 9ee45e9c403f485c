"""Edit requests: what fact to write, and the prompts that judge the edit.

`load_requests` reads a JSON file (a list of records, or one record) or a JSON Lines file (one record per
line) and recognises its layout from the first record's fields:

========================  ====================================================================================
layout                    key fields
========================  ====================================================================================
``kedit``                 ``case_id, prompt, subject, target_new[, target_true, paraphrase_prompts,
                          neighborhood, consistency, generation_prompts, chain_id, attribute_prompts]``
``rome-counterfact``      ``requested_rewrite{prompt, subject, target_new{str}, target_true{str}}``,
                          ``paraphrase_prompts, neighborhood_prompts, attribute_prompts, generation_prompts``
``knowedit-counterfact``  ``prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
                          locality_ground_truth``
``knowedit-zsre``         ``prompt, subject, target_new, ground_truth (a list), rephrase_prompt,
                          locality{kind: [{prompt, ground_truth}]}, portability{kind: [{prompt, ground_truth}]}``
``mend-zsre``             ``src, subject, alt, answers, rephrase, loc, loc_ans``
``mquake``                ``requested_rewrite`` (a list: a chain), ``questions, new_answer, new_answer_alias``
========================  ====================================================================================

The ``kedit`` layout is this project's own schema, written by `save_requests`: one object per request whose
keys are the `EditRequest` fields; ``neighborhood`` and ``consistency`` are lists of ``{"prompt", "answer"}``
objects (optionally with ``"aliases"``), ``target_true`` may be ``null`` and every list may be left out.
``prompt`` holds ``{}`` once where the subject goes; a prompt with the subject written out is accepted too.

Conversion rules (see ``docs/requests.md``): a prompt with the subject written out gets ``{}`` in place of
the subject's first occurrence; when the subject occurs only with other capitalisation, the prompt's
spelling becomes the subject. zsRE answers are not counterfactual, so ``target_true`` is the first gold
answer that differs from the new target (``None`` when there is none). Neighbour prompts keep the answer
that must not change; portability questions and MQuAKE multi-hop questions become consistency prompts (the
answer expected after the edit). Case ids become strings; records without one are numbered from 0.

Example:
    >>> request = EditRequest(case_id="0", prompt="{} plays the", subject="Toko Yasuda",
    ...                       target_new="piano", target_true="guitar")
    >>> request.prompt_text
    'Toko Yasuda plays the'
    >>> [r.case_id for r in bundled_requests()][:2]  # doctest: +SKIP
    ['1208', '1451']
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_kedit.errors import RequestFormatError

__all__ = [
    "EditRequest",
    "PromptAnswer",
    "bundled_corpus_path",
    "bundled_requests",
    "load_requests",
    "save_requests",
]

_DATA_DIR = Path(__file__).parent / "data"
_MISSING: Any = object()


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


# ---------------------------------------------------------------------------------------------------------
# Field access with errors that name the file, the record, the field and the fix.


@dataclass(frozen=True)
class _Where:
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


def _value(record: Mapping[str, Any], name: str, where: _Where, default: Any = _MISSING) -> Any:
    """The value at a dotted field name (``requested_rewrite.target_new.str``)."""
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            if default is not _MISSING:
                return default
            raise where.error(name, "is missing", f"add `{name}` to the record")
        value = value[part]
    return value


def _check_text(value: Any, name: str, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(name, f"must be a string, got {type(value).__name__} {value!r}", "write it as text")
    if not value.strip():
        raise where.error(name, "is empty", f"give a non-empty `{name}`")
    return value


def _text(record: Mapping[str, Any], name: str, where: _Where) -> str:
    return _check_text(_value(record, name, where), name, where)


def _texts(record: Mapping[str, Any], name: str, where: _Where) -> tuple[str, ...]:
    """A string or a list of strings; missing or null gives no strings."""
    value = _value(record, name, where, default=None)
    if value is None:
        return ()
    if isinstance(value, str):
        return (_check_text(value, name, where),)
    if not isinstance(value, list):
        raise where.error(name, f"must be a string or a list of strings, got {type(value).__name__}", "fix it")
    return tuple(_check_text(item, f"{name}[{i}]", where) for i, item in enumerate(value))


def _answers(value: Any, name: str, where: _Where) -> tuple[str, ...]:
    """Answers as given by KnowEdit and MQuAKE: a string, a list of strings or a list of alias lists."""
    if isinstance(value, str):
        return (_check_text(value, name, where).strip(),)
    if isinstance(value, list) and value:
        return tuple(answer for i, item in enumerate(value) for answer in _answers(item, f"{name}[{i}]", where))
    raise where.error(name, f"must be an answer or a non-empty list of answers, got {value!r}", "give the answer")


def _case_id(record: Mapping[str, Any], where: _Where) -> str:
    value = record.get("case_id", where.index)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).strip():
        raise where.error("case_id", f"must be a number or a non-empty string, got {value!r}", "fix the id")
    return str(value).strip()


def _template(prompt: str, subject: str, name: str, where: _Where) -> tuple[str, str]:
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
    where: _Where,
    case_id: str,
    prompt: tuple[str, str],
    subject: tuple[str, str],
    target_new: tuple[str, str],
    target_true: tuple[str | None, str],
    **fields: Any,
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
    return EditRequest(case_id, template, spelled, new, None if true is None else true.strip(), **fields)


def _pairs(value: Any, name: str, where: _Where, prompt_key: str, answer_key: str) -> tuple[PromptAnswer, ...]:
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


def _parse_kedit(record: Mapping[str, Any], where: _Where) -> list[EditRequest]:
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
            neighborhood=_pairs(record.get("neighborhood", []), "neighborhood", where, "prompt", "answer"),
            consistency=_pairs(record.get("consistency", []), "consistency", where, "prompt", "answer"),
            generation_prompts=_texts(record, "generation_prompts", where),
            chain_id=None if chain_id is None else str(chain_id),
            attribute_prompts=_texts(record, "attribute_prompts", where),
        )
    ]


def _parse_rome(record: Mapping[str, Any], where: _Where) -> list[EditRequest]:
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


def _parse_knowedit_counterfact(record: Mapping[str, Any], where: _Where) -> list[EditRequest]:
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


def _grouped_pairs(record: Mapping[str, Any], name: str, where: _Where) -> tuple[PromptAnswer, ...]:
    """KnowEdit's ``{kind: [{prompt, ground_truth}]}`` groups, flattened in order."""
    groups = _value(record, name, where, default=None) or {}
    if not isinstance(groups, Mapping):
        raise where.error(name, "must be an object {kind: [{prompt, ground_truth}]}", "fix its shape")
    return tuple(
        pair
        for kind, items in groups.items()
        for pair in _pairs(items, f"{name}.{kind}", where, "prompt", "ground_truth")
    )


def _parse_knowedit_zsre(record: Mapping[str, Any], where: _Where) -> list[EditRequest]:
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


def _parse_mend_zsre(record: Mapping[str, Any], where: _Where) -> list[EditRequest]:
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


def _parse_mquake(record: Mapping[str, Any], where: _Where) -> list[EditRequest]:
    chain_id = _case_id(record, where)
    rewrites = record["requested_rewrite"]
    if not rewrites:
        raise where.error("requested_rewrite", "is an empty chain", "give at least one rewrite")
    answers = _answers(_value(record, "new_answer", where), "new_answer", where)
    answers += _texts(record, "new_answer_alias", where)
    # One multi-hop check per chain: it holds once every rewrite is in, so it rides on the last request.
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
class _Layout:
    name: str
    key_fields: str
    parse: Callable[[Mapping[str, Any], _Where], list[EditRequest]]


_LAYOUTS = {
    layout.name: layout
    for layout in (
        _Layout("kedit", "case_id, prompt ('{}' for the subject), subject, target_new, target_true", _parse_kedit),
        _Layout(
            "rome-counterfact",
            "requested_rewrite{prompt, subject, target_new{str}, target_true{str}}, neighborhood_prompts",
            _parse_rome,
        ),
        _Layout(
            "knowedit-counterfact",
            "prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth",
            _parse_knowedit_counterfact,
        ),
        _Layout(
            "knowedit-zsre",
            "prompt, subject, target_new, ground_truth (a list), locality{kind: [...]}, portability{kind: [...]}",
            _parse_knowedit_zsre,
        ),
        _Layout("mend-zsre", "src, subject, alt, answers, rephrase, loc, loc_ans", _parse_mend_zsre),
        _Layout("mquake", "requested_rewrite (a list), questions, new_answer", _parse_mquake),
    )
}


def _detect(record: Mapping[str, Any]) -> _Layout | None:
    """The layout a record's fields identify, or None."""
    keys = record.keys()
    if "requested_rewrite" in keys:
        return _LAYOUTS["mquake" if isinstance(record["requested_rewrite"], list) else "rome-counterfact"]
    if {"src", "alt"} <= keys:
        return _LAYOUTS["mend-zsre"]
    if {"prompt", "target_new"} <= keys:
        if "ground_truth" not in keys:
            return _LAYOUTS["kedit"]
        nested = "locality" in keys or "portability" in keys or isinstance(record["ground_truth"], list)
        flat = "locality_prompt" in keys
        return _LAYOUTS["knowedit-zsre" if nested and not flat else "knowedit-counterfact"]
    return None


# ---------------------------------------------------------------------------------------------------------
# Files.


def _read_records(path: Path) -> tuple[list[Any], list[int] | None]:
    """The records of a JSON or JSON Lines file, with their line numbers for JSON Lines."""
    if not path.is_file():
        raise RequestFormatError(f"{path}: no such file; give the path of a JSON or JSONL request file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RequestFormatError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from err
    if not text.strip():
        raise RequestFormatError(f"{path}: the file is empty; write a JSON list of edit requests into it")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not text.lstrip().startswith("{"):
            raise RequestFormatError(
                f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the JSON there"
            ) from err
        return _read_lines(path, text)
    if isinstance(data, Mapping):
        return [data], None
    if not isinstance(data, list):
        raise RequestFormatError(
            f"{path}: holds a JSON {type(data).__name__}; write a list of request objects (or JSON Lines)"
        )
    return data, None


def _read_lines(path: Path, text: str) -> tuple[list[Any], list[int]]:
    records, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RequestFormatError(
                    f"{path}: malformed JSON Lines at line {number}, column {err.colno}: {err.msg}; "
                    "fix that line (one JSON object per line)"
                ) from err
            lines.append(number)
    return records, lines


def _unknown_layout(path: Path, record: Mapping[str, Any]) -> RequestFormatError:
    known = "; ".join(f"{layout.name}: {layout.key_fields}" for layout in _LAYOUTS.values())
    return RequestFormatError(
        f"{path}: record 0 has an unknown layout (fields: {', '.join(map(str, record)) or 'none'}); "
        f"the recognised layouts and their key fields are {known}. Convert the file to one of them "
        "(see docs/requests.md)"
    )


def load_requests(path: str | os.PathLike[str], n: int | None = None) -> list[EditRequest]:
    """Reads edit requests from a JSON or JSON Lines file in any recognised layout.

    The layout is recognised from the first record's fields (see the module documentation) and every record
    is read with it. The whole file is checked before anything is returned: a bad record raises and nothing
    is loaded.

    Args:
        path: a ``.json`` file holding a list of records (or one record), or a JSON Lines file.
        n: read only the first ``n`` records (an MQuAKE record, a chain, gives several requests); ``None``
            reads them all.

    Returns:
        The requests, in file order.

    Raises:
        RequestFormatError: the file is missing, empty or malformed, its layout is unknown, a record lacks a
            field or has an unusable one, a case id repeats, or ``n`` exceeds the number of records.

    Example:
        >>> requests = load_requests("counterfact-val.json", n=100)  # doctest: +SKIP
        >>> requests[0].prompt, requests[0].subject, requests[0].target_new  # doctest: +SKIP
        ('{}, by', 'BBC One', 'Sega')
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise RequestFormatError(f"n must be a positive number of records or None, got n={n!r}")
    path = Path(path)
    records, lines = _read_records(path)
    if not records:
        raise RequestFormatError(f"{path}: holds no records; write at least one edit request into it")
    if n is not None and n > len(records):
        raise RequestFormatError(
            f"{path}: asked for n={n} records but the file holds {len(records)}; "
            f"pass n <= {len(records)} or leave n out"
        )
    records = records[:n]
    first = records[0]
    layout = _detect(first) if isinstance(first, Mapping) else None
    if layout is None:
        raise _unknown_layout(path, first if isinstance(first, Mapping) else {})
    requests: list[EditRequest] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(records):
        where = _Where(path, index, None if lines is None else lines[index], layout.name)
        if not isinstance(record, Mapping):
            raise where.error("(record)", f"is a {type(record).__name__}, not an object", "write one object")
        for request in layout.parse(record, where):
            if request.case_id in seen:
                raise where.error(
                    "case_id",
                    f"repeats the id {request.case_id!r} of record {seen[request.case_id]}",
                    "give each request its own case id",
                )
            seen[request.case_id] = index
            requests.append(request)
    return requests


def _to_record(request: EditRequest) -> dict[str, Any]:
    """The ``kedit`` schema of one request; empty optional fields are left out."""

    def pairs(items: tuple[PromptAnswer, ...]) -> list[dict[str, Any]]:
        return [
            {"prompt": p.prompt, "answer": p.answer, **({"aliases": list(p.aliases)} if p.aliases else {})}
            for p in items
        ]

    record: dict[str, Any] = {
        "case_id": request.case_id,
        "prompt": request.prompt,
        "subject": request.subject,
        "target_new": request.target_new,
        "target_true": request.target_true,
        "paraphrase_prompts": list(request.paraphrase_prompts),
        "neighborhood": pairs(request.neighborhood),
        "consistency": pairs(request.consistency),
        "generation_prompts": list(request.generation_prompts),
        "chain_id": request.chain_id,
        "attribute_prompts": list(request.attribute_prompts),
    }
    required = ("case_id", "prompt", "subject", "target_new", "target_true")
    return {key: value for key, value in record.items() if key in required or value}


def save_requests(requests: Iterable[EditRequest], path: str | os.PathLike[str]) -> Path:
    """Writes requests in this project's ``kedit`` schema; `load_requests` reads them back unchanged.

    A path ending in ``.jsonl`` gets JSON Lines, anything else a JSON list. The file is replaced in one step,
    so a failure leaves any previous file as it was.

    Args:
        requests: the requests to write; their case ids must be distinct.
        path: the file to write.

    Returns:
        The path written.

    Example:
        >>> save_requests(bundled_requests()[:2], "two.jsonl")  # doctest: +SKIP
        PosixPath('two.jsonl')
    """
    items = list(requests)
    if not items:
        raise RequestFormatError(f"{path}: no requests to save; a request file needs at least one")
    seen: set[str] = set()
    for i, request in enumerate(items):
        if not isinstance(request, EditRequest):
            raise RequestFormatError(f"requests[{i}] is a {type(request).__name__}, not an EditRequest")
        if request.case_id in seen:
            raise RequestFormatError(f"requests[{i}] repeats case id {request.case_id!r}; give each its own id")
        seen.add(request.case_id)
    path = Path(path)
    records = [_to_record(request) for request in items]
    if path.suffix == ".jsonl":
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    else:
        text = json.dumps(records, ensure_ascii=False, indent=1) + "\n"
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


def bundled_requests() -> list[EditRequest]:
    """The 10 demo CounterFact facts shipped with the package (``data/demo_requests.json``).

    Example:
        >>> len(bundled_requests())
        10
    """
    return load_requests(_DATA_DIR / "demo_requests.json")


def bundled_corpus_path() -> Path:
    """The bundled excerpt of English Wikipedia (CC BY-SA, see ``data/README.md``) for statistics and perplexity.

    Example:
        >>> bundled_corpus_path().name
        'enwiki_excerpt.txt'
    """
    return _DATA_DIR / "enwiki_excerpt.txt"
