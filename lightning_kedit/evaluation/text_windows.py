"""Text files to batches of token windows, for key statistics and perplexity.

Paragraphs are read lazily (a file is never tokenized further than needed), WikiText headings
(``= = Title = =``) and blank lines are dropped, WikiText's tokenised punctuation (``@-@``, `` , ``) is
undone, and the token stream is packed into windows of a fixed length so that no compute is spent on
padding: only the very last window of a source can be short. A tokenizer that starts sequences with a BOS
token gets one at the start of every window.

Example:
    >>> from pathlib import Path
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.txt").write_text(" = Title = \\n\\n Lobsters are blue @-@ black . \\n")
    >>> list(read_paragraphs(folder / "a.txt"))
    ['Lobsters are blue-black.']
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_kedit.errors import KeditError
from lightning_kedit.token_batches import padded_batch

__all__ = ["TextSourceError", "detokenize_wikitext", "read_paragraphs", "text_windows", "window_batches"]

_HEADING = re.compile(r"^\s*(=+)\s.*\s\1\s*$")
# WikiText's tokenised text: "@-@", "@,@", "@.@" join numbers and words; punctuation is space-separated.
_WIKITEXT_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r" @(.)@ "), r"\1"),
    (re.compile(r" ([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r"n 't\b"), "n't"),
    (re.compile(r" ('s|'re|'ve|'m|'ll|'d)\b"), r"\1"),
    (re.compile(r"\s+"), " "),
)


class TextSourceError(KeditError):
    """A text file that cannot be used: missing, unreadable, not UTF-8, or without any text."""


def detokenize_wikitext(line: str) -> str:
    """Undo WikiText's tokenisation of punctuation (a no-op on ordinary text).

    Example:
        >>> detokenize_wikitext("a 2 @,@ 000 m ( 6 @.@ 5 ft ) tower , isn 't it")
        "a 2,000 m (6.5 ft) tower, isn't it"
    """
    for pattern, replacement in _WIKITEXT_RULES:
        line = pattern.sub(replacement, line)
    return line.strip()


def read_paragraphs(path: str | os.PathLike[str]) -> Iterator[str]:
    """The paragraphs of a UTF-8 text file, one per non-blank, non-heading line, detokenized.

    Raises:
        TextSourceError: the file is missing, a folder, unreadable or not UTF-8.
    """
    file = Path(path)
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise TextSourceError(f"text file {str(file)!r} {what}; give a UTF-8 text file")
    try:
        with file.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip() or _HEADING.match(line):
                    continue
                text = detokenize_wikitext(line)
                if text:
                    yield text
    except UnicodeDecodeError as err:
        raise TextSourceError(
            f"text file {str(file)!r} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to UTF-8"
        ) from err
    except OSError as err:
        raise TextSourceError(
            f"text file {str(file)!r} cannot be read ({err.strerror}); check its permissions"
        ) from err


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer prepends one to every sequence, else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return int(bos) if ids and ids[0] == bos else None


def text_windows(
    tokenizer: Any,
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    window: int,
    *,
    max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Token windows of ``window`` tokens (the last one may be shorter) packed from the files' paragraphs.

    Args:
        tokenizer: a Hugging Face tokenizer; its BOS token (if it adds one) starts every window.
        paths: one or several text files, read in order.
        window: tokens per window, BOS included.
        max_tokens: stop once this many tokens have been produced (the last window is cut to fit).

    Raises:
        TextSourceError: a file is unreadable, or all files together hold no text.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise KeditError(f"`window` must be an int >= 2, got {window!r}")
    files = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not files:
        raise TextSourceError("no text files given; pass at least one UTF-8 text file")
    bos = _bos_id(tokenizer)
    body = window - (bos is not None)
    budget = float("inf") if max_tokens is None else max_tokens
    produced = 0
    pending: list[int] = []

    def emit(tokens: list[int]) -> list[int]:
        return ([bos] if bos is not None else []) + tokens

    for file in files:
        for paragraph in read_paragraphs(file):
            pending.extend(tokenizer(paragraph + "\n", add_special_tokens=False).input_ids)
            while len(pending) >= body:
                out = emit(pending[:body])[: int(min(window, budget - produced))]
                del pending[:body]
                produced += len(out)
                yield out
                if produced >= budget:
                    return
    if pending:
        out = emit(pending)[: int(min(window, budget - produced))]
        produced += len(out)
        yield out
    if produced == 0:
        names = ", ".join(repr(str(f)) for f in files)
        raise TextSourceError(f"text file(s) {names} hold no text (only blank lines or headings)")


def window_batches(windows: Iterable[list[int]], batch_size: int, pad_id: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Group windows into right-padded ``(input_ids, attention_mask)`` batches of up to ``batch_size`` rows.

    Example:
        >>> ids, mask = next(window_batches([[5, 6, 7], [8]], batch_size=2, pad_id=0))
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise KeditError(f"`batch_size` must be a positive int, got {batch_size!r}")
    rows: list[list[int]] = []

    for row in windows:
        rows.append(row)
        if len(rows) == batch_size:
            yield padded_batch(rows, pad_id)
            rows = []
    if rows:
        yield padded_batch(rows, pad_id)
