"""Tests of ``kedit bench``: the harness (cells, resume, files, bad inputs), the target cache and a SmolLM2 run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import shared_data
from tiny_models import tiny_model

from lightning_kedit.bench import ResourceMeter, parse_counts, parse_methods, run_bench
from lightning_kedit.bench import sequential as bench
from lightning_kedit.bench.report import PLOT_FILE, ROW_KEYS, SEED_SUCCESS, TABLE_FILE, BenchError, success_table
from lightning_kedit.editing import edit_inputs, editor
from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.target_cache import TargetCache, request_digest
from lightning_kedit.editing.target_values import TargetValues
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import bundled_requests


# ---------------------------------------------------------------------------------------------------------
# A stand-in editor: the harness logic is tested without the optimisation (fast, and the calls are counted).
class StubEditor:
    """``compute_edit`` replacement: a small deterministic update of each method's first layer per request."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_at = fail_at

    def compute_edit(self, model, tokenizer, requests, *, method, statistics, hparams, target_cache, progress,
                     timings):
        self.calls.append((method, len(requests)))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        adapter = ModelAdapter.for_model(model)
        layer = hparams.layers[0]
        shape = adapter.from_stored_layout(adapter.weight(layer)).shape
        seed = sum(int(r.case_id) for r in requests)
        update = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.01
        timings["targets"] = 0.001
        return EditDelta.from_model(model, {layer: update}, method=method, request_ids=[r.case_id for r in requests])


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny matrices: one thread avoids thread start-up costs that dominate on a loaded machine."""
    if request.node.get_closest_marker("integration") is None:
        torch.set_num_threads(1)


@pytest.fixture
def stub(monkeypatch):
    editor_stub = StubEditor()
    monkeypatch.setattr(editor, "compute_edit", editor_stub.compute_edit)
    monkeypatch.setattr(edit_inputs, "resolve_statistics", lambda *args, **kwargs: None)
    return editor_stub


@pytest.fixture
def model_and_tokenizer(tokenizer):
    return tiny_model("llama", num_layers=4), tokenizer


def _weights(model):
    adapter = ModelAdapter.for_model(model)
    return [adapter.weight(layer).detach().clone() for layer in range(adapter.num_layers)]


def _bench(model_and_tokenizer, out, tmp_path, **kwargs):
    model, tokenizer = model_and_tokenizer
    options = dict(methods="memit,rome-seq", counts="1,3", out_dir=out, model_name="tiny", requests_name="demo",
                   target_cache=TargetCache(tmp_path / "targets"), progress=False)
    options.update(kwargs)
    return run_bench(model, tokenizer, bundled_requests(), **options)


# ---------------------------------------------------------------------------------------------------------
def test_parse_methods_and_counts():
    assert [(m.name, m.method, m.sequential) for m in parse_methods("memit, rome-seq,memit")] == [
        ("memit", "memit", False), ("rome-seq", "rome", True)]
    with pytest.raises(BenchError, match="unknown method 'sgd'.*known methods: memit"):
        parse_methods("memit,sgd")
    assert parse_counts("100,1,10,10") == [1, 10, 100]
    with pytest.raises(BenchError, match="larger than the 10 requests"):
        parse_counts("1,11", available=10)
    for bad in ("0,1", "one", ""):
        with pytest.raises(BenchError, match="--n"):
            parse_counts(bad)


def test_results_schema_files_and_restored_weights(model_and_tokenizer, stub, tmp_path):
    model, _ = model_and_tokenizer
    before = _weights(model)
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"model", "requests", "rows"} <= set(data) and data["model"] == "tiny" and data["requests"] == "demo"
    cells = {(row["method"], row["n"]) for row in data["rows"]}
    assert cells == {(m, n) for m in ("unedited", "memit", "rome-seq") for n in (1, 3)}
    for row in data["rows"]:
        assert set(ROW_KEYS) <= set(row)
        for key in ("efficacy", "paraphrase", "neighborhood", "score"):
            assert 0.0 <= row[key] <= 1.0
        assert row["perplexity"] is None and row["seconds"] >= 0 and row["peak_rss_mb"] > 0
        assert row["cpu_seconds"] > 0
    # Batch cells start from the unedited weights; the sequential run edits 1, then 2 more facts.
    assert stub.calls == [("memit", 1), ("memit", 3), ("rome", 1), ("rome", 1), ("rome", 1)]
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert (tmp_path / "out" / PLOT_FILE).stat().st_size > 1000
    table = (tmp_path / "out" / TABLE_FILE).read_text()
    assert "| memit |" in table and f"({SEED_SUCCESS['memit'][1] * 100:.0f})" in table


def test_resume_skips_finished_cells_and_continues_sequential_runs(model_and_tokenizer, stub, tmp_path):
    out = tmp_path / "out"
    _bench(model_and_tokenizer, out, tmp_path)
    first = {(r["method"], r["n"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    stub.calls.clear()
    _bench(model_and_tokenizer, out, tmp_path, counts="1,3,5")
    # Only N = 5 runs: MEMIT from the unedited weights, ROME from the saved state after 3 edits.
    assert stub.calls == [("memit", 5), ("rome", 1), ("rome", 1)]
    rows = {(r["method"], r["n"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all(rows[key] == row for key, row in first.items())
    assert rows[("rome-seq", 5)]["edit_seconds"] >= rows[("rome-seq", 3)]["edit_seconds"]


def test_interrupted_run_keeps_finished_cells_and_resumes(model_and_tokenizer, monkeypatch, tmp_path):
    model, _ = model_and_tokenizer
    before = _weights(model)
    failing = StubEditor(fail_at=4)  # memit 1, memit 3, rome 1, then interrupted in the sequential run
    monkeypatch.setattr(editor, "compute_edit", failing.compute_edit)
    monkeypatch.setattr(edit_inputs, "resolve_statistics", lambda *args, **kwargs: None)
    with pytest.raises(KeyboardInterrupt):
        _bench(model_and_tokenizer, tmp_path / "out", tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    done = {(r["method"], r["n"]) for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    assert ("memit", 3) in done and ("rome-seq", 1) in done and ("rome-seq", 3) not in done
    resumed = StubEditor()
    monkeypatch.setattr(editor, "compute_edit", resumed.compute_edit)
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path)
    assert resumed.calls == [("rome", 1), ("rome", 1)]  # from the state saved after the first ROME edit


def test_sequential_run_resumes_between_evaluations(model_and_tokenizer, monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every edit
    failing = StubEditor(fail_at=4)  # rome 1 (evaluated), rome 2, rome 3, then interrupted on the way to 6
    monkeypatch.setattr(editor, "compute_edit", failing.compute_edit)
    monkeypatch.setattr(edit_inputs, "resolve_statistics", lambda *args, **kwargs: None)
    with pytest.raises(KeyboardInterrupt):
        _bench(model_and_tokenizer, tmp_path / "a", tmp_path, methods="rome-seq", counts="1,6")
    resumed = StubEditor()
    monkeypatch.setattr(editor, "compute_edit", resumed.compute_edit)
    model, _ = model_and_tokenizer
    unedited, seen = _weights(model), []

    def resolve(model, *args, **kwargs):  # the statistics must be taken from the unedited weights
        seen.append(all(torch.equal(a, b) for a, b in zip(unedited, _weights(model), strict=True)))
        return object()

    monkeypatch.setattr(edit_inputs, "resolve_statistics", resolve)
    _bench(model_and_tokenizer, tmp_path / "a", tmp_path, methods="rome-seq", counts="1,6")
    assert resumed.calls == [("rome", 1)] * 3  # edits 4-6: the first three were saved
    assert seen == [True]
    monkeypatch.setattr(edit_inputs, "resolve_statistics", lambda *args, **kwargs: None)
    monkeypatch.setattr(bench, "CHECKPOINT_SECONDS", 300.0)
    _bench(model_and_tokenizer, tmp_path / "b", tmp_path, methods="rome-seq", counts="1,6")
    rows_a, rows_b = (
        {r["n"]: r for r in json.loads((tmp_path / name / "results.json").read_text())["rows"]} for name in "ab"
    )
    for key in ("efficacy_prob", "paraphrase_prob", "neighborhood_prob"):
        assert rows_a[6][key] == pytest.approx(rows_b[6][key], abs=1e-12)


def test_batched_state_is_continued_only_with_the_same_cuts(model_and_tokenizer, stub, tmp_path):
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, methods="memit-seq", counts="1,4", batch_size=2)
    assert stub.calls == [("memit", 1), ("memit", 2), ("memit", 1)]  # cut at 1, then at 4
    stub.calls.clear()
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, methods="memit-seq", counts="1,4,6", batch_size=2)
    assert stub.calls == [("memit", 2)]  # the same cuts below 4: continued
    stub.calls.clear()
    _bench(model_and_tokenizer, tmp_path / "other", tmp_path, methods="memit-seq", counts="1,4", batch_size=2)
    stub.calls.clear()
    _bench(model_and_tokenizer, tmp_path / "other", tmp_path, methods="memit-seq", counts="4,6", batch_size=2)
    assert stub.calls == [("memit", 2)] * 3  # other cuts: an uninterrupted run edits [0:2], [2:4], [4:6]


def test_sequential_state_matches_an_uninterrupted_run(model_and_tokenizer, stub, tmp_path):
    _bench(model_and_tokenizer, tmp_path / "a", tmp_path, methods="rome-seq", counts="1,3")
    _bench(model_and_tokenizer, tmp_path / "a", tmp_path, methods="rome-seq", counts="1,3,5")
    _bench(model_and_tokenizer, tmp_path / "b", tmp_path, methods="rome-seq", counts="1,3,5")
    rows_a = {r["n"]: r for r in json.loads((tmp_path / "a" / "results.json").read_text())["rows"]}
    rows_b = {r["n"]: r for r in json.loads((tmp_path / "b" / "results.json").read_text())["rows"]}
    for key in ("efficacy_prob", "paraphrase_prob", "neighborhood_prob"):
        assert rows_a[5][key] == pytest.approx(rows_b[5][key], abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(counts="1,11"), "larger than the 10 requests"),
        (dict(methods="memit,magic"), "unknown method 'magic'"),
        (dict(batch_size=0), "batch_size"),
        (dict(ppl_text="/nonexistent/text.txt"), "no such file"),
    ],
)
def test_bad_input_writes_nothing(model_and_tokenizer, stub, tmp_path, kwargs, message):
    with pytest.raises(BenchError, match=message):
        _bench(model_and_tokenizer, tmp_path / "out", tmp_path, **kwargs)
    assert not (tmp_path / "out").exists() and stub.calls == []


def test_folder_of_another_model_or_settings_is_refused_untouched(model_and_tokenizer, stub, tmp_path):
    out = tmp_path / "out"
    _bench(model_and_tokenizer, out, tmp_path)
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = (tiny_model("llama", num_layers=4, seed=1), model_and_tokenizer[1])
    with pytest.raises(BenchError, match="results of another model"):
        _bench(other, out, tmp_path)
    with pytest.raises(BenchError, match="other settings.*v_steps"):
        _bench(model_and_tokenizer, out, tmp_path, hparams={"v_steps": 3})
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "results.json").write_text("{not json")
    with pytest.raises(BenchError, match="not a kedit bench results file"):
        _bench(model_and_tokenizer, tmp_path / "garbage", tmp_path)
    assert (tmp_path / "garbage" / "results.json").read_text() == "{not json"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files


def test_other_requests_are_refused(model_and_tokenizer, stub, tmp_path):
    model, tokenizer = model_and_tokenizer
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, methods="memit", counts="1")
    shuffled = list(reversed(bundled_requests()))
    with pytest.raises(BenchError, match="other requests"):
        run_bench(model, tokenizer, shuffled, methods="memit", counts="1", out_dir=tmp_path / "out",
                  target_cache=TargetCache(tmp_path / "targets"), progress=False)


def test_progress_lines_show_time_left(model_and_tokenizer, stub, tmp_path, capsys):
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, methods="memit", progress=True)
    err = capsys.readouterr().err
    assert "[bench] 4 cell(s) to run" in err
    assert "[bench 4/4] memit N=3: efficacy" in err and "done" in err and "left (estimated)" in err


def test_success_table_and_peak_memory():
    from lightning_kedit.bench.report import BenchResults

    results = BenchResults("/tmp/unused", model="m", requests="r", fingerprint="f")
    results.rows.append({"method": "ft", "n": 10, "efficacy": 0.5})
    lines = success_table(results).splitlines()
    assert lines[0].startswith("| method | N = 1 | N = 10 |") and "| ft | – (85) | 50 (82) |" in lines[2]
    with ResourceMeter() as meter:
        block = bytearray(50 * 2**20)
        sum(range(200_000))
    assert meter.peak_mb > 50 and len(block) > 0 and meter.cpu_seconds > 0


# ---------------------------------------------------------------------------------------------------------
# The CLI: bad input ends with a one-line error before the model is loaded.
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--n", "1,5000"], "larger than the 10 requests"),
        (["--methods", "memit,unknown"], "unknown method 'unknown'"),
        (["--set", "v_steps"], "not KEY=VALUE"),
    ],
)
def test_cli_bad_input(tmp_path, capsys, extra, message):
    from lightning_kedit.cli import main
    from lightning_kedit.requests import save_requests

    path = save_requests(bundled_requests(), tmp_path / "facts.json")
    code = main(["bench", "--model", str(tmp_path / "no-model"), "--requests", str(path), "--out",
                 str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# The target cache.
def _values(requests, width=6, offset=0.0):
    rows = torch.stack([torch.full((width,), float(r.case_id) + offset, dtype=torch.float64) for r in requests])
    return TargetValues(delta=rows, prob=torch.full((len(requests),), 0.9), steps=torch.full((len(requests),), 4),
                        layer=1)


def test_target_cache_computes_only_misses_in_order(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    requests = bundled_requests()
    cache, hp = TargetCache(tmp_path), EditHyperParams(layers=(1,))
    asked: list[list[str]] = []

    def compute(batch):
        asked.append([r.case_id for r in batch])
        return _values(batch)

    first = cache.lookup_or_compute(model, tokenizer, requests[:3], 1, ["{}"], hp, compute)
    again = cache.lookup_or_compute(model, tokenizer, requests[:5], 1, ["{}"], hp, compute)
    assert asked == [[r.case_id for r in requests[:3]], [r.case_id for r in requests[3:5]]]
    assert torch.equal(again.delta[:3], first.delta) and again.delta.dtype == torch.float64
    assert again.delta[:, 0].tolist() == [float(r.case_id) for r in requests[:5]]
    assert (cache.hits, cache.misses) == (3, 5) and again.steps.tolist() == [4] * 5
    assert not list(tmp_path.rglob(".*.tmp"))


def test_target_cache_keys(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cache, hp = TargetCache(tmp_path), EditHyperParams(layers=(1,))
    folder = cache.folder(model, tokenizer, 1, ["{}"], hp)
    assert cache.folder(model, tokenizer, 1, ["{}"], hp.replace(batch_size=7, mom2_weight=1.0)) == folder
    assert cache.folder(model, tokenizer, 1, ["{}"], hp.replace(v_lr=0.1)) != folder
    assert cache.folder(model, tokenizer, 1, ["{}", "A. {}"], hp) != folder
    with torch.no_grad():
        ModelAdapter.for_model(model).weight(1).add_(1e-3)  # a sequential edit changes the fingerprint
    assert cache.folder(model, tokenizer, 1, ["{}"], hp).parent != folder.parent
    request = bundled_requests()[0]
    renamed = dataclasses.replace(request, case_id="other")
    assert request_digest(renamed) == request_digest(request)


def test_target_cache_corrupt_file_is_a_miss_and_rewritten(tmp_path):
    cache, request = TargetCache(tmp_path), bundled_requests()[0]
    path = cache.put(tmp_path / "f", request, torch.arange(4.0), 0.5, 3)
    delta, prob, steps = cache.get(tmp_path / "f", request)
    assert delta.tolist() == [0.0, 1.0, 2.0, 3.0] and prob == 0.5 and steps == 3
    path.write_bytes(b"truncated")
    assert cache.get(tmp_path / "f", request) is None
    with pytest.raises(ValueError, match="one request's vector"):
        cache.put(tmp_path / "f", request, torch.zeros(2, 2), 0.5, 3)


def test_target_cache_disabled_writes_nothing(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    cache = TargetCache(tmp_path / "c", enabled=False)
    out = cache.lookup_or_compute(model, tokenizer, bundled_requests()[:2], 1, ["{}"], EditHyperParams(layers=(1,)),
                                  _values)
    assert out.delta.shape == (2, 6) and not (tmp_path / "c").exists() and cache.misses == 2


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_smollm2_bench_raises_efficacy(smollm2, tmp_path):
    from lightning_kedit.editing import EditHyperParams
    from lightning_kedit.requests import load_requests
    from lightning_kedit.statistics import collect_key_statistics

    model, tokenizer = smollm2
    path = shared_data("counterfact", "counterfact-val.json")
    requests = load_requests(path, n=10)
    layers = EditHyperParams.for_model(model, "memit").layers
    # Fast settings (the benchmark uses the defaults): a small statistics budget, the bare prompt as the only
    # context template and few optimisation steps of the target values.
    statistics = collect_key_statistics(model, tokenizer, layers, max_tokens=4000)
    results = run_bench(
        model, tokenizer, requests, methods="memit", counts="1,10", out_dir=tmp_path / "bench", model_name="smollm2",
        requests_name=str(path), statistics=statistics, hparams={"v_steps": 6, "prefix_lengths": []},
        target_cache=TargetCache(tmp_path / "targets"), progress=False,
    )
    data = json.loads(Path(results.path).read_text())
    assert {(r["method"], r["n"]) for r in data["rows"]} == {(m, n) for m in ("unedited", "memit") for n in (1, 10)}
    assert all(set(ROW_KEYS) <= set(r) for r in data["rows"])
    before, after = results.row("unedited", 10), results.row("memit", 10)
    assert after["efficacy"] > before["efficacy"] + 0.2
    assert results.row("memit", 10)["cached_targets"] == 1  # the N = 1 cell's target is reused


def test_real_editor_on_a_tiny_model(model_and_tokenizer, tmp_path):
    from lightning_kedit.statistics import collect_key_statistics

    model, tokenizer = model_and_tokenizer
    before = _weights(model)
    statistics = collect_key_statistics(model, tokenizer, [0, 1, 2], max_tokens=2000)
    cache = TargetCache(tmp_path / "targets")
    results = _bench(model_and_tokenizer, tmp_path / "out", tmp_path, methods="memit,rome-seq,ft", counts="1,2",
                     statistics=statistics, hparams={"v_steps": 3, "ft_steps": 3}, target_cache=cache)
    assert {(r["method"], r["n"]) for r in results.rows} == {
        (m, n) for m in ("unedited", "memit", "rome-seq", "ft") for n in (1, 2)}
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert results.row("memit", 2)["phases"]["targets"] >= 0
    # MEMIT's N = 2 cell reads the first request's target from the N = 1 cell.
    assert results.row("memit", 2)["cached_targets"] >= 1 and cache.hits >= 1


def _alphaedit_seq_options(model_and_tokenizer, tmp_path):
    """AlphaEdit's hyper-parameters, statistics of the unedited model, and ``_bench`` options for its sequence."""
    from lightning_kedit.statistics import collect_key_statistics

    model, tokenizer = model_and_tokenizer
    hp = EditHyperParams.for_model(model, "alphaedit")
    statistics = collect_key_statistics(model, tokenizer, list(hp.layers), max_tokens=2000)
    options = dict(methods="alphaedit-seq", statistics=statistics, hparams={"v_steps": 3}, batch_size=1,
                   baseline=False, target_cache=TargetCache(tmp_path / "targets"))
    return hp, statistics, options


def test_alphaedit_seq_keeps_its_history_and_resumes_like_edit_sequentially(model_and_tokenizer, tmp_path):
    """``alphaedit-seq`` passes each batch the earlier batches' keys; a resumed run ends where one pass does."""
    from safetensors.torch import load_file

    from lightning_kedit.editing.sequential import edit_sequentially

    model, tokenizer = model_and_tokenizer
    before = _weights(model)
    hp, statistics, options = _alphaedit_seq_options(model_and_tokenizer, tmp_path)
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, counts="1", **options)
    results = _bench(model_and_tokenizer, tmp_path / "out", tmp_path, counts="1,3", **options)  # resumes at 1
    assert {(r["method"], r["n"]) for r in results.rows} == {("alphaedit-seq", 1), ("alphaedit-seq", 3)}
    assert results.row("alphaedit-seq", 3)["cached_targets"] == 0  # continued on the edited weights, not restarted
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    state = tmp_path / "out" / "state"
    history = EditHistory.load(state / "alphaedit-seq.history")
    assert history.num_edits == 3 and all(d.hparams["previous_edits"] == i for i, d in enumerate(history.deltas))
    saved = load_file(str(state / "alphaedit-seq.safetensors"))
    reference = edit_sequentially(model, tokenizer, bundled_requests()[:3], method="alphaedit", batch_size=1,
                                  statistics=statistics, hparams=hp.replace(v_steps=3))
    adapter = ModelAdapter.for_model(model)
    for layer in hp.layers:
        torch.testing.assert_close(saved[f"layers.{layer}"], adapter.weight(layer), rtol=1e-5, atol=1e-6)
    reference.revert(model, len(reference))


def test_alphaedit_history_ahead_of_its_state_is_cut_back_not_restarted(model_and_tokenizer, tmp_path):
    """A run stopped between the history's write and the state's: the next run keeps the state's batches."""
    import shutil

    model, _ = model_and_tokenizer
    before = _weights(model)
    _, _, options = _alphaedit_seq_options(model_and_tokenizer, tmp_path)
    state = tmp_path / "out" / "state"
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, counts="1", **options)
    shutil.copy(state / "alphaedit-seq.safetensors", tmp_path / "state_after_1.safetensors")
    _bench(model_and_tokenizer, tmp_path / "out", tmp_path, counts="1,2", **options)
    # As if the run had died right after writing the history of batch 2: the weights saved are batch 1's.
    shutil.copy(tmp_path / "state_after_1.safetensors", state / "alphaedit-seq.safetensors")
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    saved["rows"] = [row for row in saved["rows"] if row["n"] == 1]
    (tmp_path / "out" / "results.json").write_text(json.dumps(saved))
    options["target_cache"] = cache = TargetCache(tmp_path / "targets")
    results = _bench(model_and_tokenizer, tmp_path / "out", tmp_path, counts="1,2", **options)
    assert results.row("alphaedit-seq", 2) is not None
    assert cache.hits == 1  # only batch 2 ran again, from batch 1's weights (a restart would run both)
    history = EditHistory.load(state / "alphaedit-seq.history")
    assert history.num_edits == 2 and [d.hparams["previous_edits"] for d in history.deltas] == [0, 1]
    assert all(torch.equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def test_cli_runs_a_tiny_model_folder(model_and_tokenizer, tmp_path, monkeypatch, capsys):
    from lightning_kedit.cli import main
    from lightning_kedit.models.fingerprint import model_fingerprint
    from lightning_kedit.requests import save_requests
    from lightning_kedit.statistics import collect_key_statistics

    model, tokenizer = model_and_tokenizer
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    layers = EditHyperParams.for_model(model, "memit").layers
    stats = collect_key_statistics(model, tokenizer, layers, max_tokens=2000)
    stats.save(tmp_path / "stats.safetensors", model_fingerprint(model, tokenizer, layers))
    requests = save_requests(bundled_requests(), tmp_path / "facts.json")
    args = ["bench", "--model", str(tmp_path / "model"), "--requests", str(requests), "--methods", "memit",
            "--n", "1,2", "--out", str(tmp_path / "out"), "--stats", str(tmp_path / "stats.safetensors"),
            "--set", "v_steps=2", "--json", str(tmp_path / "bench.json"), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| method | N = 1 | N = 2 |") and "| memit |" in printed
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == 4 and data["out"] == str(tmp_path / "out")
    assert (tmp_path / "cache" / "targets").is_dir()
