"""``kedit serve`` with SmolLM2 and real CounterFact facts: live edits, exact reverts, restart, kill -9.

Run under the heavy lock:
``flock /tmp/kedit-heavy.lock .venv/bin/pytest -m integration tests/test_serving_integration.py``.
The tests share one history folder and run in order (a restart needs the history the first test committed).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import shared_data
from serve_helpers import READ_KEY, WRITE_KEY, Clients, Server, call, complete, wait_computing

pytestmark = pytest.mark.integration

NEIGHBOURS = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is"]
MAX_TOKENS = 5
STATE: dict[str, Any] = {}


@pytest.fixture(scope="module")
def facts() -> list[dict[str, Any]]:
    records = json.loads(shared_data("counterfact", "counterfact-val.json").read_text())
    return records[:8]


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smollm2-serve") / "history"


def _prompt(record: dict[str, Any]) -> str:
    return record["prompt"].replace("{}", record["subject"]) if "{}" in record["prompt"] else record["prompt"]


def _outputs(port: int, prompts: list[str]) -> tuple[dict[str, list[int]], dict[str, str], int]:
    tokens, texts, versions = {}, {}, set()
    for prompt in prompts:
        text, ids, version = complete(port, prompt, MAX_TOKENS)
        tokens[prompt], texts[prompt] = ids, text
        versions.add(version)
    assert len(versions) == 1, versions
    return tokens, texts, versions.pop()


def test_live_edit_answers_new_objects_reverts_exactly_and_refuses_bad_input(facts, history):
    written = facts[:3]
    prompts = [_prompt(r) for r in written] + NEIGHBOURS
    with Server("smollm2", history, workers=2, stop_after=3000) as server:
        port = server.port
        before, before_text, v0 = _outputs(port, prompts)
        assert v0 == 0
        assert not any(before_text[_prompt(r)].strip().startswith(r["target_new"]) for r in written)
        with Clients(port, prompts, threads=2, seconds=1500, max_tokens=MAX_TOKENS) as clients:
            status, edit = call(port, "POST", "/v1/edits", {"requests": written}, key=WRITE_KEY)
            committed = time.monotonic()
            assert status == 200, edit
            # Bad input while generation runs: each gets its 4xx.
            assert call(port, "POST", "/v1/edits", raw=b'{"requests": [', key=WRITE_KEY)[0] == 422
            absent = {**written[0], "prompt": "Somebody is in"}
            status, body = call(port, "POST", "/v1/edits", {"requests": [absent]}, key=WRITE_KEY)
            assert status == 422 and "does not contain the subject" in json.dumps(body)
            assert call(port, "DELETE", "/v1/edits/e404", key=WRITE_KEY)[0] == 404
            assert call(port, "POST", "/v1/edits", {"requests": written}, key=READ_KEY)[0] == 403
            assert call(port, "POST", "/v1/edits", {"requests": written}, key=None)[0] == 401
            time.sleep(3)
        after, after_text, v1 = _outputs(port, prompts)
        assert v1 == edit["version"] == 1 and edit["efficacy"] == 1.0
        assert edit["guard"]["passed"] and edit["guard"]["perplexity_rise"] <= 0.10  # the damage guard measured it
        for record in written:  # greedy answers are the new objects
            assert after_text[_prompt(record)].strip().startswith(record["target_new"]), after_text
        reference = {v0: before, v1: after}
        assert not clients.failures, clients.failures[:3]
        for response in clients.responses:  # old or new version's exact output, reporting that version
            assert response["tokens"] == reference[response["version"]][response["prompt"]], response
            if response["sent"] > committed:
                assert response["version"] == v1
        assert {r["version"] for r in clients.responses} == {v0, v1}
        assert len({r["worker"] for r in clients.responses}) == 2
        # A second edit on top: reverting the first now conflicts and names it.
        status, second = call(port, "POST", "/v1/edits", {"requests": [facts[5]]}, key=WRITE_KEY)
        assert status == 200 and second["version"] == 2
        status, body = call(port, "DELETE", f"/v1/edits/{edit['id']}", key=WRITE_KEY)
        assert status == 409 and second["id"] in body["detail"]
        assert call(port, "DELETE", f"/v1/edits/{second['id']}", key=WRITE_KEY)[0] == 200
        assert _outputs(port, prompts)[0] == after  # back to version 1's exact outputs
        assert call(port, "DELETE", f"/v1/edits/{edit['id']}", key=WRITE_KEY)[0] == 200
        assert _outputs(port, prompts)[::2] == (before, 4)  # the revert restores the exact previous outputs
        assert call(port, "POST", "/v1/edits/revert", {"version": 1}, key=WRITE_KEY)[1]["version"] == 5
        assert _outputs(port, prompts)[::2] == (after, 5)
        STATE.update(prompts=prompts, after=after, listing=call(port, "GET", "/v1/edits")[1])


def test_restart_restores_the_history_and_kill_mid_edit_loses_nothing(facts, history):
    if "listing" not in STATE:
        pytest.skip("needs the history the previous test commits")
    prompts = STATE["prompts"]
    with Server("smollm2", history, stop_after=2000) as server:
        assert call(server.port, "GET", "/v1/edits")[1] == STATE["listing"]
        assert _outputs(server.port, prompts)[::2] == (STATE["after"], 5)
        pending: list[Any] = []

        def submit() -> None:
            try:
                pending.append(call(server.port, "POST", "/v1/edits", {"requests": facts[5:8]}, key=WRITE_KEY))
            except OSError as err:
                pending.append(err)

        thread = threading.Thread(target=submit)
        thread.start()
        under_way = wait_computing(server.port)  # the editing worker computes it (a minute or more): kill now
        server.kill9()
        manifest_during = json.loads((history / "manifest.json").read_text())
        thread.join(timeout=60)
    assert under_way["facts"] == 3 and manifest_during["version"] == 5
    assert pending and isinstance(pending[0], OSError)
    with Server("smollm2", history, stop_after=2000) as server:
        assert call(server.port, "GET", "/v1/edits")[1] == STATE["listing"]
        assert _outputs(server.port, prompts)[::2] == (STATE["after"], 5)
