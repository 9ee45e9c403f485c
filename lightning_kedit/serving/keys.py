"""The server's two API keys: one to read (generate, list edits), one to write (edit, revert; it also reads).

Keys come from ``KEDIT_READ_KEY`` and ``KEDIT_WRITE_KEY`` or from a file of ``NAME=value`` lines with the same
names (the file wins). The write key is required; without a read key, reading is open. Keys travel as
``Authorization: Bearer KEY``: a request without one gets 401, a wrong key (or the read key where writing is
asked) 403. Keys are compared in constant time and never printed: their ``repr`` hides them.

Example:
    >>> keys = ServeKeys(read="r-secret", write="w-secret")
    >>> keys
    ServeKeys(read=set, write=set)
    >>> keys.allows("Bearer w-secret", write=True), keys.allows("Bearer r-secret", write=True)
    (True, False)
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lightning_kedit.errors import KeditError

__all__ = ["READ_KEY_VARIABLE", "WRITE_KEY_VARIABLE", "ServeKeys"]

READ_KEY_VARIABLE = "KEDIT_READ_KEY"
WRITE_KEY_VARIABLE = "KEDIT_WRITE_KEY"


@dataclass(frozen=True, repr=False)
class ServeKeys:
    """The read key (None: reading is open) and the write key.

    Raises:
        KeditError: no write key, an empty key, or the same key for reading and writing.
    """

    read: str | None
    write: str

    def __post_init__(self) -> None:
        if not self.write:
            raise KeditError(f"no write key: set {WRITE_KEY_VARIABLE} (or give --keys FILE with a "
                             f"{WRITE_KEY_VARIABLE}=... line); edits need it")
        if self.read is not None and not self.read:
            raise KeditError(f"{READ_KEY_VARIABLE} is empty; set a key or unset it to leave reading open")
        if self.read is not None and hmac.compare_digest(self.read, self.write):
            raise KeditError(f"{READ_KEY_VARIABLE} and {WRITE_KEY_VARIABLE} are the same key; give two keys, or "
                             "readers could edit")

    def __repr__(self) -> str:
        return f"ServeKeys(read={'set' if self.read else 'open'}, write=set)"

    @classmethod
    def load(cls, file: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> ServeKeys:
        """The keys from ``file`` (``NAME=value`` lines) when given, else from the environment.

        Raises:
            KeditError: the file is missing or holds other lines, or the keys are unusable (see the class).
        """
        values = dict(os.environ if environ is None else environ)
        if file is not None:
            values = _read_key_file(Path(file))
        return cls(read=values.get(READ_KEY_VARIABLE), write=values.get(WRITE_KEY_VARIABLE) or "")

    @staticmethod
    def token(authorization: str | None) -> str | None:
        """The key of an ``Authorization: Bearer KEY`` header (None when absent or of another scheme)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def allows(self, authorization: str | None, *, write: bool) -> bool:
        """Whether the header's key may read (``write=False``) or write."""
        token = self.token(authorization)
        if token is None:
            return not write and self.read is None
        if hmac.compare_digest(token, self.write):
            return True
        return not write and (self.read is None or hmac.compare_digest(token, self.read))

    def status(self, authorization: str | None, *, write: bool) -> int | None:
        """None when allowed, else the HTTP status to answer: 401 without a key, 403 with a wrong one."""
        if self.allows(authorization, write=write):
            return None
        return 401 if self.token(authorization) is None else 403


def _read_key_file(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise KeditError(f"--keys {path}: no such file; write {READ_KEY_VARIABLE}=... and {WRITE_KEY_VARIABLE}=... "
                         "lines into it")
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        if not sep or name not in (READ_KEY_VARIABLE, WRITE_KEY_VARIABLE):
            raise KeditError(f"--keys {path}: line {number} is not {READ_KEY_VARIABLE}=... or "
                             f"{WRITE_KEY_VARIABLE}=...; fix or remove it")
        values[name] = value.strip().strip("'\"")
    return values
