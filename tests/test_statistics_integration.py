"""Key statistics of the real SmolLM2 on real text: a short pass, checked against explicit keys, cached."""

from __future__ import annotations

import pytest
import torch
from conftest import shared_data

from lightning_kedit.errors import StatisticsMismatchError
from lightning_kedit.evaluation.text_windows import text_windows, window_batches
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import model_fingerprint
from lightning_kedit.models.forward_hooks import capture_inputs, run_until
from lightning_kedit.statistics import KeyStatistics, collect_key_statistics

pytestmark = pytest.mark.integration

LAYERS = [4, 8]


def test_smollm2_statistics_match_explicit_keys(smollm2, tmp_path):
    model, tokenizer = smollm2
    text = shared_data("text", "wikitext2_valid.txt")
    batches = list(window_batches(text_windows(tokenizer, text, 64, max_tokens=200), 2, tokenizer.pad_token_id))
    stats = collect_key_statistics(model, tokenizer, LAYERS, text, max_tokens=200, window=64, batch_size=2)
    assert stats.count(4) == stats.count(8) == 200

    adapter = ModelAdapter.for_model(model)
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    for ids, mask in batches:
        with torch.no_grad(), capture_inputs({str(i): adapter.mlp_out(i) for i in LAYERS}) as seen:
            run_until(model, adapter.mlp_out(LAYERS[-1]), input_ids=ids, attention_mask=mask, use_cache=False)
        for layer in LAYERS:
            (x,) = seen[str(layer)]
            keys[layer].append(x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].double())
    for layer in LAYERS:
        k = torch.cat(keys[layer])
        expected = k.T @ k / k.shape[0]
        second = stats.second_moment(layer)
        assert second.shape == (adapter.key_size, adapter.key_size)
        assert float((second - expected).norm() / expected.norm()) < 1e-10

    path = stats.save(tmp_path / "smollm2.safetensors", model_fingerprint(model, tokenizer, LAYERS), source="wt2")
    assert torch.equal(KeyStatistics.load(path, model=model, tokenizer=tokenizer).second_moment(8), second)
    weight = adapter.weight(8)
    original = weight.data[0, 0].item()
    try:
        weight.data[0, 0] += 1e-3  # an edited model is another model for the cache
        with pytest.raises(StatisticsMismatchError, match="weights"):
            KeyStatistics.load(path, model=model, tokenizer=tokenizer)
    finally:
        weight.data[0, 0] = original
    assert KeyStatistics.load(path, model=model, tokenizer=tokenizer).count(4) == 200
