"""Cache keys and content digests are pinned: existing caches and fixtures are found by them.

The expected values were computed with the code before the digests were folded into ``files.short_digest``.
"""

from __future__ import annotations

import hashlib

from lightning_kedit.editing.target_cache import request_digest
from lightning_kedit.files import short_digest
from lightning_kedit.lightning.applied_edits import requests_source
from lightning_kedit.models.fingerprint import fingerprint_digest, vocab_hash
from lightning_kedit.requests import bundled_requests


class _Tokenizer:
    all_special_tokens = ("<eos>", "é")

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "<eos>": 1, "ü": 2}


def test_short_digest_is_truncated_sha256() -> None:
    for data, chars in (("abc", 12), ("é ü", 16), (b"\x00\xff", 24)):
        raw = data.encode() if isinstance(data, str) else data
        assert short_digest(data, chars) == hashlib.sha256(raw).hexdigest()[:chars]


def test_cache_keys_unchanged() -> None:
    requests = bundled_requests()
    assert [request_digest(r) for r in requests[:5]] == [
        "d39ad780273fe47dd7759883", "a9860873b15f9285a583bb80", "8bd7a8140e5402f77848d8dc",
        "c6c4c66066c9c8ed8283df6b", "021a86f62df82cd7486d6528",
    ]
    assert vocab_hash(_Tokenizer()) == "b49c3dd6dc17799e"
    assert fingerprint_digest({"a": "1", "b": "ü"}, "x", "y") == "06047457de426b11"
    assert requests_source(requests, 3)[1] == "ids:2832802f26449931"
