"""The lifelong method: eq. (1) against an independent float64 computation, running sums, an edit on a tiny
Llama, a sequence resumed from a saved history (bit-identical), and an exact revert that rewinds the statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing import compute_edit
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.lifelong import FeatureSums, fact_features, lifelong_factors, running_sums
from lightning_kedit.editing.sequential import edit_sequentially
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest

SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Leonardo da Vinci", "Marie Curie", "Ada Lovelace", "Alan Turing"]
TARGETS = ["Paris", "London", "Tokyo", "Lima", "Oslo", "Cairo"]
REQUESTS = [EditRequest(str(i), "{} was born in", s, t, "Rome") for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS,
                                                                                              strict=True))]
LAYERS = (1, 2)


def hparams(model, step: float = 1.0, ridge: float = 1.0) -> EditHyperParams:
    return EditHyperParams.for_model(model, "lifelong").replace(layers=LAYERS, extra={"step": step, "ridge": ridge})


def weights(model) -> dict[int, torch.Tensor]:
    adapter = ModelAdapter.for_model(model)
    return {layer: adapter.weight(layer).detach().clone() for layer in LAYERS}


def test_closed_form_matches_the_primal_ridge_solution_in_float64():
    gen = torch.Generator().manual_seed(0)
    n, dk, dv, step, ridge = 7, 12, 5, 0.7, 0.3
    keys = torch.randn(n, dk, generator=gen, dtype=torch.float64)
    grads = torch.randn(n, dv, generator=gen, dtype=torch.float64)
    sk = torch.rand(dk, generator=gen, dtype=torch.float64) + 0.5
    sg = torch.rand(dv, generator=gen, dtype=torch.float64) + 0.5
    got = lifelong_factors(keys, grads, sk, sg, step=step, ridge=ridge).dense()
    # Independent: the primal normal equations, Δ̂ (K̂ᵀK̂ + λI) = V*ᵀ K̂, in numpy, then ΔW = Δ̂ diag(1/s_k).
    k_hat = keys.numpy() / sk.numpy()
    shifts = -step * grads.numpy() / sg.numpy()
    primal = np.linalg.solve(k_hat.T @ k_hat + ridge * np.eye(dk), k_hat.T @ shifts).T
    expected = primal / sk.numpy()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)
    # ΔW k = Δ̂ k̂: the update moves each key's value towards its shift (ridge-shrunk, never past it).
    moved = (got @ keys.T).T.numpy()
    assert np.all(np.sum(moved * shifts, 1) > 0)


def test_feature_sums_match_a_naive_loop():
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(int(n), 4, generator=gen, dtype=torch.float64) + 2 for n in (3, 5, 1)]
    total = FeatureSums.zeros(4)
    for part in parts:
        total = total + FeatureSums.of(part)
    rows = [row.tolist() for part in parts for row in part]
    for j in range(4):
        column = [row[j] for row in rows]
        mean = sum(column) / len(column)
        var = sum((x - mean) ** 2 for x in column) / len(column)
        assert float(total.mean()[j]) == pytest.approx(mean, rel=1e-12)
        assert float(total.variance()[j]) == pytest.approx(var, rel=1e-9)
        assert float(total.rms()[j]) == pytest.approx((var + mean**2) ** 0.5, rel=1e-12)


def test_features_are_the_keys_and_the_answer_gradient_of_the_down_projection():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    features = fact_features(model, tok, REQUESTS[:1], [1])
    request = REQUESTS[0]
    ids = tok(request.prompt_text + " " + request.target_new)["input_ids"]
    shared = len(tok(request.prompt_text)["input_ids"])
    # Independent: finite differences of the answer's NLL w.r.t. a shift of the down-projection's output at
    # the first answer-predicting position, along one output feature.
    adapter = ModelAdapter.for_model(model)

    def nll(shift: float) -> float:
        def hook(module, args, output):
            output = output.clone()
            output[0, shared - 1, 3] += shift
            return output

        handle = adapter.mlp_out(1).register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits.double()[0]
        finally:
            handle.remove()
        lp = logits.log_softmax(-1)
        return -sum(float(lp[t - 1, ids[t]]) for t in range(shared, len(ids)))

    eps = 1e-3
    numeric = (nll(eps) - nll(-eps)) / (2 * eps)
    assert features.keys[1].shape == (len(ids) - shared, adapter.key_size)
    assert float(features.grads[1][0, 3]) == pytest.approx(numeric, rel=2e-3, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_an_edit_reaches_its_target_on_a_tiny_llama():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    request = REQUESTS[0]
    ids = tok(request.prompt_text + " " + request.target_new)["input_ids"]
    shared = len(tok(request.prompt_text)["input_ids"])

    def answer(m) -> tuple[float, bool]:
        with torch.no_grad():
            lp = m(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
        return (sum(float(lp[t - 1, ids[t]]) for t in range(shared, len(ids))),
                all(int(lp[t - 1].argmax()) == ids[t] for t in range(shared, len(ids))))

    before_lp, before_top = answer(model)
    delta = compute_edit(model, tok, [request], method="lifelong", hparams=hparams(model))
    with delta.applied(model):
        after_lp, after_top = answer(model)
    assert not before_top and after_top
    assert after_lp > before_lp + 1.0
    assert delta.method == "lifelong" and tuple(delta.request_ids) == ("0",)


def test_resumed_sequence_is_bit_identical_to_one_that_ran_through(tmp_path):
    tok = tiny_tokenizer()
    through = tiny_model("llama")
    full = edit_sequentially(through, tok, REQUESTS, method="lifelong", batch_size=2, hparams=hparams(through))
    stopped = tiny_model("llama")
    edit_sequentially(stopped, tok, REQUESTS[:2], method="lifelong", batch_size=2, hparams=hparams(stopped),
                      save_dir=tmp_path)
    resumed_model = tiny_model("llama")
    EditHistory.load(tmp_path).deltas[0].apply(resumed_model)
    loaded = EditHistory.load(tmp_path)
    resumed = edit_sequentially(resumed_model, tok, REQUESTS[2:], method="lifelong", batch_size=2,
                                hparams=hparams(resumed_model), history=loaded)
    assert all(torch.equal(a, b) for a, b in zip(weights(through).values(), weights(resumed_model).values(),
                                                 strict=True))
    assert [d.digest() for d in full.deltas] == [d.digest() for d in resumed.deltas]
    # The running statistics travelled with the history: the second batch's normalisation saw the first's.
    keys_after, _ = running_sums(resumed, 1, 64, 32)
    assert float(keys_after.count) == float(sum(e.extras["layers.1.key.count"].item() for e in full))


def test_revert_last_batches_is_exact_and_rewinds_the_statistics():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    snapshots = []
    history = edit_sequentially(model, tok, REQUESTS, method="lifelong", batch_size=2, hparams=hparams(model),
                                callback=lambda step: snapshots.append(weights(step.model)))
    second = history.deltas[1]
    history.revert(model, 2)
    assert all(torch.equal(weights(model)[la], snapshots[0][la]) for la in LAYERS)
    assert len(history) == 1
    # Written again, batch 2 is bit-identical: the reverted batches' sums left the statistics.
    again = edit_sequentially(model, tok, REQUESTS[2:4], method="lifelong", batch_size=2, hparams=hparams(model),
                              history=history)
    assert again.deltas[1].digest() == second.digest()
    assert all(torch.equal(weights(model)[la], snapshots[1][la]) for la in LAYERS)


def test_bad_options_are_refused_and_leave_the_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = weights(model)
    with pytest.raises(KeditError, match="step"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model, step=0.0))
    with pytest.raises(KeditError, match="keys"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model), keys={})
    with pytest.raises(KeditError, match="extras"):
        compute_edit(model, tok, REQUESTS[:1], method="memit", extras={})
    assert all(torch.equal(before[la], weights(model)[la]) for la in LAYERS)


def test_bench_runs_lifelong_seq_and_resumes_with_its_statistics(tmp_path):
    from lightning_kedit.bench import run_bench
    from lightning_kedit.requests import bundled_requests

    tok = tiny_tokenizer()
    common = dict(methods="lifelong-seq", out_dir=tmp_path / "out", model_name="tiny", requests_name="demo",
                  batch_size=2, baseline=False, progress=False, hparams={"layers": LAYERS})
    through = run_bench(tiny_model("llama"), tok, bundled_requests(), counts="2,4", **{**common,
                                                                                       "out_dir": tmp_path / "a"})
    run_bench(tiny_model("llama"), tok, bundled_requests(), counts="2", **common)
    resumed = run_bench(tiny_model("llama"), tok, bundled_requests(), counts="2,4", **common)
    a, b = through.row("lifelong-seq", 4), resumed.row("lifelong-seq", 4)
    assert a is not None and b is not None
    assert a["efficacy"] == b["efficacy"] and a["neighborhood"] == b["neighborhood"]
    saved = EditHistory.load(tmp_path / "out" / "state" / "lifelong-seq.history")
    assert len(saved) == 2 and all("layers.1.key.sum" in entry.extras for entry in saved)
