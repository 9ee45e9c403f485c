"""The lifelong method: eqs. (1) and (2) against independent float64 computations, running sums, features at the
subject and at the answer against finite differences, edits on a tiny Llama (with and without ``λ₀ C``), a
sequence resumed from a saved history (bit-identical), and an exact revert that rewinds the statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing import compute_edit
from lightning_kedit.editing.history import EditHistory
from lightning_kedit.editing.hparams import EditHyperParams
from lightning_kedit.editing.keys import locate_token, subject_char_end
from lightning_kedit.editing.lifelong import FeatureSums, fact_features, lifelong_factors, running_sums
from lightning_kedit.editing.sequential import edit_sequentially
from lightning_kedit.errors import KeditError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest
from lightning_kedit.statistics import load_or_collect_statistics

SUBJECTS = ["Toko Yasuda", "Danielle Darrieux", "Leonardo da Vinci", "Marie Curie", "Ada Lovelace", "Alan Turing"]
TARGETS = ["Paris", "London", "Tokyo", "Lima", "Oslo", "Cairo"]
REQUESTS = [EditRequest(str(i), "{} was born in", s, t, "Rome") for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS,
                                                                                              strict=True))]
LAYERS = (1, 2)


def hparams(model, step: float = 1.0, ridge: float = 1.0, **extra) -> EditHyperParams:
    return EditHyperParams.for_model(model, "lifelong").replace(layers=LAYERS,
                                                                extra={"step": step, "ridge": ridge, **extra})


def weights(model) -> dict[int, torch.Tensor]:
    adapter = ModelAdapter.for_model(model)
    return {layer: adapter.weight(layer).detach().clone() for layer in LAYERS}


def random_problem(seed: int, n: int, dk: int, dv: int):
    """Keys, gradients, key and gradient scales (float64, scales in [0.5, 1.5)) and the generator, for more draws."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, dk, generator=gen, dtype=torch.float64)
    grads = torch.randn(n, dv, generator=gen, dtype=torch.float64)
    sk = torch.rand(dk, generator=gen, dtype=torch.float64) + 0.5
    sg = torch.rand(dv, generator=gen, dtype=torch.float64) + 0.5
    return keys, grads, sk, sg, gen


def test_closed_form_matches_the_primal_ridge_solution_in_float64():
    n, dk, dv, step, ridge = 7, 12, 5, 0.7, 0.3
    keys, grads, sk, sg, _ = random_problem(0, n, dk, dv)
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


def test_preserving_form_matches_its_normal_equations_and_reduces_to_the_dual_form_without_c():
    n, dk, dv, step, ridge = 4, 9, 5, 0.7, 0.3
    keys, grads, sk, sg, gen = random_problem(2, n, dk, dv)
    text = torch.randn(50, dk, generator=gen, dtype=torch.float64)
    preserve = 3.0 * text.T @ text / 50  # λ₀ C
    got = lifelong_factors(keys, grads, sk, sg, step=step, ridge=ridge, preserve=preserve).dense().numpy()
    # Independent: eq. (2) as written, ΔW (KᵀK + λ₀C + λD²) = V*ᵀ K, in numpy.
    k, shifts = keys.numpy(), -step * grads.numpy() / sg.numpy()
    system = k.T @ k + preserve.numpy() + ridge * np.diag(sk.numpy() ** 2)
    expected = np.linalg.solve(system, k.T @ shifts).T
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    without = lifelong_factors(keys, grads, sk, sg, step=step, ridge=ridge).dense().numpy()
    zero = lifelong_factors(keys, grads, sk, sg, step=step, ridge=ridge, preserve=torch.zeros(dk, dk)).dense()
    np.testing.assert_allclose(zero.numpy(), without, rtol=1e-9, atol=1e-12)
    # λ₀ C keeps ordinary text's outputs: the update moves text keys less than eq. (1)'s does.
    assert np.linalg.norm(got @ text.numpy().T) < np.linalg.norm(without @ text.numpy().T)


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


@pytest.mark.parametrize("positions", ["subject", "answer"])
def test_features_are_the_keys_and_the_answer_gradient_of_the_down_projection(positions):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    features = fact_features(model, tok, REQUESTS[:1], [1], positions=positions)
    request = REQUESTS[0]
    text = request.prompt_text + " " + request.target_new
    ids = tok(text)["input_ids"]
    shared = len(tok(request.prompt_text)["input_ids"])
    subject = locate_token(tok, text, subject_char_end(request)[1])[1]
    first = subject if positions == "subject" else shared - 1
    # Independent: finite differences of the answer's NLL w.r.t. a shift of the down-projection's output at
    # the first row's position (the subject's last token, or the first answer-predicting position), along one
    # output feature; and the key read by a hook of its own.
    adapter = ModelAdapter.for_model(model)
    seen = {}

    def nll(shift: float) -> float:
        def hook(module, args, output):
            seen["key"] = args[0][0, first].double()
            output = output.clone()
            output[0, first, 3] += shift
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
    rows = 1 if positions == "subject" else len(ids) - shared
    assert subject < shared - 1  # the subject ends before the prompt does: the two readings differ
    assert features.keys[1].shape == (rows, adapter.key_size)
    torch.testing.assert_close(features.keys[1][0], seen["key"], rtol=1e-5, atol=1e-6)
    assert float(features.grads[1][0, 3]) == pytest.approx(numeric, rel=2e-3, abs=1e-6)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(KeditError, match="'middle'"):
        fact_features(model, tok, REQUESTS[:1], [1], positions="middle")


@pytest.mark.parametrize(("positions", "preserve_weight", "step"), [("answer", 0.0, 1.0), ("subject", 0.1, 10.0)])
def test_an_edit_reaches_its_target_on_a_tiny_llama(positions, preserve_weight, step):
    """At the answer positions one step flips the answer. At the subject the change must travel through
    attention, which a random tiny model barely does; there the answer's log-probability must rise."""
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
    hp = hparams(model, step=step, positions=positions, preserve_weight=preserve_weight)
    stats = load_or_collect_statistics(model, tok, list(LAYERS), cache=False, max_tokens=5000)
    delta = compute_edit(model, tok, [request], method="lifelong", hparams=hp, statistics=stats)
    assert delta.hparams["positions"] == positions and delta.hparams["preserve_weight"] == preserve_weight
    with delta.applied(model):
        after_lp, after_top = answer(model)
    assert not before_top
    if positions == "answer":
        assert after_top and after_lp > before_lp + 1.0
    else:
        assert after_lp > before_lp + 0.15  # measured: +0.26
    assert delta.method == "lifelong" and tuple(delta.request_ids) == ("0",)


def test_rounds_are_one_round_edits_of_the_same_batch_one_after_the_other():
    # Round r reads the model with rounds 1..r−1 added and normalises with the sums that include them: the same
    # as r one-round edits of the batch written in sequence (up to float rounding: one delta holds them all).
    tok = tiny_tokenizer()
    model, stepwise = tiny_model("llama"), tiny_model("llama")
    before = weights(model)
    delta = compute_edit(model, tok, REQUESTS[:3], method="lifelong", hparams=hparams(model, rounds=3))
    assert delta.hparams["rounds"] == 3 and torch.equal(weights(model)[1], before[1])  # model left unchanged
    assert delta.update(1).rank == 3 * 3  # one rank-n factor pair per round
    history = EditHistory()
    for _ in range(3):
        extras: dict = {}
        step = compute_edit(stepwise, tok, REQUESTS[:3], method="lifelong", hparams=hparams(stepwise, rounds=1),
                            history=history, extras=extras)
        step.apply(stepwise)
        history.push(step, {}, extras=extras)
    delta.apply(model)
    for layer in LAYERS:
        diff = (weights(model)[layer] - weights(stepwise)[layer]).abs().max()
        assert diff <= 1e-5 * weights(stepwise)[layer].abs().max(), diff
    assert not torch.allclose(weights(model)[2], before[2], atol=1e-4)


def test_more_rounds_write_more_of_the_answers():
    # At the answer positions (a random tiny model barely carries a change at the subject through attention).
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    batch = REQUESTS[:3]
    rows = [(tok(r.prompt_text + " " + r.target_new)["input_ids"], len(tok(r.prompt_text)["input_ids"]))
            for r in batch]

    def answers_log_prob() -> float:
        total = 0.0
        for ids, shared in rows:
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([ids])).logits.log_softmax(-1)[0]
            total += sum(float(lp[t - 1, ids[t]]) for t in range(shared, len(ids)))
        return total

    base = answers_log_prob()
    gains = []
    for rounds in (1, 3):
        delta = compute_edit(model, tok, batch, method="lifelong",
                             hparams=hparams(model, rounds=rounds, positions="answer"))
        with delta.applied(model):
            gains.append(answers_log_prob() - base)
    assert gains[1] > gains[0] > 0, gains


@pytest.mark.parametrize("solve", ["batch", "cumulative"])
def test_resumed_sequence_is_bit_identical_to_one_that_ran_through(tmp_path, solve):
    tok = tiny_tokenizer()
    through = tiny_model("llama")
    full = edit_sequentially(through, tok, REQUESTS, method="lifelong", batch_size=2,
                             hparams=hparams(through, solve=solve))
    stopped = tiny_model("llama")
    edit_sequentially(stopped, tok, REQUESTS[:2], method="lifelong", batch_size=2,
                      hparams=hparams(stopped, solve=solve), save_dir=tmp_path)
    resumed_model = tiny_model("llama")
    EditHistory.load(tmp_path).deltas[0].apply(resumed_model)
    loaded = EditHistory.load(tmp_path)
    resumed = edit_sequentially(resumed_model, tok, REQUESTS[2:], method="lifelong", batch_size=2,
                                hparams=hparams(resumed_model, solve=solve), history=loaded)
    assert all(torch.equal(a, b) for a, b in zip(weights(through).values(), weights(resumed_model).values(),
                                                 strict=True))
    assert [d.digest() for d in full.deltas] == [d.digest() for d in resumed.deltas]
    # The running statistics travelled with the history: the second batch's normalisation saw the first's.
    keys_after, _ = running_sums(resumed, 1, 64, 32)
    assert float(keys_after.count) == float(sum(e.extras["layers.1.key.count"].item() for e in full))


@pytest.mark.parametrize("solve", ["batch", "cumulative"])
def test_revert_last_batches_is_exact_and_rewinds_the_statistics(solve):
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    snapshots = []
    history = edit_sequentially(model, tok, REQUESTS, method="lifelong", batch_size=2,
                                hparams=hparams(model, solve=solve),
                                callback=lambda step: snapshots.append(weights(step.model)))
    second = history.deltas[1]
    history.revert(model, 2)
    assert all(torch.equal(weights(model)[la], snapshots[0][la]) for la in LAYERS)
    assert len(history) == 1
    # Written again, batch 2 is bit-identical: the reverted batches' sums (and rows) left the statistics.
    again = edit_sequentially(model, tok, REQUESTS[2:4], method="lifelong", batch_size=2,
                              hparams=hparams(model, solve=solve), history=history)
    assert again.deltas[1].digest() == second.digest()
    assert all(torch.equal(weights(model)[la], snapshots[1][la]) for la in LAYERS)


def test_bad_options_are_refused_and_leave_the_model():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    before = weights(model)
    with pytest.raises(KeditError, match="step"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model, step=0.0))
    with pytest.raises(KeditError, match="keys"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model), keys={})
    with pytest.raises(KeditError, match="preserve_weight"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model, preserve_weight=-1.0))
    for rounds in (0, 1.5):
        with pytest.raises(KeditError, match="rounds"):
            compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model, rounds=rounds))
    with pytest.raises(KeditError, match="'last'"):
        compute_edit(model, tok, REQUESTS[:1], method="lifelong", hparams=hparams(model, positions="last"))
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


def test_resume_reads_the_key_statistics_of_the_weights_before_the_sequence(tmp_path, monkeypatch):
    # With preservation (λ₀ C) and no statistics given, the cached statistics of the *unedited* weights must
    # be used on resume too: the edited model's own keys would give other updates.
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    tok = tiny_tokenizer()
    through = tiny_model("llama")
    hp = hparams(through, preserve_weight=0.5)
    full = edit_sequentially(through, tok, REQUESTS, method="lifelong", batch_size=2, hparams=hp)
    stopped = tiny_model("llama")
    edit_sequentially(stopped, tok, REQUESTS[:2], method="lifelong", batch_size=2, hparams=hp,
                      save_dir=tmp_path / "h")
    resumed_model = tiny_model("llama")
    loaded = EditHistory.load(tmp_path / "h")
    loaded.deltas[0].apply(resumed_model)
    edited = weights(resumed_model)
    resumed = edit_sequentially(resumed_model, tok, REQUESTS[2:], method="lifelong", batch_size=2, hparams=hp,
                                history=loaded)
    assert [d.digest() for d in full.deltas] == [d.digest() for d in resumed.deltas]
    assert all(torch.equal(a, b) for a, b in zip(weights(through).values(), weights(resumed_model).values(),
                                                 strict=True))
    assert any(not torch.equal(edited[la], weights(tiny_model("llama"))[la]) for la in LAYERS)
