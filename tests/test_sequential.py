"""Sequential editing: bit-exact revert of the last k batches (also from a saved history), chains, errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_alphaedit import hparams, low_rank_keys, peaky

from lightning_kedit.editing.history import EditHistory, HistoryError
from lightning_kedit.editing.sequential import chain_batches, chain_report, edit_sequentially
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest, PromptAnswer
from lightning_kedit.statistics import KeyStatistics

SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Leonardo da Vinci", "Marie Curie", "Ada Lovelace", "Alan Turing"]
REQUESTS = [
    EditRequest(str(i), "{} was born in", subject, target, "Rome")
    for i, (subject, target) in enumerate(zip(SUBJECTS, ["Paris", "London", "Tokyo", "Lima", "Oslo", "Cairo"],
                                              strict=True))
]


def layer_weights(model, layers=(1, 2)):
    adapter = ModelAdapter.for_model(model)
    return {layer: adapter.weight(layer).detach().clone() for layer in layers}


def same(model, weights) -> bool:
    adapter = ModelAdapter.for_model(model)
    return all(torch.equal(adapter.weight(layer), w) for layer, w in weights.items())


def statistics(layers, rank=24):
    """Keys in a ``rank``-dimensional subspace plus 1e-4 isotropic noise: C has full rank (MEMIT solves) and a
    40-dimensional near-null space (eigenvalues ~1e-8 of the largest) for AlphaEdit's threshold 1e-6."""
    stats = KeyStatistics(layers, 64)
    for layer in layers:
        keys, _ = low_rank_keys(256, 64, rank, seed=layer)
        noise = torch.randn(256, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(layer))
        stats.update(layer, keys + 1e-4 * noise)
    return stats


@pytest.fixture
def setup():
    return peaky(), statistics([1, 2]), hparams((1, 2))


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_revert_last_k_batches_is_bit_exact(method, setup, tokenizer, tmp_path):
    model, stats, hp = setup
    states = [layer_weights(model)]
    steps = []

    def on_batch(step):
        steps.append((step.batch, step.edits, len(step.requests)))
        states.append(layer_weights(step.model))

    history = edit_sequentially(model, tokenizer, REQUESTS, method=method, batch_size=2, statistics=stats,
                                hparams=hp, threshold=1e-6, callback=on_batch, save_dir=tmp_path / "h")
    assert steps == [(1, 2, 2), (2, 4, 2), (3, 6, 2)]
    assert len(history) == 3 and history.num_edits == 6 and history.request_ids == [r.case_id for r in REQUESTS]
    assert all(not torch.equal(a[2], b[2]) for a, b in itertools.pairwise(states))
    if method == "alphaedit":
        assert history.keys(1).shape == (6, 64) and history[0].delta.hparams["previous_edits"] == 0
        assert history[2].delta.hparams["previous_edits"] == 4
    history.revert(model, 1)
    assert same(model, states[2]) and len(history) == 2
    loaded = EditHistory.load(tmp_path / "h")  # saved after batch 3: it still holds three batches
    assert len(loaded) == 3 and loaded.num_edits == 6
    with pytest.raises(HistoryError, match="not those the 3 recorded batches"):
        loaded.revert(model, 1)  # the model is at batch 2 now
    assert same(model, states[2])
    history.revert(model, 2)
    assert same(model, states[0]) and len(history) == 0 and history.layers == []


def test_loaded_history_reverts_a_fresh_model_and_continues(setup, tokenizer, tmp_path):
    model, stats, hp = setup
    first = layer_weights(model)
    history = edit_sequentially(model, tokenizer, REQUESTS[:4], method="alphaedit", batch_size=2,
                                statistics=stats, hparams=hp, threshold=1e-6)
    after_one = history.weights_after(1)
    history.save(tmp_path / "h")
    loaded = EditHistory.load(tmp_path / "h")
    torch.testing.assert_close(loaded.keys(2), history.keys(2), rtol=0, atol=0)
    loaded.revert(model, 1)
    assert same(model, after_one)
    written = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "h").glob("batch_00001_*")}
    more = edit_sequentially(model, tokenizer, REQUESTS[4:], method="alphaedit", batch_size=2, statistics=stats,
                             hparams=hp, threshold=1e-6, history=loaded, save_dir=tmp_path / "h")
    assert more is loaded and len(loaded) == 2 and loaded[1].delta.hparams["previous_edits"] == 2
    # The save after the new batch writes its files only; batch 1's are left as they were.
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "h").glob("batch_00001_*")} == written
    # The folder held batch 2 of the first run, reverted since: the new index names the new batch 2 only.
    assert len(written) == 2 and len(list((tmp_path / "h").glob("batch_*"))) == 4
    reloaded = EditHistory.load(tmp_path / "h")
    torch.testing.assert_close(reloaded.keys(2), loaded.keys(2), rtol=0, atol=0)
    loaded.revert(model, 2)
    assert same(model, first)


def test_truncate_forgets_later_batches_without_touching_the_model(setup, tokenizer):
    """Weights put back by other means (an older checkpoint): the history is cut to match and continues."""
    model, stats, hp = setup
    first = layer_weights(model)
    history = edit_sequentially(model, tokenizer, REQUESTS[:6], method="alphaedit", batch_size=2,
                                statistics=stats, hparams=hp, threshold=1e-6)
    after_one, now = history.weights_after(1), layer_weights(model)
    with pytest.raises(HistoryError, match=r"must lie in \[0, 3\]"):
        history.truncate(4)
    history.truncate(1)
    assert same(model, now)  # the model is not touched
    assert len(history) == 1 and history.num_edits == 2 and history.keys(1).shape == (2, 64)
    adapter = ModelAdapter.for_model(model)
    with torch.no_grad():
        for layer, weight in after_one.items():
            adapter.weight(layer).copy_(weight)
    assert history.changed_layers(model) == []
    more = edit_sequentially(model, tokenizer, REQUESTS[2:4], method="alphaedit", batch_size=2, statistics=stats,
                             hparams=hp, threshold=1e-6, history=history)
    assert len(more) == 2 and more[1].delta.hparams["previous_edits"] == 2
    history.revert(model, 2)
    assert same(model, first)


def test_weights_before_lends_the_first_weights_and_puts_the_current_ones_back(setup, tokenizer):
    model, stats, hp = setup
    first = layer_weights(model)
    history = edit_sequentially(model, tokenizer, REQUESTS[:4], method="alphaedit", batch_size=2,
                                statistics=stats, hparams=hp, threshold=1e-6)
    now = layer_weights(model)
    assert not same(model, first)
    with history.weights_before(model):
        assert same(model, first)
    assert same(model, now)
    with pytest.raises(RuntimeError, match="inside"), history.weights_before(model):
        raise RuntimeError("inside")
    assert same(model, now) and history.changed_layers(model) == []


@pytest.mark.parametrize("method", ["rome", "ft"])
def test_other_methods_run_sequentially(method, tokenizer):
    model = peaky()
    layers = (2,)
    stats = statistics([2], rank=64)
    first = layer_weights(model, layers)
    history = edit_sequentially(model, tokenizer, REQUESTS[:4], method=method, batch_size=2, statistics=stats,
                                hparams=hparams(layers, ft_steps=2))
    assert [d.method for d in history.deltas] == [method, method]
    history.revert(model, 2)
    assert same(model, first)


def test_push_refuses_a_delta_computed_on_other_weights(setup, tokenizer):
    model, stats, hp = setup
    history = edit_sequentially(model, tokenizer, REQUESTS[:2], method="memit", batch_size=2, statistics=stats,
                                hparams=hp)
    stale = history[0].delta  # computed on the weights before batch 1, not after it
    with pytest.raises(HistoryError, match="previous batches left"):
        history.push(stale)
    assert len(history) == 1


def test_bad_input_is_refused(setup, tokenizer, tmp_path):
    model, stats, hp = setup
    before = layer_weights(model)
    with pytest.raises(KeditError, match="method"):
        edit_sequentially(model, tokenizer, REQUESTS, method="magic", statistics=stats, hparams=hp)
    with pytest.raises(KeditError, match="batch_size"):
        edit_sequentially(model, tokenizer, REQUESTS, method="memit", batch_size=0, statistics=stats, hparams=hp)
    with pytest.raises(KeditError, match="empty"):
        edit_sequentially(model, tokenizer, [], statistics=stats, hparams=hp)
    assert same(model, before)
    with pytest.raises(HistoryError, match="history.json is missing"):
        EditHistory.load(tmp_path)
    history = edit_sequentially(model, tokenizer, REQUESTS[:2], method="memit", statistics=stats, hparams=hp)
    with pytest.raises(HistoryError, match="must lie in"):
        history.revert(model, 2)
    fresh = peaky()  # the weights before the history: it does not describe this model
    untouched = layer_weights(fresh)
    with pytest.raises(KeditError, match="not those the given history"):
        edit_sequentially(fresh, tokenizer, REQUESTS[2:4], method="memit", statistics=stats, hparams=hp,
                          history=history)
    assert same(fresh, untouched) and len(history) == 1
    history.save(tmp_path / "h")
    index = json.loads((tmp_path / "h" / "history.json").read_text())
    index["initial_hashes"] = {"1": "0" * 64, "2": "0" * 64}
    (tmp_path / "h" / "history.json").write_text(json.dumps(index))
    with pytest.raises(HistoryError, match="corrupt"):
        EditHistory.load(tmp_path / "h")


def test_chain_batches_keep_chains_whole():
    reqs = [EditRequest(str(i), "{} is", "x", "y", chain_id=c) for i, c in enumerate("aabcbb")]
    assert [[r.case_id for r in b] for b in chain_batches(reqs, 2)] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert [[r.case_id for r in b] for b in chain_batches(reqs, 3, chain=True)] == [["0", "1"], ["2", "4", "5"],
                                                                                   ["3"]]
    assert [[r.case_id for r in b] for b in chain_batches(reqs, 1, chain=True)] == [["0", "1"], ["2", "4", "5"],
                                                                                   ["3"]]


def test_chain_report_measures_multi_hop_before_and_after(setup, tokenizer):
    model, stats, hp = setup
    chain = [
        EditRequest("h1", "{} was born in", "Toko Yasuda", "Paris", "Rome", chain_id="q",
                    consistency=(PromptAnswer("The birthplace of Toko Yasuda is", "Paris"),)),
        EditRequest("h2", "The mother tongue of {} is", "Danielle Darrieux", "London", "French", chain_id="q"),
    ]
    with pytest.raises(KeditError, match="consistency"):
        chain_report(model, tokenizer, REQUESTS[:2], statistics=stats, hparams=hp)
    before = layer_weights(model)
    report = chain_report(model, tokenizer, chain, method="memit", batch_size=1, statistics=stats, hparams=hp)
    assert len(report["history"]) == 1  # both hops in one batch although batch_size is 1
    assert report["history"].request_ids == ["h1", "h2"]
    assert 0 <= report["before"]["consistency"] <= 1 and 0 <= report["after"]["consistency"] <= 1
    assert report["before"]["n"] == report["after"]["n"] == 2 and not same(model, before)
    report["history"].revert(model, 1)
    assert same(model, before)


@pytest.mark.integration
def test_smollm2_alphaedit_sequence_edits_and_reverts_exactly(smollm2):
    """Two AlphaEdit batches on SmolLM2 raise the new targets' probability; reverting both is bit-exact."""
    from conftest import shared_data

    from lightning_kedit.editing import EditHyperParams
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests
    from lightning_kedit.requests import load_requests

    model, tok = smollm2
    requests = load_requests(shared_data("counterfact", "counterfact-train.json"), n=2)
    hp = EditHyperParams.for_model(model, "memit").replace(v_steps=6, prefix_lengths=((5, 1),))
    adapter = ModelAdapter.for_model(model)
    before = {layer: adapter.weight(layer).detach().clone() for layer in hp.layers}
    start = evaluate_requests(model, tok, requests)["efficacy_prob"]
    history = edit_sequentially(model, tok, requests, method="alphaedit", batch_size=1, hparams=hp)
    try:
        assert history.keys(hp.layers[0]).shape == (2, adapter.key_size)
        assert evaluate_requests(model, tok, requests)["efficacy_prob"] > start
    finally:
        history.revert(model, 2)
    assert same(model, before)
