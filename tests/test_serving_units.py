"""The serving pieces without a server: history store, keys, weights follower, generation, traffic statistics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.serving import (
    EditConflictError,
    EditSubmission,
    HistoryStore,
    ServeKeys,
    StaleEditError,
    UnknownEditError,
    WeightsFollower,
    generate_text,
)
from lightning_kedit.serving.traffic import TrafficStatistics, merged_statistics
from lightning_kedit.statistics import KeyStatistics


def _delta(model: torch.nn.Module, layers: list[int], seed: int, scale: float = 1e-2) -> EditDelta:
    """A random low-rank delta computed on ``model``'s current weights."""
    adapter = ModelAdapter.for_model(model)
    generator = torch.Generator().manual_seed(seed)
    shape = adapter.from_stored_layout(adapter.weight(layers[0])).shape
    updates = {layer: torch.randn(*shape, generator=generator, dtype=torch.float64) * scale for layer in layers}
    return EditDelta.from_model(model, updates, method="test", request_ids=[str(seed)])


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[name], b[name]) for name in a)


def _commit(store: HistoryStore, model: torch.nn.Module, layers: list[int], seed: int) -> tuple[str, EditDelta]:
    """Compute a delta on the model as the store's active edits leave it, apply it, commit it."""
    delta = _delta(model, layers, seed)
    delta.apply(model)
    edit_id, _ = store.commit_edit(delta, store.read().active, {"requests": [], "n": 0})
    return edit_id, delta


# ---------------------------------------------------------------------------------------------------- store
def test_store_commits_versions_and_refuses_reverts_others_depend_on(tmp_path):
    store, model = HistoryStore(tmp_path / "h"), tiny_model("llama")
    assert store.read().version == 0 and store.read().active == []
    first, _ = _commit(store, model, [1, 2], seed=1)
    second, _ = _commit(store, model, [2], seed=2)  # shares layer 2: computed on the first's weights
    third, _ = _commit(store, model, [0], seed=3)  # another layer: independent of both
    manifest = store.read()
    assert (manifest.version, manifest.active) == (3, [first, second, third])
    with pytest.raises(EditConflictError, match=rf"\['{second}'\]"):
        store.revert_edit(first)
    assert store.read().version == 3  # a refused revert commits nothing
    assert store.revert_edit(second).active == [first, third]
    with pytest.raises(EditConflictError, match="not active"):
        store.revert_edit(second)
    with pytest.raises(UnknownEditError, match="e99"):
        store.revert_edit("e99")
    back = store.revert_to(3)  # the state of version 3 again: the reverted edit is active once more
    assert back.version == 5 and back.active == [first, second, third]
    assert back.edits[second]["reverted_version"] is None
    assert store.revert_to(0).active == []
    with pytest.raises(UnknownEditError, match="version 42"):
        store.revert_to(42)
    log = store.read().log
    assert [entry["version"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert [entry["event"] for entry in log] == ["edit", "edit", "edit", "revert", "revert_to", "revert_to"]


def test_store_refuses_an_edit_computed_on_stale_weights(tmp_path):
    store, model = HistoryStore(tmp_path / "h"), tiny_model("llama")
    first, _ = _commit(store, model, [1], seed=1)
    stale_base = store.read().active
    store.revert_edit(first)
    with pytest.raises(StaleEditError, match="version 2"):
        store.commit_edit(_delta(model, [1], seed=5), stale_base, {})
    assert store.read().active == [] and not store.delta_path("e2").exists()


def test_store_change_detection_costs_a_stat_and_sees_every_commit(tmp_path):
    store, model = HistoryStore(tmp_path / "h"), tiny_model("llama")
    stamp, manifest = store.read_if_changed(None)
    assert manifest is None  # no manifest yet: the unedited model, nothing to do
    _commit(store, model, [1], seed=1)
    stamp, manifest = store.read_if_changed(stamp)
    assert manifest is not None and manifest.version == 1
    assert store.read_if_changed(stamp) == (stamp, None)
    store.revert_to(0)
    assert store.read_if_changed(stamp)[1].version == 2
    assert store.computing() is None
    store.mark_computing({"facts": 3})
    assert store.computing() == {"facts": 3} and store.read().version == 2  # not part of the history
    store.mark_computing(None)
    assert store.computing() is None


def test_store_rejects_a_foreign_or_damaged_manifest(tmp_path):
    folder = tmp_path / "h"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(KeditError, match="not a kedit serve history"):
        HistoryStore(folder).read()
    (folder / "manifest.json").write_text("{")
    with pytest.raises(KeditError, match="not valid JSON"):
        HistoryStore(folder).read()
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeditError, match="is a file"):
        HistoryStore(tmp_path / "file")


def test_kill_during_a_commit_leaves_the_committed_history(tmp_path):
    """A process killed (SIGKILL) in the middle of committing a large edit: the manifest is the last committed one."""
    store, model = HistoryStore(tmp_path / "h"), tiny_model("llama")
    first, _ = _commit(store, model, [1], seed=1)
    before = (tmp_path / "h" / "manifest.json").read_bytes()
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from lightning_kedit.editing.delta import EditDelta
        from lightning_kedit.serving import HistoryStore
        from transformers import GPT2Config, GPT2LMHeadModel
        big = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=1024, n_head=4, vocab_size=16))
        delta = EditDelta.from_model(big, {{1: torch.randn(1024, 4096, dtype=torch.float64)}}, method="big")
        print("start", flush=True)
        while True:  # commit again and again until killed; each commit writes a 32 MB delta file first
            store = HistoryStore({str(tmp_path / "h")!r})
            store.commit_edit(delta, store.read().active, {{}})
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline().strip() == b"start"
    import time

    time.sleep(1.5)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    manifest = store.read()  # whole, and naming only complete delta files
    assert manifest.active[0] == first and manifest.version >= 1
    for edit_id in manifest.active:
        assert store.load_delta(edit_id).digest() == manifest.edits[edit_id]["digest"]
    assert json.loads(before)["active"] == [first]


# ---------------------------------------------------------------------------------------------------- keys
def test_keys_from_environment_or_file_never_shown(tmp_path):
    keys = ServeKeys.load(environ={"KEDIT_READ_KEY": "r1", "KEDIT_WRITE_KEY": "w1"})
    assert "r1" not in repr(keys) and "w1" not in repr(keys)
    assert keys.status(None, write=False) == 401 and keys.status("Bearer nope", write=False) == 403
    assert keys.status("Bearer r1", write=False) is None and keys.status("Bearer r1", write=True) == 403
    assert keys.status("Bearer w1", write=True) is None and keys.status("Bearer w1", write=False) is None
    assert keys.status("Basic w1", write=True) == 401
    file = tmp_path / "keys.env"
    file.write_text("# keys\nexport KEDIT_WRITE_KEY='w2'\n")
    open_reading = ServeKeys.load(file, environ={})
    assert open_reading.status(None, write=False) is None and open_reading.status(None, write=True) == 401
    with pytest.raises(KeditError, match="KEDIT_WRITE_KEY"):
        ServeKeys.load(environ={"KEDIT_READ_KEY": "r"})
    with pytest.raises(KeditError, match="same key"):
        ServeKeys.load(environ={"KEDIT_READ_KEY": "k", "KEDIT_WRITE_KEY": "k"})
    file.write_text("PASSWORD=x\n")
    with pytest.raises(KeditError, match="line 1"):
        ServeKeys.load(file)


# ---------------------------------------------------------------------------------------------------- follower
def test_follower_reaches_every_committed_version_bit_exact(tmp_path):
    store = HistoryStore(tmp_path / "h")
    editor, served = tiny_model("llama"), tiny_model("llama")
    follower = WeightsFollower(served, store)
    snapshots = {0: _weights(editor)}
    ids = []
    for seed, layers in ((1, [1, 2]), (2, [2, 3]), (3, [0])):
        edit_id, _ = _commit(store, editor, layers, seed)
        ids.append(edit_id)
        snapshots[store.read().version] = _weights(editor)
    assert follower.sync() == 3 and _same(_weights(served), snapshots[3])
    store.revert_edit(ids[2])  # the last one
    assert follower.sync() == 4 and _same(_weights(served), snapshots[2])
    store.revert_to(1)
    assert follower.sync() == 5 and _same(_weights(served), snapshots[1])
    store.revert_to(3)  # reverted edits come back, bit for bit
    assert follower.sync() == 6 and _same(_weights(served), snapshots[3])
    store.revert_to(0)
    assert follower.sync() == 7 and _same(_weights(served), snapshots[0])


def test_follower_keeps_its_exact_version_when_a_delta_does_not_fit(tmp_path):
    store = HistoryStore(tmp_path / "h")
    editor, served = tiny_model("llama"), tiny_model("llama")
    follower = WeightsFollower(served, store)
    _commit(store, editor, [1], seed=1)
    assert follower.sync() == 1
    at_one = _weights(served)
    second, _ = _commit(store, editor, [1, 2], seed=2)
    store.delta_path(second).write_bytes(b"garbage")  # a damaged file: the version cannot be reached
    assert follower.sync() == 1 and _same(_weights(served), at_one)
    other = tiny_model("llama", seed=7)  # a delta computed on other weights does not apply either
    foreign = _delta(other, [1], seed=9)
    foreign.save(store.delta_path(second))
    manifest = store.read()
    manifest.edits[second]["digest"] = foreign.digest()
    store._write(manifest)
    assert follower.sync() == 1 and _same(_weights(served), at_one) and follower.active == ["e1"]


# ---------------------------------------------------------------------------------------------------- requests
def test_edit_submission_checks_every_record_on_arrival():
    good = {"prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano"}
    assert EditSubmission(requests=[good]).edit_requests()[0].prompt_text == "Toko Yasuda plays the"
    rome = {"requested_rewrite": {"prompt": "{} plays the", "subject": "Toko Yasuda",
                                  "target_new": {"str": "piano"}, "target_true": {"str": "guitar"}}}
    assert EditSubmission(requests=[rome]).edit_requests()[0].target_true == "guitar"
    with pytest.raises(ValueError, match="does not contain the subject"):
        EditSubmission(requests=[{**good, "prompt": "Someone plays the"}])
    with pytest.raises(ValueError):
        EditSubmission(requests=[])
    assert EditSubmission(requests=[good]).force is False and EditSubmission(requests=[good], force=True).force


# ---------------------------------------------------------------------------------------------------- generation
def test_greedy_generation_matches_a_naive_loop_without_cache():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    prompt = "Toko Yasuda plays the"
    completion = generate_text(model, tokenizer, prompt, max_tokens=6)
    ids, expected = tokenizer(prompt)["input_ids"], []
    with torch.no_grad():
        for _ in range(6):  # the whole sequence each step, no key/value cache
            expected.append(int(model(torch.tensor([ids + expected])).logits[0, -1].argmax()))
    assert completion.tokens == expected and completion.finish_reason == "length"
    assert completion.text == tokenizer.decode(expected, skip_special_tokens=True)
    stop_at = tokenizer.decode(expected[2:4])  # a stop string: the text ends before it, finish_reason "stop"
    stopped = generate_text(model, tokenizer, prompt, max_tokens=6, stop=[stop_at])
    assert stopped.finish_reason == "stop" and stop_at not in stopped.text
    assert completion.text.startswith(stopped.text)
    sampled = [generate_text(model, tokenizer, prompt, max_tokens=6, temperature=1.0, seed=s).tokens for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # a seed fixes the sample


# ---------------------------------------------------------------------------------------------------- traffic
def test_traffic_statistics_record_prompt_keys_only_and_merge(tmp_path):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    traffic = TrafficStatistics(model, [1, 2], tmp_path / "traffic" / "w.safetensors", flush_every=2)
    prompts = ["Toko Yasuda plays the", "The Eiffel Tower is in"]
    for prompt in prompts:
        with traffic.prompt():
            generate_text(model, tokenizer, prompt, max_tokens=4)
    assert (tmp_path / "traffic" / "w.safetensors").is_file()  # flushed after two prompts
    # Independent computation: the down projection's inputs over each prompt's tokens only, in float64.
    adapter = ModelAdapter.for_model(model)
    rows = []
    handle = adapter.mlp_out(1).register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(-1, 64)))
    with torch.no_grad():
        for prompt in prompts:
            model(torch.tensor([tokenizer(prompt)["input_ids"]]))
    handle.remove()
    keys = torch.cat(rows).double()
    assert traffic.statistics.count(1) == keys.shape[0]
    torch.testing.assert_close(traffic.statistics.second_moment(1), keys.T @ keys / keys.shape[0])
    base = KeyStatistics([1, 2], key_size=64)
    base.update(1, torch.ones(3, 64, dtype=torch.float64))
    base.update(2, torch.ones(3, 64, dtype=torch.float64))
    merged = merged_statistics(base, tmp_path / "traffic")
    assert merged.count(1) == 3 + keys.shape[0] and base.count(1) == 3
    expected = (keys.T @ keys + torch.ones(3, 64, dtype=torch.float64).T @ torch.ones(3, 64, dtype=torch.float64))
    torch.testing.assert_close(merged.second_moment(1), expected / (3 + keys.shape[0]))
    traffic.close()


# ---------------------------------------------------------------------------------------------------- command
@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--port", "8000"], {}, "no write key"),
    (["--port", "80"], {"KEDIT_WRITE_KEY": "w"}, "--port 80"),
    (["--v-steps", "-1"], {"KEDIT_WRITE_KEY": "w"}, "v_steps"),
    (["--workers", "0"], {"KEDIT_WRITE_KEY": "w"}, "--workers must be >= 1"),
    (["--keys", "missing.env"], {}, "no such file"),
    (["--max-ppl-rise", "-1"], {"KEDIT_WRITE_KEY": "w"}, "max_perplexity_rise"),
])
def test_serve_refuses_bad_options_with_one_line(argv, env, message, tmp_path, monkeypatch, capsys):
    from lightning_kedit.cli import main

    monkeypatch.delenv("KEDIT_WRITE_KEY", raising=False)
    monkeypatch.delenv("KEDIT_READ_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--history", str(tmp_path / "h"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
