"""SmolLM2 + 10 real CounterFact facts: the delta as a PEFT LoRA adapter is the edited model, and reads back exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import shared_data
from peft import PeftModel

from lightning_kedit import load_requests
from lightning_kedit.editing import EditHyperParams, compute_edit
from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.requests import bundled_corpus_path

pytestmark = pytest.mark.integration


def _logits(model: torch.nn.Module, tokenizer, requests) -> torch.Tensor:
    batch = tokenizer([r.prompt.format(r.subject) for r in requests], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_delta_as_peft_adapter_on_a_fresh_smollm2_is_the_edited_model(smollm2, tmp_path):
    from lightning_kedit.statistics import collect_key_statistics

    base, tokenizer = smollm2
    requests = load_requests(shared_data("counterfact", "counterfact-val.json"), n=10)
    hp = EditHyperParams.for_model(base, "memit").replace(v_steps=10, prefix_lengths=((10, 2),))
    stats = collect_key_statistics(base, tokenizer, list(hp.layers), source=bundled_corpus_path(), max_tokens=2048)
    delta = compute_edit(base, tokenizer, requests, hparams=hp, statistics=stats)
    with delta.applied(base):
        expected = _logits(base, tokenizer, requests)
        edited_metrics = evaluate_requests(base, tokenizer, requests)
        edited = {n: p.detach().clone() for n, p in base.named_parameters() if "down_proj" in n}
    unedited = evaluate_requests(base, tokenizer, requests)
    assert edited_metrics["efficacy"] > unedited["efficacy"]

    folder = delta.to_peft(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    assert (_logits(peft_model, tokenizer, requests) - expected).abs().max().item() < 1e-3
    via_adapter = evaluate_requests(peft_model, tokenizer, requests)
    for key in ("efficacy", "paraphrase", "neighborhood"):
        assert via_adapter[key] == pytest.approx(edited_metrics[key]), key
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for name, weight in edited.items():
        assert (merged[name] - weight).abs().max().item() < 1e-6, name

    back = EditDelta.from_peft(folder, base)  # base hashes checked against the session's unedited SmolLM2
    assert back.layers == delta.layers and back.request_ids == delta.request_ids
    with back.applied(base):
        assert (_logits(base, tokenizer, requests) - expected).abs().max().item() < 1e-3
        assert evaluate_requests(base, tokenizer, requests)["efficacy"] == edited_metrics["efficacy"]
