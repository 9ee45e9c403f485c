"""The damage guard on SmolLM2: a destructive edit is caught in the CLI and the callback.

Destructive: λ 1, clamp 100, v_lr 5, and nothing holding the target values back (no early stop, no KL, no weight
decay), so that δ grows far beyond the hidden state's scale. (λ 1, clamp 100, v_lr 5 alone, with the early stop,
leave SmolLM2's probe perplexity within +1% on 4 cases: the targets are reached before δ grows.)
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import shared_data
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_kedit import DamageGuard, EditHyperParams, compute_edit, load_requests
from lightning_kedit.cli import main
from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

pytestmark = pytest.mark.integration

DESTRUCTIVE = {"mom2_weight": 1.0, "clamp_norm": 100.0, "v_lr": 5.0, "stop_prob": 1.0, "kl_factor": 0.0,
               "weight_decay": 0.0}
DESTRUCTIVE_OPTIONS = ["--lambda", "1", "--clamp", "100", "--v-lr", "5", "--stop-prob", "1", "--kl", "0",
                       "--weight-decay", "0"]


def _requests():
    return load_requests(shared_data("counterfact", "counterfact-val.json"), n=4)


def test_cli_catches_the_destructive_edit_and_passes_the_default_one(tmp_path, capsys):
    requests = shared_data("counterfact", "counterfact-val.json")
    out = tmp_path / "bad.safetensors"
    common = ["edit", "--requests", str(requests), "--n", "4", "--no-eval"]
    assert main([*common, *DESTRUCTIVE_OPTIONS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "edit rejected by the damage guard: probe perplexity" in err and "raise --lambda" in err
    assert not out.exists()
    good, report = tmp_path / "good.safetensors", tmp_path / "good.json"
    assert main([*common, "--out", str(good), "--json", str(report)]) == 0
    guard = json.loads(report.read_text())["guard"]
    assert guard["passed"] and guard["perplexity_rise"] < 0.10 and good.is_file()
    assert guard["seconds"] > 0  # reported; its cost lives in benchmarks, never in a timed test


def test_guard_report_on_smollm2_and_weights_restored(smollm2):
    model, tokenizer = smollm2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    requests = _requests()
    delta = compute_edit(model, tokenizer, requests)
    harsh = EditHyperParams.for_model(model, "memit").replace(**DESTRUCTIVE)
    bad = compute_edit(model, tokenizer, requests, hparams=harsh)
    guard = DamageGuard()
    assert guard.measure(model, tokenizer, delta, requests).passed
    report = guard.measure(model, tokenizer, bad, requests)
    # On SmolLM2 this edit shows mostly in the neighbourhood (the probe perplexity rose 1.3% when measured).
    assert not report.passed and (report.perplexity_rise > 0.10 or report.neighborhood_drop > 0.10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_callback_catches_the_destructive_edit(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = copy.deepcopy(base)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The Eiffel Tower is in\n")
    callback = KnowledgeEditCallback(_requests(), hparams=DESTRUCTIVE, statistics=None, edit_at="predict_start",
                                     metrics=False, on_damage="raise")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback], default_root_dir=tmp_path)
    with pytest.raises(MisconfigurationException, match="rejected by the damage guard.*raise --lambda"):
        trainer.predict(KnowledgeEditModule(model, tokenizer=tokenizer), TextDataModule(predict_file=prompts))
    assert callback.applied == () and len(callback.rejections) == 1
