"""Causal tracing against a slow float64 reference (one forward per cell), its errors, caching and plots."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

from lightning_kedit.cli import main
from lightning_kedit.models import ModelAdapter
from lightning_kedit.models.forward_hooks import capture_outputs
from lightning_kedit.requests import EditRequest
from lightning_kedit.tracing import (
    KINDS,
    TracingError,
    average_trace,
    best_window,
    causal_trace,
    choose_edit_layers,
    embedding_noise_scale,
    restored_layers,
    select_edit_window,
)
from lightning_kedit.tracing.plots import plot_trace, save_average_figure, save_trace_figures

PROMPT, SUBJECT = "The capital of Italy is", "Italy"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and the CPU is shared (conftest restores the thread count)."""
    torch.set_num_threads(1)


def peaked(model_type: str, num_layers: int = 4) -> torch.nn.Module:
    """A tiny model whose LM head is scaled up (and untied), so that answers and effects are large."""
    model = tiny_model(model_type, num_layers=num_layers)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach() * 20)
    return model


def reference_trace(model, tokenizer, prompt, kind, answer_id, subject_range, *, samples, seed, window, noise,
                    positions=None):
    """``p(restored)`` per (token, layer): one plain forward per cell, no shortcut (NaN rows: not traced)."""
    adapter = ModelAdapter.for_model(model)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    tokens, layers = ids.shape[1], adapter.num_layers
    first, end = subject_range
    draws = torch.randn((samples, end - first, adapter.value_size), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float64) * noise
    modules = {"hidden": list(adapter.blocks), "mlp": [adapter.mlp(i) for i in range(layers)],
               "attn": [adapter.attn(i) for i in range(layers)]}[kind]

    def tensor_of(output):
        return output[0] if isinstance(output, tuple) else output

    clean = []
    handles = [m.register_forward_hook(lambda m, a, o: clean.append(tensor_of(o).reshape(tokens, -1))) for m in modules]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()

    def corrupt(module, args, output):
        output = output.clone()
        output[:, first:end] += draws.to(output.dtype)
        return output

    def restorer(layer, token):
        def hook(module, args, output):
            new = tensor_of(output).clone()
            new.view(samples, tokens, -1)[:, token] = clean[layer][token]
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    probs = torch.full((tokens, layers), math.nan, dtype=torch.float64)
    for token in range(tokens) if positions is None else positions:
        for layer in range(layers):
            handles = [adapter.embeddings().register_forward_hook(corrupt)]
            for restored in restored_layers(kind, layer, window, layers):
                handles.append(modules[restored].register_forward_hook(restorer(restored, token)))
            with torch.no_grad():
                logits = model(ids.expand(samples, -1)).logits
            for handle in handles:
                handle.remove()
            probs[token, layer] = logits[:, -1].double().softmax(-1)[:, answer_id].mean()
    return probs


def assert_untouched(model: torch.nn.Module) -> None:
    for module in model.modules():
        assert "forward" not in module.__dict__, f"{type(module).__name__}.forward left patched"
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {type(module).__name__}"


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_matches_float64_reference(model_type):
    tokenizer = tiny_tokenizer()
    model = peaked(model_type)
    # a token before the subject, one inside, the last: prefix caches of every length, all layers, all kinds
    settings = dict(samples=2, seed=3, window=3, positions=(2, 6, 8))
    result = causal_trace(model, tokenizer, PROMPT, SUBJECT, batch_size=6, **settings)
    model64 = copy.deepcopy(model).double()
    assert result.subject_range == (5, 8)
    assert result.tokens[5:8] == ("It", "al", "y")
    for kind in KINDS:
        expected = reference_trace(model64, tokenizer, PROMPT, kind, result.answer_id, result.subject_range,
                                   noise=result.noise, **settings)
        torch.testing.assert_close(result.restored_probs(kind), expected, atol=1e-5, rtol=0, equal_nan=True)
    # the comparison is not vacuous: the corruption and the restorations move the probability
    assert max(float(result.effects[k].nan_to_num().abs().max()) for k in KINDS) > 1e-4
    assert_untouched(model)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_model_agrees_to_rounding_on_every_cell(kind):
    tokenizer = tiny_tokenizer()
    model = peaked("llama", num_layers=3).double()
    result = causal_trace(model, tokenizer, PROMPT, SUBJECT, kinds=(kind,), samples=3, window=2, batch_size=6)
    expected = reference_trace(model, tokenizer, PROMPT, kind, result.answer_id, result.subject_range,
                               samples=3, seed=0, window=2, noise=result.noise)
    torch.testing.assert_close(result.restored_probs(kind), expected, atol=1e-12, rtol=0)


def test_batch_size_positions_and_the_zero_rows():
    tokenizer = tiny_tokenizer()
    model = peaked("gpt2")
    whole = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, batch_size=1)
    batched = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, batch_size=1000)
    for kind in KINDS:
        torch.testing.assert_close(whole.effects[kind], batched.effects[kind], atol=1e-6, rtol=0)
        assert torch.equal(whole.effects[kind][:5], torch.zeros(5, 4, dtype=torch.float64))  # before the subject
    some = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2, positions=[7, 2], kinds=("attn",))
    assert some.kinds == ("attn",)
    assert torch.isnan(some.effects["attn"][[0, 1, 3, 4, 5, 6, 8]]).all()
    torch.testing.assert_close(some.effects["attn"][7], whole.effects["attn"][7], atol=1e-6, rtol=0)
    assert torch.equal(some.effects["attn"][2], torch.zeros(4, dtype=torch.float64))
    assert json.loads(json.dumps(some.to_dict()))["effects"]["attn"][0] is None


def test_answer_default_and_given():
    tokenizer = tiny_tokenizer()
    model = peaked("llama")
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer(PROMPT).input_ids])).logits[0, -1]
    greedy = causal_trace(model, tokenizer, PROMPT, SUBJECT, kinds=("hidden",), samples=2)
    assert greedy.answer_id == int(logits.argmax())
    assert greedy.clean_prob == pytest.approx(float(logits.double().softmax(-1).max()), rel=1e-5)
    given = causal_trace(model, tokenizer, PROMPT, SUBJECT, "Rome", kinds=("hidden",), samples=2)
    assert given.answer == "Rome"
    assert given.answer_id == tokenizer(PROMPT + " Rome").input_ids[len(tokenizer(PROMPT).input_ids)]
    # restoring the whole residual stream at the last token of the last layer gives back the clean run
    assert float(given.restored_probs("hidden")[-1, -1]) == pytest.approx(given.clean_prob, abs=1e-6)


def test_noise_scale_and_seed():
    model = tiny_model("llama")
    embeddings = model.get_input_embeddings().weight.detach().double()
    assert embedding_noise_scale(model) == pytest.approx(3 * float(embeddings.std()), rel=1e-6)
    assert embedding_noise_scale(model, factor=1.0) == pytest.approx(float(embeddings.std()), rel=1e-6)
    tokenizer = tiny_tokenizer()
    a, b, c = (causal_trace(model, tokenizer, PROMPT, SUBJECT, kinds=("mlp",), samples=2, seed=s, noise=0.5)
               for s in (1, 1, 2))
    assert torch.equal(a.effects["mlp"], b.effects["mlp"]) and a.corrupted_prob != c.corrupted_prob
    silent = causal_trace(model, tokenizer, PROMPT, SUBJECT, kinds=("hidden",), samples=2, noise=0.0)
    assert silent.corrupted_prob == pytest.approx(silent.clean_prob, abs=1e-6)
    assert float(silent.effects["hidden"].abs().max()) < 1e-6


def test_restored_layers_is_a_centred_window():
    assert list(restored_layers("hidden", 5, 10, 30)) == [5]
    assert list(restored_layers("mlp", 5, 10, 30)) == list(range(0, 10))
    assert list(restored_layers("attn", 29, 10, 30)) == list(range(24, 30))
    assert list(restored_layers("mlp", 3, 1, 30)) == [3]
    assert list(restored_layers("mlp", 3, 3, 30)) == [2, 3, 4]


@pytest.mark.parametrize(
    ("prompt", "subject", "answer", "match"),
    [
        (PROMPT, "France", None, "does not occur in `prompt`"),
        (PROMPT, "", None, "`subject`=''"),
        ("", SUBJECT, None, "`prompt`=''"),
        (PROMPT, SUBJECT, "", "adds no token"),
        (PROMPT, SUBJECT, "   ", "adds no token"),
        ("Italy " * 300, SUBJECT, None, "reads at most 256"),
    ],
)
def test_bad_input_is_refused_and_leaves_the_model_alone(prompt, subject, answer, match):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TracingError, match=match):
        causal_trace(model, tiny_tokenizer(), prompt, subject, answer, samples=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert_untouched(model)


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (dict(kinds=("mlp", "embed")), "`kinds`"),
        (dict(kinds=()), "`kinds`"),
        (dict(samples=0), "`samples`=0"),
        (dict(window=0), "`window`=0"),
        (dict(batch_size=0), "`batch_size`=0"),
        (dict(noise=float("nan")), "`noise`=nan"),
        (dict(positions=[42]), "`positions`"),
    ],
)
def test_bad_settings(setting, match):
    with pytest.raises(TracingError, match=match):
        causal_trace(tiny_model("llama"), tiny_tokenizer(), PROMPT, SUBJECT, **setting)


def test_hooks_and_patches_removed_when_a_forward_fails():
    model = tiny_model("llama")
    calls = []

    def fail_late(module, args, output):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")

    handle = model.model.layers[3].register_forward_hook(fail_late)
    with pytest.raises(RuntimeError, match="boom"):
        causal_trace(model, tiny_tokenizer(), PROMPT, SUBJECT, samples=2, batch_size=2)
    handle.remove()
    assert_untouched(model)


def test_best_window_against_brute_force():
    curve = torch.randn(17, generator=torch.Generator().manual_seed(0))
    for window in (1, 3, 5, 17):
        totals = [float(curve[s : s + window].sum()) for s in range(18 - window)]
        start = max(range(len(totals)), key=lambda s: (totals[s], -s))
        assert best_window(curve, window) == list(range(start, start + window))
    with pytest.raises(TracingError, match="`window`=18"):
        best_window(curve, 18)


def _one_se_window_naive(effects, window):
    """select_edit_window by loops over facts and windows, in float64."""
    rows = effects.double().tolist()
    starts = range(len(rows[0]) - window + 1)
    totals = [[sum(row[s : s + window]) for s in starts] for row in rows]
    means = [sum(t[s] for t in totals) / len(totals) for s in starts]
    best = max(starts, key=lambda s: (means[s], -s))
    start = best
    while start + 1 in starts:
        deficits = [t[best] - t[start + 1] for t in totals]
        mean = sum(deficits) / len(deficits)
        variance = sum((d - mean) ** 2 for d in deficits) / (len(deficits) - 1)
        if mean > (variance / len(deficits)) ** 0.5:
            break
        start += 1
    return list(range(start, start + window))


def test_select_edit_window_against_naive_one_standard_error_rule():
    generator = torch.Generator().manual_seed(1)
    peak = torch.exp(-((torch.arange(12.0) - 5) ** 2) / 8)
    for facts, noise in ((3, 0.05), (20, 0.2), (50, 0.5), (8, 2.0)):
        effects = peak + noise * torch.randn(facts, 12, generator=generator)
        for window in (1, 3, 5):
            chosen = select_edit_window(effects, window)
            assert chosen == _one_se_window_naive(effects, window)
            assert chosen[0] >= best_window(effects.mean(0), window)[0]


def test_select_edit_window_separates_a_clear_peak_and_moves_deeper_on_a_plateau():
    clear = torch.tensor([[0.0, 0.1, 1.0, 0.1, 0.0]]).repeat(10, 1) + 0.01 * torch.arange(10.0)[:, None]
    assert select_edit_window(clear, 1) == [2]  # every fact agrees: the peak is not in doubt
    # [2, 3] trails [1, 2] by 0.083 with a paired standard error of 0.117; [3, 4] trails by 1.18
    plateau = torch.tensor([[0.0, 1.0, 1.3, 1.1, 0.0], [0.0, 1.2, 1.0, 0.9, 0.0], [0.0, 1.1, 1.0, 1.05, 0.0]])
    assert best_window(plateau.mean(0), 2) == [1, 2] and select_edit_window(plateau, 2) == [2, 3]
    consistent = torch.tensor([[0.0, 1.2, 1.1, 1.0, 0.0], [0.0, 1.3, 1.2, 1.1, 0.0], [0.0, 1.1, 1.0, 0.9, 0.0]])
    assert select_edit_window(consistent, 2) == [1, 2]  # every fact prefers [1, 2] by 0.2: no move
    assert select_edit_window(torch.tensor([0.0, 2.0, 1.0, 0.0]), 2) == [1, 2]  # one curve: the best window
    with pytest.raises(TracingError, match="`effects`"):
        select_edit_window(torch.zeros(0, 4), 2)
    with pytest.raises(TracingError, match="`window`=5"):
        select_edit_window(torch.zeros(3, 4), 5)


FACTS = [("r1", "{} is", "The capital of Italy", "Rome"), ("r2", "{} plays the", "Toko Yasuda", "guitar"),
         ("r3", "{} speaks", "Danielle Darrieux", "French")]


def knowing(model, tokenizer, facts):
    """Teach ``model`` the answers of ``facts`` by pointing their first tokens' head rows at the prompts' states."""
    adapter = ModelAdapter.for_model(model)
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    for _, prompt, subject, answer in facts:
        text = prompt.replace("{}", subject)
        ids = tokenizer(text).input_ids
        token = tokenizer(f"{text} {answer}").input_ids[len(ids)]
        with torch.no_grad(), capture_outputs({"norm": adapter.final_norm()}) as seen:
            model(torch.tensor([ids]))
        state = seen["norm"][0][0, -1]
        head.weight.data[token] = state * 30 / state.square().sum()
    return model


def _requests(model, tokenizer):
    """Three facts; the model is taught the first two, and not the third."""
    knowing(model, tokenizer, FACTS[:2])
    return [EditRequest(case_id, prompt, subject, target_new="Paris", target_true=answer)
            for case_id, prompt, subject, answer in FACTS]


def test_average_trace_keeps_known_facts_and_matches_single_traces():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    requests = _requests(model, tokenizer)
    average = average_trace(model, tokenizer, requests, n=5, kinds=("mlp", "hidden"), samples=2, window=3)
    assert average.case_ids == ("r1", "r2") and average.scanned == 3 and average.n == 2
    single = causal_trace(model, tokenizer, requests[0].prompt_text, requests[0].subject, requests[0].target_true,
                          kinds=("mlp",), samples=2, window=3)
    torch.testing.assert_close(average.last_subject["mlp"][0], single.effects["mlp"][single.last_subject_token])
    torch.testing.assert_close(average.last_token["mlp"][0], single.effects["mlp"][-1])
    first = average_trace(model, tokenizer, requests, n=1, kinds=("mlp",), samples=2)
    assert first.case_ids == ("r1",) and first.scanned == 1
    everything = average_trace(model, tokenizer, requests[::-1], n=2, kinds=("mlp",), samples=2, known_only=False)
    assert everything.case_ids == ("r3", "r2") and everything.scanned == 2
    with pytest.raises(TracingError, match="`n`=0"):
        average_trace(model, tokenizer, requests, n=0)


def test_choose_edit_layers_measures_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    tokenizer = tiny_tokenizer()
    model = peaked("llama", num_layers=6)
    requests = [EditRequest("a", "{} is", "The capital of Italy", "Rome"),
                EditRequest("b", "{} plays the", "Toko Yasuda", "piano")]
    layers = choose_edit_layers(model, tokenizer, requests, window=2, n=2, samples=2, trace_window=3)
    curve = average_trace(model, tokenizer, requests, 2, kinds=("mlp",), samples=2, window=3, known_only=False)
    assert layers == select_edit_window(curve.last_subject["mlp"], 2)
    cached = list((tmp_path / "layers").glob("*.json"))
    assert len(cached) == 1
    entry = json.loads(cached[0].read_text())
    torch.testing.assert_close(torch.tensor(entry["effects"], dtype=torch.float64), curve.last_subject["mlp"])
    entry["effects"] = [[0.0, 0.0, 0.0, 0.0, 5.0, 5.0]] * 2  # the cache is what answers the next call
    cached[0].write_text(json.dumps(entry))
    assert choose_edit_layers(model, tokenizer, requests, window=2, n=2, samples=2, trace_window=3) == [4, 5]
    del entry["effects"]  # an entry of an older version (mean curve only) is traced again
    cached[0].write_text(json.dumps(entry))
    assert choose_edit_layers(model, tokenizer, requests, window=2, n=2, samples=2, trace_window=3) == layers
    assert "effects" in json.loads(cached[0].read_text())

    def no_tracing(*args, **kwargs):
        raise AssertionError("the cached curve should have been used")

    monkeypatch.setattr("lightning_kedit.tracing.averaging.average_trace", no_tracing)
    assert choose_edit_layers(model, tokenizer, requests, window=2, n=2, samples=2, trace_window=3) == layers
    chosen = choose_edit_layers(model, tokenizer, requests, window=3, n=2, samples=2, trace_window=3)
    assert chosen == select_edit_window(curve.last_subject["mlp"], 3)
    with pytest.raises(TracingError, match="`window`=7"):
        choose_edit_layers(model, tokenizer, requests, window=7)


def test_figures(tmp_path):
    tokenizer = tiny_tokenizer()
    model = peaked("gpt2")
    result = causal_trace(model, tokenizer, PROMPT, SUBJECT, samples=2)
    paths = save_trace_figures(result, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"trace_{k}.{s}" for k in KINDS for s in ("png", "svg"))
    assert all(p.stat().st_size > 1000 for p in paths)
    labels = [t.get_text() for t in plot_trace(result, "mlp").axes[0].get_yticklabels()]
    assert labels[5:8] == ["It*", "al*", "y*"] and labels[4].endswith("*") is False
    average = average_trace(model, tokenizer, _requests(model, tokenizer), kinds=("mlp", "attn"), samples=2,
                            known_only=False)
    assert [p.name for p in save_average_figure(average, tmp_path)] == ["trace_average.png", "trace_average.svg"]


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "tiny"
    peaked("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_cli_single_and_average(model_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["trace", "--model", str(model_folder), "--prompt", PROMPT, "--subject", SUBJECT, "--samples", "2",
                 "--kind", "mlp,attn", "--out", str(out), "--json", str(tmp_path / "one.json")])
    assert code == 0
    one = json.loads((tmp_path / "one.json").read_text())
    assert set(one["effects"]) == {"mlp", "attn"} and one["subject_range"] == [5, 8] and len(one["tokens"]) == 9
    assert (out / "trace_mlp.svg").is_file() and not (out / "trace_hidden.png").exists()
    records = [{"case_id": i, "prompt": p, "subject": s, "target_new": "Rome", "ground_truth": "zebra"}
               for i, (p, s) in enumerate([(PROMPT, SUBJECT), ("Toko Yasuda plays the", "Toko Yasuda")])]
    (tmp_path / "facts.json").write_text(json.dumps(records))
    args = ["trace", "--model", str(model_folder), "--requests", str(tmp_path / "facts.json"), "--samples", "2",
            "--n", "2", "--kind", "mlp", "--layers-window", "2", "--json", str(tmp_path / "avg.json")]
    assert main(args) == 2
    assert "predicts none of the 2 facts" in capsys.readouterr().err
    assert main([*args, "--include-unknown", "--out", str(out)]) == 0
    average = json.loads((tmp_path / "avg.json").read_text())
    assert average["n"] == 2 and len(average["last_subject"]["mlp"]) == 4 and len(average["auto_layers"]) == 2
    assert (out / "trace_average.png").is_file()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ([], "give either --prompt and --subject"),
        (["--prompt", PROMPT], "go together"),
        (["--prompt", PROMPT, "--subject", "Spain"], "does not occur"),
        (["--prompt", PROMPT, "--subject", SUBJECT, "--kind", "mlp,embed"], "`kinds`"),
    ],
)
def test_cli_errors_are_one_line(model_folder, capsys, extra, match):
    assert main(["trace", "--model", str(model_folder), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1


@pytest.mark.integration
def test_smollm2_trace_matches_one_forward_per_cell(smollm2):
    model, tokenizer = smollm2
    prompt = "The Eiffel Tower is located in the city of"
    result = causal_trace(model, tokenizer, prompt, "Eiffel Tower", kinds=("hidden",), samples=3,
                          positions=[2, 3, 9])
    assert result.answer.strip() == "Paris" and result.subject_range == (1, 4)
    assert result.clean_prob > 0.3 and result.corrupted_prob < result.clean_prob / 3
    # SmolLM2 keeps this subject at 'iffel' early (not at ' Tower') and moves it to the last token late
    recovered = result.clean_prob - result.corrupted_prob
    assert float(result.effects["hidden"][2, :5].min()) > 0.3 * recovered
    assert float(result.effects["hidden"][9, -5:].min()) > 0.5 * recovered > 0.25
    adapter = ModelAdapter.for_model(model)
    ids = torch.tensor([tokenizer(prompt).input_ids])
    draws = torch.randn((3, 3, adapter.value_size), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        clean = {}
        handles = [adapter.blocks[i].register_forward_hook(lambda m, a, o, i=i: clean.__setitem__(i, o.clone()))
                   for i in (2, 20, 25)]
        model(ids)
        for handle in handles:
            handle.remove()
        for token, layer in ((2, 2), (9, 25), (3, 20)):
            noise = adapter.embeddings().register_forward_hook(
                lambda m, a, o: torch.cat([o[:, :1], o[:, 1:4] + (draws * result.noise).float(), o[:, 4:]], 1))

            def restore(m, a, o, token=token, layer=layer):
                o = o.clone()
                o[:, token] = clean[layer][0, token]
                return o

            patch = adapter.blocks[layer].register_forward_hook(restore)
            p = model(ids.expand(3, -1)).logits[:, -1].double().softmax(-1)[:, result.answer_id].mean()
            noise.remove()
            patch.remove()
            assert float(result.restored_probs("hidden")[token, layer]) == pytest.approx(float(p), abs=1e-4)
    assert math.isnan(float(result.effects["hidden"][4, 0]))
