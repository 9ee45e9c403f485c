"""A real ``kedit serve`` (uvicorn on a free loopback port, LitServe workers) on a tiny model: the server's logic
in seconds per request. The SmolLM2 version of these checks is tests/test_serving_integration.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import WRITE_KEY, Clients, Server, call, complete, wait_computing
from tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["Toko Yasuda plays the", "The Eiffel Tower is in", "Danielle Darrieux speaks", "Michael Jordan plays"]
#: A random tiny model moves little under the default λ; a small one makes the edit change its greedy outputs.
TINY_EDIT = ("--lambda", "1")
FACT = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano", "target_true": "guitar"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    history = tmp_path_factory.mktemp("served") / "history"
    strict_guard = ("--max-neighborhood-drop", "0.000001")  # refuses any edit that lowers a neighbour's answer
    with Server(str(model_dir), history, workers=2, stop_after=900, extra=(*TINY_EDIT, *strict_guard)) as running:
        yield running


def _outputs(port: int) -> tuple[dict[str, list[int]], int]:
    """Greedy tokens of every prompt, and the version that served them (the same for all)."""
    tokens, versions = {}, set()
    for prompt in PROMPTS:
        _, ids, version = complete(port, prompt)
        tokens[prompt] = ids
        versions.add(version)
    assert len(versions) == 1, versions
    return tokens, versions.pop()


def test_health_and_generation_report_the_version(server: Server):
    assert call(server.port, "GET", "/health", key=None)[0] == 200
    status, body = call(server.port, "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 4})
    assert status == 200 and body["object"] == "text_completion"
    assert body["kedit_version"] == call(server.port, "GET", "/v1/edits")[1]["version"]
    assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"] <= 4
    status, both = call(server.port, "POST", "/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 4})
    assert status == 200 and [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["token_ids"] == body["choices"][0]["token_ids"]  # each prompt runs alone


def test_keys_are_required_and_a_refused_edit_changes_nothing(server: Server):
    history = call(server.port, "GET", "/v1/edits")[1]
    before, version = _outputs(server.port)
    assert call(server.port, "POST", "/v1/completions", {"prompt": "x"}, key=None)[0] == 401
    assert call(server.port, "POST", "/v1/completions", {"prompt": "x"}, key="wrong")[0] == 403
    assert call(server.port, "GET", "/v1/edits", key=None)[0] == 401
    for key, expected in ((None, 401), ("wrong", 403), ("read-key-for-tests", 403)):
        assert call(server.port, "POST", "/v1/edits", {"requests": [FACT]}, key=key)[0] == expected
        assert call(server.port, "POST", "/v1/edits/revert", {"version": 0}, key=key)[0] == expected
    if history["active"]:
        assert call(server.port, "DELETE", f"/v1/edits/{history['active'][-1]}", key="read-key-for-tests")[0] == 403
    assert call(server.port, "GET", "/v1/edits")[1] == history
    assert _outputs(server.port) == (before, version)
    log = server.log.read_text()
    assert "read-key-for-tests" not in log and WRITE_KEY not in log


def test_edit_switches_every_worker_between_batches_and_revert_is_exact(server: Server):
    reference = {}
    before, old = _outputs(server.port)
    reference[old] = before
    with Clients(server.port, PROMPTS) as clients:
        time.sleep(2)
        status, edit = call(server.port, "POST", "/v1/edits", {"requests": [FACT]}, key=WRITE_KEY)
        committed = time.monotonic()
        assert status == 200, edit
        assert edit["version"] == old + 1 and edit["n"] == 1 and 0.0 <= edit["efficacy_prob"] <= 1.0
        time.sleep(2)
    after, new = _outputs(server.port)
    assert new == edit["version"]
    reference[new] = after
    assert after != before  # the edit changed what the model says
    assert not clients.failures, clients.failures[:3]
    for response in clients.responses:  # each response is the exact output of the version it reports
        assert response["version"] in reference
        assert response["tokens"] == reference[response["version"]][response["prompt"]], response
        if response["sent"] > committed:  # sent after the edit's answer: served by the new weights
            assert response["version"] == new
    assert {r["version"] for r in clients.responses} == {old, new}
    assert len({r["worker"] for r in clients.responses}) == 2  # both workers answered, in agreement
    status, reverted = call(server.port, "DELETE", f"/v1/edits/{edit['id']}", key=WRITE_KEY)
    assert status == 200 and reverted["version"] == new + 1 and edit["id"] not in reverted["active"]
    assert _outputs(server.port) == (before, new + 1)  # the revert restores the exact outputs


def test_bad_input_gets_its_4xx_while_generation_keeps_serving(server: Server):
    port = server.port
    with Clients(port, PROMPTS, threads=2, seconds=200) as clients:
        assert call(port, "POST", "/v1/edits", raw=b'{"requests": [', key=WRITE_KEY)[0] == 422
        assert call(port, "POST", "/v1/completions", raw=b'{"prompt": ')[0] == 422
        status, body = call(port, "POST", "/v1/edits", {"requests": [{**FACT, "prompt": "Somebody plays the"}]},
                            key=WRITE_KEY)
        assert status == 422 and "does not contain the subject" in json.dumps(body)
        assert call(port, "POST", "/v1/edits", {"facts": [FACT]}, key=WRITE_KEY)[0] == 422
        assert call(port, "DELETE", "/v1/edits/e999", key=WRITE_KEY)[0] == 404
        assert call(port, "GET", "/v1/edits/e999")[0] == 404
        assert call(port, "POST", "/v1/edits/revert", {"version": 999}, key=WRITE_KEY)[0] == 404
        first = call(port, "POST", "/v1/edits", {"requests": [FACT]}, key=WRITE_KEY)[1]
        second = call(port, "POST", "/v1/edits", {"requests": [{**FACT, "target_new": "violin"}]}, key=WRITE_KEY)[1]
        status, body = call(port, "DELETE", f"/v1/edits/{first['id']}", key=WRITE_KEY)
        assert status == 409 and second["id"] in body["detail"]  # names the edit that depends on it
        assert call(port, "DELETE", f"/v1/edits/{second['id']}", key=WRITE_KEY)[0] == 200
        assert call(port, "DELETE", f"/v1/edits/{second['id']}", key=WRITE_KEY)[0] == 409  # no longer active
        assert call(port, "DELETE", f"/v1/edits/{first['id']}", key=WRITE_KEY)[0] == 200
    assert not clients.failures, clients.failures[:3]
    assert len(clients.responses) >= 2


def test_edits_submitted_while_busy_are_solved_as_one_batch(server: Server):
    version = call(server.port, "GET", "/v1/edits")[1]["version"]
    facts = [{**FACT, "case_id": str(i), "target_new": target} for i, target in enumerate(["piano", "drums",
                                                                                          "violin", "flute"])]
    results: list[tuple[int, Any]] = []

    def submit(fact: dict[str, str]) -> None:
        results.append(call(server.port, "POST", "/v1/edits", {"requests": [fact]}, key=WRITE_KEY))

    threads = [threading.Thread(target=submit, args=(fact,)) for fact in facts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [status for status, _ in results] == [200] * 4, results
    ids = {body["id"] for _, body in results}
    assert len(ids) < 4  # some were queued behind the first and merged
    merged = [body for _, body in results if body["submissions"] > 1]
    assert merged and all(body["batch_n"] == body["submissions"] for body in merged)
    history = call(server.port, "GET", "/v1/edits")[1]
    assert history["version"] == version + len(ids)
    assert call(server.port, "POST", "/v1/edits/revert", {"version": version}, key=WRITE_KEY)[0] == 200


def test_an_edit_the_damage_guard_refuses_gets_422_and_changes_nothing(server: Server):
    listing = call(server.port, "GET", "/v1/edits")[1]
    before = _outputs(server.port)
    neighbours = [{"prompt": "Michael Jordan plays the", "answer": "basketball"},
                  {"prompt": "Toko Yasuda plays", "answer": "guitar"}]
    fact = {**FACT, "neighborhood": neighbours}
    status, body = call(server.port, "POST", "/v1/edits", {"requests": [fact]}, key=WRITE_KEY)
    assert status == 422, body
    assert body["guard"]["passed"] is False and body["guard"]["neighborhood_drop"] > 0.000001
    assert "rejected by the damage guard" in body["detail"] and '"force": true' in body["detail"]
    assert call(server.port, "GET", "/v1/edits")[1] == listing and _outputs(server.port) == before
    status, forced = call(server.port, "POST", "/v1/edits", {"requests": [fact], "force": True}, key=WRITE_KEY)
    assert status == 200 and forced["version"] == listing["version"] + 1 and forced["guard"]["passed"] is False
    assert call(server.port, "DELETE", f"/v1/edits/{forced['id']}", key=WRITE_KEY)[0] == 200
    assert _outputs(server.port)[0] == before[0]


def test_restart_resumes_and_kill_during_an_edit_loses_nothing_committed(model_dir: Path, tmp_path: Path):
    history = tmp_path / "history"
    facts = [{**FACT, "case_id": str(i), "subject": subject, "prompt": "{} is in"}
             for i, subject in enumerate(["Toko Yasuda", "The Eiffel Tower", "Danielle Darrieux", "Michael Jordan",
                                          "Berlin", "Apple", "Google", "Toyota"])]
    slow = (*TINY_EDIT, "--v-steps", "200", "--stop-prob", "1.0")  # seconds of work to kill in the middle of
    with Server(str(model_dir), history, stop_after=600, extra=slow) as first:
        committed = call(first.port, "POST", "/v1/edits", {"requests": [FACT]}, key=WRITE_KEY)[1]
        expected, version = _outputs(first.port)
        assert version == committed["version"]
        listing = call(first.port, "GET", "/v1/edits")[1]
        pending: list[Any] = []

        def submit() -> None:
            try:
                pending.append(call(first.port, "POST", "/v1/edits", {"requests": facts}, key=WRITE_KEY, timeout=60))
            except OSError as err:  # the server dies under this request: its connection drops
                pending.append(err)

        thread = threading.Thread(target=submit)
        thread.start()
        under_way = wait_computing(first.port)  # the editing worker has started computing it: kill now
        first.kill9()
        manifest_during = json.loads((history / "manifest.json").read_text())
        thread.join(timeout=90)
    assert pending and isinstance(pending[0], OSError), pending  # the edit never answered
    assert under_way["facts"] == 8 and under_way["base_version"] == version
    assert manifest_during["version"] == version
    assert json.loads((history / "manifest.json").read_text())["version"] == version
    with Server(str(model_dir), history, stop_after=600, extra=TINY_EDIT) as second:
        assert call(second.port, "GET", "/v1/edits")[1] == listing
        assert _outputs(second.port) == (expected, version)  # exactly the committed version, nothing half-applied


def test_a_history_of_another_model_is_refused_at_start(server: Server, tmp_path: Path):
    if not call(server.port, "GET", "/v1/edits")[1]["edits"]:
        call(server.port, "POST", "/v1/edits", {"requests": [FACT]}, key=WRITE_KEY)
    other = tmp_path / "other"
    tiny_model("llama", seed=7).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(AssertionError, match="holds edits of another model"):
        Server(str(other), server.history, stop_after=300).wait_ready(timeout=280)


def test_traffic_statistics_count_the_served_prompt_tokens_and_feed_the_edit(model_dir: Path, tmp_path: Path):
    from lightning_kedit.statistics import KeyStatistics

    history = tmp_path / "history"
    prompts = [f"{p} number {i}" for i, p in enumerate(PROMPTS * 4)]  # 16 prompts: one flush per worker
    with Server(str(model_dir), history, extra=(*TINY_EDIT, "--traffic-stats")) as server:
        for prompt in prompts:
            complete(server.port, prompt, max_tokens=3)
        files = list((history / "traffic").glob("*.safetensors"))
        assert len(files) == 1
        tokens = sum(len(tiny_tokenizer()(p)["input_ids"]) for p in prompts)  # prompts only, not generated tokens
        traffic = KeyStatistics.load(files[0])
        assert all(traffic.count(layer) == tokens for layer in traffic.layers)
        status, edit = call(server.port, "POST", "/v1/edits", {"requests": [FACT]}, key=WRITE_KEY)
        assert status == 200 and edit["version"] == 1
