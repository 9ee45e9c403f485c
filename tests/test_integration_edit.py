"""SmolLM2 end to end, kept fast: fluent prefixes, a 2-fact MEMIT edit that takes, atomic and reverted exactly."""

from __future__ import annotations

import re

import pytest
import torch

from lightning_kedit.editing import EditHyperParams, compute_edit, context_templates
from lightning_kedit.requests import bundled_corpus_path, bundled_requests

pytestmark = pytest.mark.integration


def test_prefixes_are_fluent_text(smollm2):
    model, tokenizer = smollm2
    templates = context_templates(model, tokenizer, ((10, 5),), seed=0)
    assert templates[0] == "{}" and len(templates) == 6
    for template in templates[1:]:
        prefix = template[: -len(". {}")]
        words = re.findall(r"[A-Za-z]+", prefix)
        assert len(words) >= 2, template
        assert prefix.isascii() or len(words) >= 3, template
        assert "<|" not in prefix and len(set(prefix.split())) > 1, template


def test_memit_edit_takes_and_reverts(smollm2):
    from lightning_kedit.evaluation.request_evaluation import evaluate_requests
    from lightning_kedit.statistics import collect_key_statistics

    model, tokenizer = smollm2
    requests = bundled_requests()[:2]
    hp = EditHyperParams.for_model(model, "memit").replace(v_steps=10, prefix_lengths=((10, 2),))
    stats = collect_key_statistics(model, tokenizer, list(hp.layers), source=bundled_corpus_path(), max_tokens=2048)
    before = {k: v.clone() for k, v in model.state_dict().items() if "mlp.down_proj" in k}
    start = evaluate_requests(model, tokenizer, requests)
    delta = compute_edit(model, tokenizer, requests, hparams=hp, statistics=stats)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with delta.applied(model):
        after = evaluate_requests(model, tokenizer, requests)
    assert after["efficacy"] == 1.0 > start["efficacy"]
    assert after["efficacy_prob"] > start["efficacy_prob"] + 0.3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
