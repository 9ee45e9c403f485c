"""SmolLM2 LoRA fine-tune (PEFT) in a Lightning loop, then a MEMIT edit of 5 real CounterFact facts at fit end."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import shared_data
from lightning.pytorch import Callback, Trainer
from peft import LoraConfig, get_peft_model

from lightning_kedit import load_requests
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

pytestmark = pytest.mark.integration


class _Snapshot(Callback):
    """Every weight as training left it (before the edit at fit end)."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_lora_fine_tune_then_edit_at_fit_end_as_a_new_adapter(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    requests = load_requests(shared_data("counterfact", "counterfact-val.json"), n=5)
    start = evaluate_requests(model, tokenizer, requests)
    module = KnowledgeEditModule(model, tokenizer=tokenizer, learning_rate=1e-4)
    data = TextDataModule(train_files=shared_data("text", "wikitext2_valid.txt"), block_size=128,
                          max_tokens=128 * 4 * 4, batch_size=4, shuffle=False)
    callback = KnowledgeEditCallback(requests, statistics="train", edit_at="fit_end", metrics=["efficacy"],
                                     edit_as="adapter")
    snapshot = _Snapshot()
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, callbacks=[snapshot, callback],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert all(callback.statistics.count(layer) == 4 * 4 * 128 for layer in callback.statistics.layers)
    assert list(model.base_model.active_adapters) == ["default", "kedit_fit_end"]
    after = evaluate_requests(model, tokenizer, requests)
    assert after["efficacy"] >= 0.8 > start["efficacy"]
    assert callback.history[-1]["efficacy"] == pytest.approx(after["efficacy"])
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in snapshot.weights.items())  # base and trained LoRA untouched
