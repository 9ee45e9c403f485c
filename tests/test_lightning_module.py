"""KnowledgeEditModule and TextDataModule on a tiny Llama: fine-tuning, perplexity, generation, deltas."""

from __future__ import annotations

import json
import math

import pytest
import torch
from lightning.pytorch import Trainer
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.errors import KeditError
from lightning_kedit.lightning import KnowledgeEditModule, TextDataModule
from lightning_kedit.lightning.data import collate_blocks, collate_prompts
from lightning_kedit.lightning.module import token_nll

TEXT = (
    "The Eiffel Tower is located in Paris. Toko Yasuda plays the guitar. Danielle Darrieux speaks French. "
    "The capital of Italy is Rome. Michael Jordan plays basketball. Berlin is the capital of Germany. "
) * 6


def _trainer(**kwargs):
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return path


def test_token_nll_matches_a_naive_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4, 5], [6, 0, 1, -100, -100]])
    nll, count = token_nll(logits, labels)
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])
            if target != -100:
                expected -= float(torch.log_softmax(logits[b, t], -1)[target])
                n += 1
    assert int(count) == n == 6
    assert float(nll) == pytest.approx(expected, rel=1e-6)


def test_collate_blocks_masks_padding_in_labels():
    batch = collate_blocks([torch.tensor([3, 4, 5]), torch.tensor([6])], pad_id=0)
    assert batch["input_ids"].tolist() == [[3, 4, 5], [6, 0, 0]]
    assert batch["labels"].tolist() == [[3, 4, 5], [6, -100, -100]]


def test_collate_prompts_left_pads():
    tokenizer = tiny_tokenizer()
    batch = collate_prompts(["Paris", "The capital of Italy is"], tokenizer)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and bool(mask[1].all())
    assert batch["prompts"] == ["Paris", "The capital of Italy is"]


def test_fit_trains_and_validation_perplexity_is_token_weighted(text_file):
    model = tiny_model("llama", num_layers=2)
    module = KnowledgeEditModule(model, tokenizer=tiny_tokenizer(), learning_rate=1e-2)
    data = TextDataModule(train_files=text_file, val_files=text_file, block_size=37, batch_size=3, shuffle=False)
    before = module.model.lm_head.weight.detach().clone()
    trainer = _trainer(max_steps=4, num_sanity_val_steps=0)
    trainer.fit(module, data)
    assert not torch.equal(before, module.model.lm_head.weight)
    assert "train_loss" in trainer.callback_metrics

    # Perplexity from an independent pass: exp(total NLL / total predicted tokens) over all blocks.
    results = trainer.validate(module, data, verbose=False)[0]
    module.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for block in data.datasets["val"]:
            logits = module.model(block[None]).logits[0].double()
            log_probs = torch.log_softmax(logits[:-1], -1)
            total -= float(log_probs.gather(1, block[1:, None]).sum())
            count += len(block) - 1
    assert results["val_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert results["val_loss"] == pytest.approx(total / count, rel=1e-4)


def test_predict_generates_greedy_completions(tmp_path):
    tokenizer = tiny_tokenizer()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of Italy is\n\nParis\n")
    module = KnowledgeEditModule(tiny_model("llama", num_layers=2), tokenizer=tokenizer, max_new_tokens=4)
    out = _trainer().predict(module, TextDataModule(predict_file=prompts, batch_size=2))
    rows = [row for batch in out for row in batch]
    assert [row["prompt"] for row in rows] == ["The capital of Italy is", "Paris"]
    # The batched (left-padded) generation equals a greedy loop on the prompt alone.
    ids = tokenizer("Paris", return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, module.model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert rows[1]["completion"] == tokenizer.decode(ids[0, start:])


def test_predict_prompts_from_a_request_file(tmp_path):
    path = tmp_path / "requests.json"
    record = {"case_id": 1, "prompt": "{} plays the", "subject": "Toko Yasuda", "target_new": "piano",
              "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is a", "locality_prompt": "Paris is in",
              "locality_ground_truth": "France"}
    path.write_text(json.dumps([record]))
    data = TextDataModule(predict_file=path, tokenizer=tiny_tokenizer())
    data.setup("predict")
    assert list(data.datasets["predict"]) == ["Toko Yasuda plays the"]


def test_apply_delta_and_revert_are_exact():
    model = tiny_model("llama", num_layers=2)
    module = KnowledgeEditModule(model, tokenizer=tiny_tokenizer())
    before = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    delta = EditDelta.from_model(model, {1: torch.full((32, 64), 0.01)}, method="demo")
    module.apply_delta(delta)
    assert module.applied_deltas == (delta,)
    assert torch.allclose(model.model.layers[1].mlp.down_proj.weight, before + 0.01)
    assert module.revert() == [delta]
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)
    with pytest.raises(KeditError, match="not applied through this module"):
        module.revert(delta)


def test_user_errors_name_the_input(tmp_path):
    with pytest.raises(KeditError, match="train_files.*nope.txt"):
        TextDataModule(train_files=tmp_path / "nope.txt")
    with pytest.raises(KeditError, match="batch_size"):
        TextDataModule(batch_size=0)
    with pytest.raises(KeditError, match="tokenizer"):
        KnowledgeEditModule(tiny_model("llama", num_layers=2))
    with pytest.raises(KeditError, match="learning_rate"):
        KnowledgeEditModule(tiny_model("llama", num_layers=2), tokenizer=tiny_tokenizer(), learning_rate=-1.0)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    data = TextDataModule(predict_file=empty, tokenizer=tiny_tokenizer())
    with pytest.raises(KeditError, match="holds no prompts"):
        data.setup("predict")
    data = TextDataModule(tokenizer=tiny_tokenizer())
    data.setup("test")
    with pytest.raises(KeditError, match="no test data.*test_files"):
        data.test_dataloader()
