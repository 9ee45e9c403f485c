"""EditDelta <-> PEFT LoRA adapter: exactness against PeftModel, rank pattern, side-by-side adapters, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_model

from lightning_kedit.editing.delta import DeltaError, DeltaFileError, DeltaMismatchError, EditDelta
from lightning_kedit.editing.peft_adapter import SIDECAR
from lightning_kedit.editing.solvers import LowRankUpdate
from lightning_kedit.models.adapters import ModelAdapter

ARCHS = ["llama", "gpt2"]


def _delta(model: torch.nn.Module, seed: int = 0, dense_layer: int | None = None) -> EditDelta:
    """Rank-2 factors on layers 1 and 2 (plus a dense update on ``dense_layer``)."""
    adapter = ModelAdapter.for_model(model)
    gen = torch.Generator().manual_seed(seed)
    updates: dict[int, torch.Tensor | LowRankUpdate] = {}
    for layer, rank in ((1, 2), (2, 3)):
        u = torch.randn(adapter.value_size, rank, generator=gen, dtype=torch.float64) * 0.1
        v = torch.randn(adapter.key_size, rank, generator=gen, dtype=torch.float64) * 0.1
        updates[layer] = LowRankUpdate(u, v)
    if dense_layer is not None:
        updates[dense_layer] = torch.randn(adapter.value_size, adapter.key_size, generator=gen,
                                           dtype=torch.float64) * 0.05
    return EditDelta.from_model(model, updates, method="memit", request_ids=["a", "b"])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(1, 13).reshape(2, 6) % 60 + 1
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_model_of_the_adapter_equals_the_applied_delta(arch, tmp_path):
    model = tiny_model(arch)
    delta = _delta(model, dense_layer=3)
    folder = delta.to_peft(tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    names = [delta.update(layer).weight_name.removesuffix(".weight") for layer in delta.layers]
    assert sorted(config["target_modules"]) == sorted(names)
    dense_rank = min(ModelAdapter.for_model(model).value_size, ModelAdapter.for_model(model).key_size)
    assert config["rank_pattern"] == dict(zip(names, [2, 3, dense_rank], strict=True))
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert config["fan_in_fan_out"] is (arch == "gpt2")

    with delta.applied(model):
        expected = _logits(model)
        edited = {n: p.detach().clone() for n, p in model.named_parameters()}
    base = tiny_model(arch)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    torch.testing.assert_close(_logits(peft_model), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(tiny_model(arch)), expected, atol=1e-3)  # the delta changes the logits
    merged = dict(peft_model.merge_and_unload().named_parameters())
    for name, weight in edited.items():
        torch.testing.assert_close(merged[name], weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_in_float64_is_exact_and_keeps_the_history(arch, tmp_path):
    model = tiny_model(arch)
    delta = _delta(model, dense_layer=0)
    back = EditDelta.from_peft(delta.to_peft(tmp_path / "a", dtype=torch.float64), model)
    assert back.layers == delta.layers and back.method == "memit" and back.request_ids == ("a", "b")
    for layer in delta.layers:
        assert torch.equal(back.update(layer).dense(), delta.update(layer).dense())
        assert back.update(layer).base_hash == delta.update(layer).base_hash
        assert back.update(layer).result_hash == delta.update(layer).result_hash
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    back.apply(model)
    report = back.revert(model)
    assert report.exact
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    EditDelta.compose([back, _delta(model, seed=1)], force=True)  # composes like any delta


def test_float32_round_trip_is_within_float32_rounding(tmp_path):
    model = tiny_model("llama")
    delta = _delta(model)
    back = EditDelta.from_peft(delta.to_peft(tmp_path / "a"), model)
    for layer in delta.layers:
        torch.testing.assert_close(back.update(layer).dense(), delta.update(layer).dense(), atol=1e-7, rtol=1e-6)


def test_rank_pattern_pads_with_zeros_and_refuses_a_rank_too_small(tmp_path):
    model = tiny_model("llama")
    delta = _delta(model)
    folder = delta.to_peft(tmp_path / "a", rank={1: 4}, dtype=torch.float64)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) == [3, 4]
    back = EditDelta.from_peft(folder, model)
    assert torch.equal(back.update(1).dense(), delta.update(1).dense())
    with pytest.raises(DeltaError, match="rank 2 cannot express the update exactly.*need rank 3"):
        delta.to_peft(tmp_path / "b", rank=2)
    with pytest.raises(DeltaError, match="does not edit"):
        delta.to_peft(tmp_path / "c", rank={7: 4})
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left behind


def test_several_deltas_load_side_by_side_as_named_adapters(tmp_path):
    model = tiny_model("llama")
    first, second = _delta(model, seed=1), _delta(model, seed=2)
    expected = []
    for delta in (first, second):
        with delta.applied(model):
            expected.append(_logits(model))
    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(first.to_peft(tmp_path / "one")),
                                           adapter_name="one")
    peft_model.load_adapter(str(second.to_peft(tmp_path / "two")), adapter_name="two")
    peft_model.eval()
    for name, logits in zip(("one", "two"), expected, strict=True):
        peft_model.set_adapter(name)
        torch.testing.assert_close(_logits(peft_model), logits, atol=1e-5, rtol=0)


def test_an_adapter_for_other_base_weights_is_refused_naming_the_hashes(tmp_path):
    model = tiny_model("llama")
    delta = _delta(model)
    folder = delta.to_peft(tmp_path / "a")
    other = tiny_model("llama", seed=5)
    with pytest.raises(DeltaMismatchError, match=delta.update(1).base_hash):
        EditDelta.from_peft(folder, other)
    delta.apply(model)  # the edited model is not the base either
    with pytest.raises(DeltaMismatchError, match="hash"):
        EditDelta.from_peft(folder, model)


def test_existing_folder_and_bad_adapters_are_refused(tmp_path):
    model = tiny_model("llama")
    delta = _delta(model)
    folder = delta.to_peft(tmp_path / "a")
    with pytest.raises(DeltaError, match="exists"):
        delta.to_peft(folder)
    delta.to_peft(folder, overwrite=True)
    with pytest.raises(DeltaFileError, match="not a PEFT adapter folder"):
        EditDelta.from_peft(tmp_path, model)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(DeltaError, match="use_dora"):
        EditDelta.from_peft(folder, model)


def test_a_foreign_lora_on_attention_is_refused_and_one_on_the_projection_is_read(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = tiny_model("llama")
    attn = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    attn.save_pretrained(str(tmp_path / "attn"))
    with pytest.raises(DeltaError, match="q_proj"):
        EditDelta.from_peft(tmp_path / "attn", model)
    mlp = get_peft_model(tiny_model("llama"), LoraConfig(r=2, lora_alpha=6, target_modules=["down_proj"],
                                                         init_lora_weights=False))
    mlp.eval()
    expected = _logits(mlp)
    mlp.save_pretrained(str(tmp_path / "mlp"))
    assert not (tmp_path / "mlp" / SIDECAR).exists()
    delta = EditDelta.from_peft(tmp_path / "mlp", model)
    assert delta.method == "peft-lora" and delta.layers == [0, 1, 2, 3]
    with delta.applied(model):
        torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)


def test_kedit_export_format_peft_checks_the_base_and_writes_a_loadable_adapter(tmp_path, monkeypatch):
    from tiny_models import tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from lightning_kedit.cli import main

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    delta = _delta(model)
    delta.save(tmp_path / "edit.safetensors")
    out = tmp_path / "adapter"
    args = ["export", "--model", str(tmp_path / "model"), "--delta", str(tmp_path / "edit.safetensors")]
    assert main([*args, "--out", str(out), "--format", "peft"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    with delta.applied(model):
        expected = _logits(model)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"), str(out)).eval()
    torch.testing.assert_close(_logits(loaded), expected, atol=1e-5, rtol=0)

    other = tiny_model("llama", seed=3)
    other.save_pretrained(tmp_path / "other")
    tiny_tokenizer().save_pretrained(tmp_path / "other")
    other_args = ["export", "--model", str(tmp_path / "other"), "--delta", str(tmp_path / "edit.safetensors")]
    assert main([*other_args, "--out", str(tmp_path / "refused"), "--format", "peft"]) == 2
    assert not (tmp_path / "refused").exists()
