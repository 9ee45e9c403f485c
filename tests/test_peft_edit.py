"""Editing a PEFT-wrapped model: the edit sees the effective layers (base + LoRA) and is written into base weights."""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from lightning.pytorch import Callback
from peft import LoraConfig, get_peft_model
from test_memit import REQUESTS, statistics_for
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing import EditHyperParams, compute_edit
from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.serving.generation import generate_text


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "down_proj", "up_proj"]])
def test_memit_on_a_lora_model_equals_memit_on_its_merged_weights(targets):
    base, tokenizer = tiny_model("llama"), tiny_tokenizer()
    stats = statistics_for(base, [1, 2])
    wrapped = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    wrapped.eval()
    merged = copy.deepcopy(wrapped).merge_and_unload().eval()  # an independent plain model with the same function
    adapter = ModelAdapter.for_model(wrapped)
    assert adapter.weight_name(1) == "model.layers.1.mlp.down_proj.weight"
    assert adapter.weight(1) is ModelAdapter.for_model(base).weight(1)  # the base weight, not the LoRA factors
    # In float32: the bfloat16 phase (on by default on a CPU with native bfloat16) rounds the LoRA sum W + BA
    # and the merged weight differently, which the optimisation then carries into the targets.
    hp = EditHyperParams.for_model(merged, "memit").replace(layers=(1, 2), v_steps=5, v_bfloat16=False)
    on_wrapped = compute_edit(wrapped, tokenizer, REQUESTS, hparams=hp, statistics=stats)
    on_merged = compute_edit(merged, tokenizer, REQUESTS, hparams=hp, statistics=stats)
    for layer in (1, 2):
        torch.testing.assert_close(on_wrapped.update(layer).dense(), on_merged.update(layer).dense(),
                                   atol=1e-5, rtol=1e-4)

    lora = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
    ids = torch.arange(1, 9).reshape(1, 8)
    with on_merged.applied(merged), torch.no_grad():
        expected = merged(input_ids=ids).logits
    on_wrapped.apply(wrapped)  # into the base weights; the LoRA factors are untouched
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(p, lora[n]) for n, p in wrapped.named_parameters() if "lora_" in n)
    assert on_wrapped.revert(wrapped).exact


def test_edit_as_a_new_adapter_leaves_base_and_lora_weights_untouched():
    from lightning_kedit.editing.delta import DeltaError
    from lightning_kedit.editing.peft_adapter import add_delta_adapter

    base, tokenizer = tiny_model("llama"), tiny_tokenizer()
    stats = statistics_for(base, [1, 2])
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    wrapped.eval()
    hp = EditHyperParams.for_model(wrapped, "memit").replace(layers=(1, 2), v_steps=5)
    delta = compute_edit(wrapped, tokenizer, REQUESTS, hparams=hp, statistics=stats)
    ids = torch.arange(1, 9).reshape(1, 8)
    with delta.applied(wrapped), torch.no_grad():
        expected = wrapped(input_ids=ids).logits
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters()}
    add_delta_adapter(wrapped, delta, "facts")
    assert list(wrapped.base_model.active_adapters) == ["default", "facts"]
    with torch.no_grad():
        torch.testing.assert_close(wrapped(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    params = dict(wrapped.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in before.items())  # base weights and the LoRA untouched
    assert all(not p.requires_grad for n, p in params.items() if ".facts." in n)
    assert any(p.requires_grad for n, p in params.items() if ".default." in n)  # the fine-tune's LoRA still trains
    with pytest.raises(DeltaError, match="already has an adapter named 'facts'"):
        add_delta_adapter(wrapped, delta, "facts")
    with pytest.raises(DeltaError, match="needs a peft.PeftModel"):
        add_delta_adapter(tiny_model("llama"), delta)


def test_callback_edits_a_lora_fine_tune_at_fit_end_in_the_base_weights(tmp_path):
    from test_lightning_callback import FAST, LAYERS, _data, _trainer
    from test_lightning_callback import REQUESTS as FACTS

    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    module = KnowledgeEditModule(model, tokenizer=tiny_tokenizer(), learning_rate=1e-2)
    callback = KnowledgeEditCallback(FACTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, _data(tmp_path))
    assert [record.key for record in callback.applied] == ["fit_end"]
    assert all(callback.statistics.count(layer) > 0 for layer in LAYERS)  # hooks on the LoRA layers saw batches
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    base_changed = {n for n in changed if "lora_" not in n}
    assert base_changed == {f"base_model.model.model.layers.{layer}.mlp.down_proj.base_layer.weight"
                            for layer in LAYERS}
    assert any("lora_B" in n for n in changed)  # the fine-tune trained its LoRA


class _LoraSnapshot(Callback):
    """The trained weights as fit left them, before the callback's edit at fit end."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}


def test_callback_edit_as_adapter_adds_one_adapter_and_reverts_it(tmp_path):
    from test_lightning_callback import FAST, LAYERS, _data, _trainer
    from test_lightning_callback import REQUESTS as FACTS

    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    module = KnowledgeEditModule(model, tokenizer=tiny_tokenizer(), learning_rate=1e-2)
    callback = KnowledgeEditCallback(FACTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False,
                                     damage_guard=False, edit_as="adapter", save_delta_to=tmp_path / "deltas")
    snapshot = _LoraSnapshot()
    _trainer(tmp_path, max_steps=3, callbacks=[snapshot, callback]).fit(module, _data(tmp_path))
    assert list(model.base_model.active_adapters) == ["default", "kedit_fit_end"]
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in snapshot.weights.items())  # base and trained LoRA untouched
    # The new adapter computes the saved delta: base + LoRA + adapter == (base + delta) + LoRA.
    delta = EditDelta.load(callback.applied[0].path)
    ids = torch.arange(1, 9).reshape(1, 8)
    model.eval()
    with torch.no_grad():
        edited = model(input_ids=ids).logits
        model.base_model.set_adapter(["default"])
        with delta.applied(model):
            expected = model(input_ids=ids).logits
    model.base_model.set_adapter(["default", "kedit_fit_end"])
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=1e-5)
    trainer = _trainer(tmp_path, max_steps=1, callbacks=[callback])
    trainer.strategy.connect(module)
    assert callback.revert(trainer) == 1
    assert "kedit_fit_end" not in model.peft_config and list(model.base_model.active_adapters) == ["default"]
    assert all(torch.equal(dict(model.named_parameters())[n], p) for n, p in snapshot.weights.items())


def test_callback_edit_as_adapter_refuses_a_plain_model_and_bad_names(tmp_path):
    from test_lightning_callback import LAYERS, _data, _trainer
    from test_lightning_callback import REQUESTS as FACTS

    from lightning_kedit.errors import KeditError
    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule

    with pytest.raises(KeditError, match="`edit_as` must be one of"):
        KnowledgeEditCallback(FACTS, edit_as="lora")
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = KnowledgeEditCallback(FACTS, layers=LAYERS, statistics="train", metrics=False, edit_as="adapter")
    with pytest.raises(KeditError, match="edit_as='adapter' needs a peft.PeftModel, got LlamaForCausalLM"):
        _trainer(tmp_path, max_steps=1, callbacks=[callback]).fit(
            KnowledgeEditModule(model, tokenizer=tiny_tokenizer()), _data(tmp_path))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_peft_model_gets_its_transformers_forward_arguments():
    """A PeftModel's forward takes **kwargs: the cache and logits arguments come from the wrapped model's forward
    (reading PeftModel.forward gave ``past_key_values``, which transformers 5.40 removes)."""
    from lightning_kedit.models.adapters import forward_parameters, kv_cache_argument

    model = tiny_model("llama")
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    assert kv_cache_argument(wrapped) == kv_cache_argument(model) == expected
    assert set(forward_parameters(wrapped)) == set(inspect.signature(model.forward).parameters)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # a deprecated cache keyword would raise here
        completion = generate_text(wrapped, tiny_tokenizer(), "the cat", max_tokens=4)
    assert completion.tokens == generate_text(model, tiny_tokenizer(), "the cat", max_tokens=4).tokens  # B = 0
