"""Defaults come from the exact model (weights digest), never its family or layer count; `kedit info` shows them."""

from __future__ import annotations

import json

import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.cli import main
from lightning_kedit.editing import hparams as hparams_module
from lightning_kedit.editing.hparams import LIFELONG_PRESERVE_FACTOR, EditHyperParams
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import model_digest


def test_a_30_layer_llama_that_is_not_smollm2_gets_no_tested_setting():
    model = tiny_model("llama", num_layers=30)
    defaults = EditHyperParams.for_model(model, "memit")
    key_size = ModelAdapter.for_model(model).key_size
    # λ derived from the model: key size / 16, relative to the mean diagonal of C.
    assert defaults.layers == (4, 5, 6, 7, 8) and defaults.mom2_weight == key_size / 16 and defaults.lambda_relative
    assert EditHyperParams.default_sources(model)["mom2_weight"].startswith("derived")
    assert EditHyperParams.for_model(model, "alphaedit").extra["preserve_weight"] == key_size / 16
    # A λ given by the user is absolute, as the MEMIT papers and `kedit edit --lambda` write it.
    assert not defaults.with_overrides({"mom2_weight": 15000.0}).lambda_relative
    assert defaults.with_overrides({"mom2_weight": 50.0, "lambda_relative": True}).lambda_relative


def test_a_new_lambda_carries_into_the_preservation_weight_that_defaults_to_it():
    # λ₀ (AlphaEdit's and the lifelong method's preserve_weight) is MEMIT's λ by default and is read on the
    # same scale of C: `--lambda 15000` (absolute) must not leave λ₀ at the relative key size / 16.
    model = tiny_model("llama", num_layers=30)
    key_size = ModelAdapter.for_model(model).key_size
    for method, factor in (("alphaedit", 1.0), ("lifelong", LIFELONG_PRESERVE_FACTOR)):
        defaults = EditHyperParams.for_model(model, method)
        assert defaults.extra["preserve_weight"] == defaults.mom2_weight == factor * key_size / 16
        given = defaults.with_overrides({"mom2_weight": 15000.0})
        assert given.extra["preserve_weight"] == 15000.0 and not given.lambda_relative
        assert defaults.with_overrides({"v_steps": 3}).extra["preserve_weight"] == factor * key_size / 16
        # An explicit λ₀, given with λ or set before, is the user's and stays.
        both = defaults.with_overrides({"mom2_weight": 15000.0, "extra": {**defaults.extra, "preserve_weight": 2.0}})
        assert both.extra["preserve_weight"] == 2.0
        own = defaults.replace(extra={**defaults.extra, "preserve_weight": 7.0})
        assert own.with_overrides({"mom2_weight": 15000.0}).extra["preserve_weight"] == 7.0


def test_a_tested_setting_applies_to_its_exact_checkpoint_only(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setitem(hparams_module.TESTED_SETTINGS, model_digest(model), {"memit": {"mom2_weight": 123.0,
                                                                                       "layers": (1, 2)}})
    defaults = EditHyperParams.for_model(model, "memit")
    assert defaults.mom2_weight == 123.0 and defaults.layers == (1, 2) and not defaults.lambda_relative
    assert EditHyperParams.for_model(model, "alphaedit").extra["preserve_weight"] == 123.0
    sources = EditHyperParams.default_sources(model)
    assert sources["mom2_weight"].startswith("tested") and sources["clamp_norm"].startswith("reference")
    # One changed weight is another checkpoint: the tested setting no longer applies.
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert EditHyperParams.for_model(model, "memit").mom2_weight == ModelAdapter.for_model(model).key_size / 16


def test_kedit_info_shows_defaults_sources_and_what_can_edit(tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    assert main(["info", "--model", str(folder), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["memit_defaults"]["layers"]["source"].startswith("derived")
    assert info["memit_defaults"]["mom2_weight"] == {"value": 64 / 16,  # the tiny llama's key size / 16
                                                     "source": "derived: key size / 16, relative to mean(diag C)"}
    assert info["editable_by"].startswith("memit, rome") and len(info["digest"]) == 16
    assert "memit mom2_weight" in capsys.readouterr().out
