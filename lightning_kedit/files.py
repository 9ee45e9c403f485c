"""Files and caches: atomic writes, short content digests (cache keys) and the cache folder.

Atomic file writes: a reader sees the old file or the new one, never a half-written one. Every file the
library writes (deltas, histories, statistics, cached prefixes and target values, traces, JSON
results, plots, converted models) goes through this module:

- :func:`atomic_path` yields a temporary path beside the target, unique to the calling process *and* thread;
  the content replaces the target (``os.replace``, atomic on POSIX and Windows) only once it is complete. An
  exception or an interrupt leaves the old file as it was and no temporary file behind. Two writers of the same
  target never share a temporary file: each completes, and the last one wins with a whole file.
- :func:`atomic_write_text`, :func:`atomic_write_json` and :func:`atomic_save_safetensors` are the usual writes
  on top of it; :func:`atomic_directory` does the same for a folder (a converted model).
- :func:`exclusive_build` serialises the builders of one expensive cache entry across processes (a file lock),
  so that the entry is built once and the others read it. It must not wrap work that waits on other processes
  (collective operations), or those processes would wait on each other.
- :func:`short_digest` is the truncated sha256 hex digest that names cache entries and identifies contents;
  :func:`cache_dir` is the cache root (``$KEDIT_CACHE`` or ``~/.cache/lightning_kedit``).

Example:
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("done")
    >>> target.read_text()
    'done'
    >>> atomic_write_json(target.with_suffix(".json"), {"a": 1}).read_text()
    '{\\n  "a": 1\\n}\\n'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_directory",
    "atomic_path",
    "atomic_save_safetensors",
    "atomic_write_json",
    "atomic_write_text",
    "cache_dir",
    "exclusive_build",
    "short_digest",
]


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once, at import (the only way to read it is to set it)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _temporary_name(target: Path) -> Path:
    # mkstemp creates the file with O_EXCL under a random name: unique per process and per thread, whatever the
    # pid (forked workers, threads of one server) and however many writers race on one target. It makes the file
    # private (0600); the finished file gets the mode an ordinary write would give it.
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_UMASK)
    return Path(name)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is removed.

    The temporary file exists (empty) when the block starts; writers may overwrite or truncate it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def atomic_write_json(
    path: str | os.PathLike[str], data: Any, *, indent: int | None = 2, default: Callable[[Any], Any] | None = None
) -> Path:
    """Write ``data`` as JSON (UTF-8, a final newline) to ``path`` atomically and return the path."""
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=default) + "\n")


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Save ``tensors`` (with string ``metadata``) as one safetensors file, atomically."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(metadata) if metadata is not None else None)
    return Path(path)


@contextmanager
def atomic_directory(path: str | os.PathLike[str], *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it becomes ``path``, on failure it is removed.

    When ``path`` already exists once the block ends (another process finished first), the existing folder is
    kept and the new one discarded, so a cache folder's readers never see it change. With ``replace=True`` (an
    export the user asked to overwrite) the old folder is moved aside, the new one takes its name, and only then
    is the old one deleted: ``path`` holds one whole folder or the other.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    old = tmp.with_name(f"{tmp.name}.old")
    try:
        yield tmp
        if replace and target.exists():
            target.rename(old)
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def exclusive_build(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock named after ``path`` (``.<name>.lock`` beside it) for the block.

    Builders of one cache entry take turns: the first builds it, the next find it built. Where the platform has
    no ``fcntl`` (Windows) the block runs unlocked, and the atomic writes alone keep every entry whole.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(target.with_name(f".{target.name}.lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def short_digest(data: str | bytes, chars: int) -> str:
    """The first ``chars`` hex characters of the sha256 of ``data`` (a string is hashed as its UTF-8 bytes).

    Example:
        >>> short_digest("abc", 16)
        'ba7816bf8f01cfea'
    """
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:chars]


def cache_dir() -> Path:
    """The cache root: ``$KEDIT_CACHE`` or ``~/.cache/lightning_kedit``."""
    return Path(os.environ.get("KEDIT_CACHE", Path.home() / ".cache" / "lightning_kedit")).expanduser()
