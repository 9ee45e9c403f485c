"""The damage guard: its measures against independent computations, its verdicts, and its wiring in CLI and callback."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from test_lightning_callback import FAST, LAYERS, REQUESTS, _data, _module, _trainer, _weights
from test_memit import peaky
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit import DamageGuard, DamageReport, EditRejectedError
from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.errors import KeditError
from lightning_kedit.lightning import KnowledgeEditCallback
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import bundled_corpus_path

PROBE = dict(probe_tokens=96, window=32)


def _delta(model: torch.nn.Module, scale: float) -> EditDelta:
    """A delta adding ``scale`` times a fixed random matrix to layers 1 and 2."""
    adapter = ModelAdapter.for_model(model)
    generator = torch.Generator().manual_seed(0)
    shape = (adapter.value_size, adapter.key_size)
    return EditDelta.from_model(model, {layer: scale * torch.randn(shape, generator=generator) for layer in (1, 2)},
                                method="memit", hparams={"layers": [1, 2], "mom2_weight": 1.0, "clamp_norm": 100.0,
                                                         "v_lr": 5.0})


def _naive_perplexity(model, tokenizer, tokens: int, window: int) -> float:
    """Float64 perplexity by a loop over tokens, one window at a time (no batching)."""
    text = bundled_corpus_path().read_text(encoding="utf-8")[: 16 * tokens]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
        for t in range(1, len(chunk)):
            total += float(torch.log_softmax(logits[t - 1], -1)[chunk[t]])
            count += 1
    return math.exp(-total / count)


def _naive_neighbourhood(model, tokenizer, requests) -> float:
    """Mean of σ(NLL_new − NLL_own) over every neighbour prompt, each answer scored alone."""

    def nll(prompt: str, answer: str) -> float:
        prompt_ids = tokenizer(prompt)["input_ids"]
        answer_ids = tokenizer(" " + answer)["input_ids"]
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        return -sum(float(logp[len(prompt_ids) + i - 1, a]) for i, a in enumerate(answer_ids)) / len(answer_ids)

    values = [1 / (1 + math.exp(nll(n.prompt, n.answer) - nll(n.prompt, r.target_new)))
              for r in requests for n in r.neighborhood]
    return sum(values) / len(values)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_perplexity_rise": 0}, "max_perplexity_rise"),
        ({"max_perplexity_rise": float("nan")}, "max_perplexity_rise"),
        ({"max_neighborhood_drop": -0.1}, "max_neighborhood_drop"),
        ({"max_neighborhood_drop": 2.0}, "max_neighborhood_drop"),
        ({"probe_tokens": 4}, "probe_tokens"),
        ({"window": 1.5}, "window"),
        ({"max_neighborhood_prompts": -1}, "max_neighborhood_prompts"),
        ({"text": "/no/such/probe.txt"}, "/no/such/probe.txt"),
    ],
)
def test_invalid_guard_settings_are_refused_by_name(kwargs, name):
    with pytest.raises(KeditError, match=name):
        DamageGuard(**kwargs)


def test_measures_match_independent_computations_and_weights_are_restored_bit_for_bit():
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = _delta(model, 0.05)
    report = DamageGuard(**PROBE).measure(model, tokenizer, delta, REQUESTS)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.perplexity_before == pytest.approx(_naive_perplexity(model, tokenizer, 96, 32), rel=1e-5)
    assert report.neighborhood_before == pytest.approx(_naive_neighbourhood(model, tokenizer, REQUESTS), abs=1e-5)
    assert report.neighborhood_prompts == 2 and report.probe_tokens == 96
    with delta.applied(model):
        edited_ppl = _naive_perplexity(model, tokenizer, 96, 32)
        edited_neighbourhood = _naive_neighbourhood(model, tokenizer, REQUESTS)
    assert report.perplexity_after == pytest.approx(edited_ppl, rel=1e-5)
    assert report.neighborhood_after == pytest.approx(edited_neighbourhood, abs=1e-5)
    assert report.perplexity_rise == pytest.approx(edited_ppl / report.perplexity_before - 1, rel=1e-4)


def test_a_destructive_delta_is_rejected_with_the_damage_and_the_settings_to_change():
    # A random model's near-uniform output hides damage; a peaked output head makes the perplexity react.
    model, tokenizer = peaky("llama"), tiny_tokenizer()
    delta = _delta(model, 1.0)
    guard = DamageGuard(**PROBE)
    with pytest.raises(EditRejectedError) as caught:
        guard.check(model, tokenizer, delta, REQUESTS)
    report = caught.value.report
    assert isinstance(report, DamageReport) and not report.passed
    assert report.perplexity_rise > 0.10
    message = str(caught.value)
    assert f"{report.perplexity_before:.2f} -> {report.perplexity_after:.2f}" in message
    for setting in ("--lambda", "(now 1.0)", "--clamp", "(now 100.0)", "--v-lr", "(now 5.0)", "--layers", "--force"):
        assert setting in message
    assert isinstance(caught.value, KeditError)
    # force keeps it: the report comes back instead of the error.
    assert not guard.check(model, tokenizer, delta, REQUESTS, force=True).passed


def test_a_small_delta_passes():
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    report = DamageGuard(**PROBE).check(model, tokenizer, _delta(model, 1e-4), REQUESTS)
    assert report.passed and abs(report.perplexity_rise) < 0.01 and "within" in report.message
    assert json.loads(json.dumps(report.to_dict()))["passed"] is True


def test_neighbourhood_alone_can_reject():
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    delta = _delta(model, 0.05)
    loose = DamageGuard(**PROBE).measure(model, tokenizer, delta, REQUESTS)
    drop = loose.neighborhood_drop
    assert drop is not None and drop != 0
    strict = DamageGuard(**PROBE, max_perplexity_rise=1e6, max_neighborhood_drop=max(abs(drop) / 2, 1e-9))
    report = strict.measure(model, tokenizer, delta, REQUESTS)
    assert report.passed == (drop <= 0) and ("neighbourhood" in report.message)


# ------------------------------------------------------------------------------------------------ callback
def _rejecting_callback(**kwargs) -> KnowledgeEditCallback:
    # A limit no edit can meet: every edit is rejected, whatever the tiny model does.
    guard = DamageGuard(max_perplexity_rise=1e-12, max_neighborhood_drop=1e-12, **PROBE)
    return KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False,
                                 damage_guard=guard, **kwargs)


def test_callback_skips_a_rejected_edit_and_calls_the_hook(tmp_path):
    module, data = _module(lr=0.0), _data(tmp_path)
    callback = _rejecting_callback()
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[callback])
    before = _weights(module)
    with pytest.warns(UserWarning, match="rejected by the damage guard"):
        trainer.fit(module, data)
    assert callback.applied == () and len(callback.rejections) == 1
    assert all(torch.equal(before[k], v) for k, v in _weights(module).items())


def test_callback_raises_a_misconfiguration_by_option(tmp_path):
    module, data = _module(lr=0.0), _data(tmp_path)
    callback = _rejecting_callback(on_damage="raise")
    with pytest.raises(MisconfigurationException, match="--lambda.*--clamp.*--v-lr"):
        _trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, data)


def test_an_overridden_hook_decides_to_apply(tmp_path):
    class ApplyAnyway(KnowledgeEditCallback):
        def on_edit_rejected(self, trainer, pl_module, report):
            self.seen = report
            return True

    module, data = _module(lr=0.0), _data(tmp_path)
    guard = DamageGuard(max_perplexity_rise=1e-12, max_neighborhood_drop=1e-12, **PROBE)
    callback = ApplyAnyway(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False,
                           damage_guard=guard)
    _trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(module, data)
    assert [r.key for r in callback.applied] == ["fit_end"] and not callback.seen.passed


def test_callback_guard_arguments_are_checked():
    with pytest.raises(KeditError, match="on_damage"):
        KnowledgeEditCallback(REQUESTS, on_damage="ignore")
    with pytest.raises(KeditError, match="damage_guard"):
        KnowledgeEditCallback(REQUESTS, damage_guard="yes")


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def peaky_workspace(tmp_path_factory):
    from test_memit import statistics_for

    from lightning_kedit.models.fingerprint import model_fingerprint
    from lightning_kedit.requests import save_requests

    root = tmp_path_factory.mktemp("guard_cli")
    model, tokenizer = peaky("llama"), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_requests(REQUESTS, root / "requests.json")
    statistics_for(model, [1, 2]).save(root / "stats.safetensors", model_fingerprint(model, tokenizer, [1, 2]))
    return root


def _cli_edit(root, out, *extra):
    from lightning_kedit.cli import main

    return main(["edit", "--model", str(root / "model"), "--requests", str(root / "requests.json"), "--stats",
                 str(root / "stats.safetensors"), "--layers", "1,2", "--out", str(out), "--v-steps", "5", "--no-eval",
                 *extra])


# On the tiny model, these settings raise the probe perplexity by a few percent (a sane edit: well below 1e-6).
HARSH = ["--lambda", "1", "--clamp", "100", "--v-lr", "5", "--max-ppl-rise", "0.01"]


def test_cli_rejects_a_damaging_edit_exits_2_names_the_damage_and_writes_nothing(peaky_workspace, tmp_path, capsys,
                                                                                monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "edit.safetensors"
    assert _cli_edit(peaky_workspace, out, *HARSH) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kedit edit: error: edit rejected by the damage guard: probe perplexity") and "\n" not in err
    assert "limit +1%" in err and "raise --lambda / mom2_weight (now 1.0)" in err and "--clamp" in err
    assert "--v-lr / v_lr (now 5.0)" in err and "--layers (now [1, 2])" in err and "--force" in err
    assert not out.exists()
    # --force keeps it, with the warning on stderr and the report in the JSON.
    report = tmp_path / "edit.json"
    assert _cli_edit(peaky_workspace, out, *HARSH, "--force", "--json", str(report)) == 0
    assert "warning (--force): edit rejected by the damage guard" in capsys.readouterr().err
    guard = json.loads(report.read_text())["guard"]
    assert out.is_file() and guard["passed"] is False and guard["perplexity_rise"] > 0.01


def test_cli_sane_edit_passes_the_guard(peaky_workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    out, report = tmp_path / "edit.safetensors", tmp_path / "edit.json"
    sane = ["--lambda", "15000", "--clamp", "0.5", "--v-lr", "0.1", "--max-ppl-rise", "0.01"]
    assert _cli_edit(peaky_workspace, out, *sane, "--json", str(report)) == 0
    guard = json.loads(report.read_text())["guard"]
    assert guard["passed"] is True and abs(guard["perplexity_rise"]) < 1e-3 and out.is_file()
    assert "edit within the damage guard's limits" in capsys.readouterr().out
    assert "guard" in json.loads(report.read_text())["seconds"]


def test_cli_bad_guard_limit_exits_2(peaky_workspace, tmp_path, capsys):
    assert _cli_edit(peaky_workspace, tmp_path / "e.safetensors", "--max-ppl-rise", "-1") == 2
    assert "max_perplexity_rise" in capsys.readouterr().err
