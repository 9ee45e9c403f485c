"""Request files: reading (:func:`load_requests`, any layout of :mod:`.layouts`), writing and the bundled data.

Example:
    >>> [r.case_id for r in bundled_requests()][:2]
    ['8798', '3212']
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_kedit.errors import RequestFormatError
from lightning_kedit.files import atomic_write_text
from lightning_kedit.requests.edit_request import EditRequest, PromptAnswer

__all__ = [
    "bundled_corpus_path",
    "bundled_requests",
    "load_requests",
    "parse_request_records",
    "save_requests",
]

_DATA_DIR = Path(__file__).parents[1] / "data"


# ---------------------------------------------------------------------------------------------------------
# Files.


def _read_records(path: Path) -> tuple[list[Any], list[int] | None]:
    """The records of a JSON or JSON Lines file, with their line numbers for JSON Lines."""
    if not path.is_file():
        raise RequestFormatError(f"{path}: no such file; give the path of a JSON or JSONL request file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise RequestFormatError(f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8") from err
    if not text.strip():
        raise RequestFormatError(f"{path}: the file is empty; write a JSON list of edit requests into it")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if not _looks_like_lines(text):
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


def _looks_like_lines(text: str) -> bool:
    """Whether text that is not one JSON value is JSON Lines: its first line is a whole JSON object."""
    first = text.lstrip().split("\n", 1)[0]
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


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


def load_requests(
    path: str | os.PathLike[str], n: int | None = None, *, skip_invalid: bool = False
) -> list[EditRequest]:
    """Reads edit requests from a JSON or JSON Lines file in any recognised layout.

    The layout is recognised from the first record's fields (see the module documentation) and every record
    is read with it. The whole file is checked before anything is returned: a bad record raises and nothing
    is loaded, unless ``skip_invalid`` asks to drop such records with a warning.

    Args:
        path: a ``.json`` file holding a list of records (or one record), or a JSON Lines file.
        n: read only the first ``n`` records (an MQuAKE record, a chain, gives several requests); ``None``
            reads them all.
        skip_invalid: drop records with an unusable field (an empty target, a subject missing from its
            prompt, ...) and warn, naming each, instead of raising. File-level faults still raise.

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
    return parse_request_records(records[:n], path, lines, skip_invalid=skip_invalid)


def parse_request_records(
    records: list[Any], source: str | os.PathLike[str], lines: list[int] | None = None, *,
    skip_invalid: bool = False,
) -> list[EditRequest]:
    """Edit requests from records already read (a file's, or a request body's), in any recognised layout.

    The layout is recognised from the first record; every record is checked before anything is returned.

    Args:
        records: the records (JSON objects).
        source: what to name in error messages (a file path, ``"request body"``).
        lines: the JSON Lines line number of each record, for error messages.
        skip_invalid: drop unusable records with a warning instead of raising (see :func:`load_requests`).

    Raises:
        RequestFormatError: no records, an unknown layout, a record lacking a field or with an unusable one
            (a subject missing from its prompt, ...), or a repeated case id.

    Example:
        >>> record = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano", "case_id": 1}
        >>> [r.prompt_text for r in parse_request_records([record], "request body")]
        ['Toko Yasuda plays the']
    """
    from lightning_kedit.requests.layouts import RecordLocation, detect_layout, unknown_layout_error

    path = Path(source)
    if not records:
        raise RequestFormatError(f"{path}: holds no records; write at least one edit request into it")
    layout = detect_layout(records[0]) if isinstance(records[0], Mapping) else None
    if layout is None:
        raise unknown_layout_error(path, records[0] if isinstance(records[0], Mapping) else {})
    requests: list[EditRequest] = []
    seen: dict[str, int] = {}
    skipped: list[str] = []
    for index, record in enumerate(records):
        where = RecordLocation(path, index, None if lines is None else lines[index], layout.name)
        if not isinstance(record, Mapping):
            raise where.error("(record)", f"is a {type(record).__name__}, not an object", "write an object")
        try:
            parsed = layout.parse(record, where)
        except RequestFormatError as err:
            if not skip_invalid:
                raise
            skipped.append(str(err))
            continue
        for request in parsed:
            if request.case_id in seen:
                raise where.error(
                    "case_id",
                    f"repeats the id {request.case_id!r} of record {seen[request.case_id]}",
                    "give each request its own case id",
                )
            seen[request.case_id] = index
            requests.append(request)
    if skipped:
        if not requests:
            raise RequestFormatError(f"{path}: every record is invalid; the first: {skipped[0]}")
        warnings.warn(f"skipped {len(skipped)} invalid record(s) of {path}: " + " | ".join(skipped), stacklevel=3)
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
    return atomic_write_text(path, text)


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
