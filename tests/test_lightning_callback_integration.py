"""The callback on SmolLM2: fine-tune a few steps, edit 5 real CounterFact facts at fit end, and the edit takes."""

from __future__ import annotations

import copy
import csv

import pytest
from conftest import shared_data
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_kedit import load_requests
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

pytestmark = pytest.mark.integration


def test_fine_tune_then_edit_at_fit_end_takes_and_is_logged(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = copy.deepcopy(base)  # the session's model stays unedited for the other tests
    requests = load_requests(shared_data("counterfact", "counterfact-val.json"), n=5)
    start = evaluate_requests(model, tokenizer, requests)

    module = KnowledgeEditModule(model, tokenizer=tokenizer, learning_rate=1e-5)
    data = TextDataModule(train_files=shared_data("text", "wikitext2_valid.txt"), block_size=128,
                          max_tokens=128 * 8 * 6, batch_size=8, shuffle=False)
    callback = KnowledgeEditCallback(requests, statistics="train", edit_at="fit_end",
                                     metrics=["efficacy", "paraphrase", "neighborhood"])
    trainer = Trainer(accelerator="cpu", max_steps=6, logger=CSVLogger(tmp_path, name="logs"), callbacks=[callback],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, data)

    # The statistics came from the training batches: 6 steps of 8 blocks of 128 tokens.
    assert callback.statistics is not None
    assert all(callback.statistics.count(layer) == 6 * 8 * 128 for layer in callback.statistics.layers)
    assert len(callback.applied) == 1
    after = evaluate_requests(model, tokenizer, requests)
    assert after["efficacy"] >= 0.8 > start["efficacy"]
    assert callback.history[-1]["efficacy"] == pytest.approx(after["efficacy"])

    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    logged = {key: float(value) for row in rows for key, value in row.items() if value}
    assert logged["edit/efficacy"] == pytest.approx(after["efficacy"])
    assert {"edit/efficacy_before", "edit/paraphrase", "edit/neighborhood", "train_loss"} <= set(logged)
