"""SmolLM2 edited with the 10 bundled demo facts, exported as GGUF, reloaded by transformers: the edit is there."""

from __future__ import annotations

import pytest
import torch

from lightning_kedit.editing import EditHyperParams, compute_edit
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.gguf_export import export_gguf
from lightning_kedit.models.loading import resolve_model_spec
from lightning_kedit.requests import bundled_corpus_path, bundled_requests

pytestmark = pytest.mark.integration


def test_gguf_export_of_edited_smollm2_reloads_with_the_edit(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_kedit.statistics import collect_key_statistics

    model, tokenizer = smollm2
    requests = bundled_requests()
    hp = EditHyperParams.for_model(model, "memit").replace(v_steps=10, prefix_lengths=((10, 2),))
    stats = collect_key_statistics(model, tokenizer, list(hp.layers), source=bundled_corpus_path(), max_tokens=2048)
    delta = compute_edit(model, tokenizer, requests, hparams=hp, statistics=stats)
    before = evaluate_requests(model, tokenizer, requests)
    with delta.applied(model):
        edited = evaluate_requests(model, tokenizer, requests)
        weights = {layer: ModelAdapter.for_model(model).weight(layer).detach().clone() for layer in delta.layers}
    assert edited["efficacy"] > before["efficacy"]

    _, source = resolve_model_spec("smollm2")
    out = tmp_path / "edited.gguf"
    result = export_gguf(source, delta, out)
    assert len(result["replaced"]) == len(delta.layers)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name, dtype=torch.float32).eval()
    adapter = ModelAdapter.for_model(reloaded)
    for layer, weight in weights.items():
        assert torch.equal(adapter.weight(layer), weight), layer
    again = evaluate_requests(reloaded, tokenizer, requests)
    for key in ("efficacy", "paraphrase", "neighborhood"):
        assert again[key] == pytest.approx(edited[key]), key
    for request in requests:  # greedy completion: the new target's first token
        ids = tokenizer(request.prompt.format(request.subject), return_tensors="pt").input_ids
        with torch.no_grad():
            token = reloaded(input_ids=ids).logits[0, -1].argmax().item()
        with delta.applied(model), torch.no_grad():
            assert token == model(input_ids=ids).logits[0, -1].argmax().item()
