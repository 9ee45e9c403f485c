from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from lightning_kedit import AdapterSpec, ModelAdapter, UnsupportedModelError, default_edit_layers, register_adapter
from lightning_kedit.models.adapters import ADAPTER_TABLE
from lightning_kedit.models.forward_hooks import capture_inputs, capture_outputs, first_tensor, run_until


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_adapter_resolves_every_part(model_type: str) -> None:
    model = tiny_model(model_type)
    adapter = ModelAdapter.for_model(model)
    assert adapter.num_layers == 4
    assert adapter.key_size == 64 and adapter.value_size == 32
    assert adapter.is_conv1d == (model_type == "gpt2")
    assert adapter.from_stored_layout(adapter.weight(1)).shape == (32, 64)
    assert adapter.weight_name(2) in dict(model.named_parameters())
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    proj = {f"out{i}": adapter.mlp_out(i) for i in range(4)}
    mlps = {f"mlp{i}": adapter.mlp(i) for i in range(4)}
    with capture_inputs(proj) as keys, capture_outputs(proj) as values, capture_outputs(mlps) as mlp_out:
        logits = model(ids).logits
    for i in range(4):
        k, v = keys[f"out{i}"][0], values[f"out{i}"][0]
        assert k.shape[-1] == 64 and v.shape[-1] == 32
        # The value is the projection of the key: W k (+ bias) with W viewed as out x in.
        weight = adapter.from_stored_layout(adapter.weight(i))
        bias = getattr(adapter.mlp_out(i), "bias", None)
        expected = k @ weight.T + (bias if bias is not None else 0)
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
        # The MLP's contribution to the residual stream is the projection's output.
        torch.testing.assert_close(mlp_out[f"mlp{i}"][0], v)
    # The final norm and the head reproduce the logits from the last block's output.
    with capture_outputs({"last": adapter.block(3)}) as last:
        model(ids)
    hidden = adapter.final_norm()(first_tensor(last["last"][0]))
    torch.testing.assert_close(adapter.lm_head()(hidden), logits, rtol=1e-4, atol=1e-4)
    assert adapter.embeddings().weight.shape[0] == model.config.vocab_size


def test_adapter_hooks_are_removed_even_on_error(llama) -> None:
    adapter = ModelAdapter.for_model(llama)
    with pytest.raises(RuntimeError), capture_inputs({"k": adapter.mlp_out(0)}):
        raise RuntimeError("boom")
    assert not adapter.mlp_out(0)._forward_pre_hooks


def test_run_until_stops_after_the_module(llama) -> None:
    adapter = ModelAdapter.for_model(llama)
    ran = []
    with capture_outputs({"b3": adapter.block(3)}) as seen:
        ran.append(run_until(llama, adapter.block(1), input_ids=torch.tensor([[1, 2, 3]])))
    assert ran == [None] and seen["b3"] == []
    assert not adapter.block(1)._forward_hooks


def test_unsupported_model_lists_types_and_how_to_register(llama) -> None:
    llama.config.model_type = "mystery"
    with pytest.raises(UnsupportedModelError, match="'mystery' is not supported.*llama") as info:
        ModelAdapter(llama)
    assert "register_adapter(" in str(info.value)
    register_adapter("mystery", ADAPTER_TABLE["llama"])
    try:
        assert ModelAdapter(llama).num_layers == 4
        with pytest.raises(ValueError, match="overwrite=True"):
            register_adapter("mystery", ADAPTER_TABLE["llama"])
    finally:
        del ADAPTER_TABLE["mystery"]


def test_wrong_spec_path_is_a_clear_error(llama) -> None:
    spec = AdapterSpec("model.layers", "mlp.nope", "self_attn", "mlp", "model.norm")
    with pytest.raises(UnsupportedModelError, match="no submodule 'mlp.nope'"):
        ModelAdapter(llama, spec)


def test_check_layers(llama) -> None:
    adapter = ModelAdapter.for_model(llama)
    assert adapter.check_layers([2, 1, 2]) == [1, 2]
    with pytest.raises(ValueError, match=r"outside the model: \[4\].*0\.\.3"):
        adapter.check_layers([1, 4])
    with pytest.raises(ValueError, match="empty"):
        adapter.check_layers([])


@pytest.mark.parametrize(("num_layers", "expected"), [(30, [4, 5, 6, 7, 8]), (28, [4, 5, 6, 7, 8]),
                                                      (4, [0, 1, 2]), (1, [0]), (12, [2, 3, 4, 5, 6])])
def test_default_edit_layers(num_layers: int, expected: list[int]) -> None:
    layers = default_edit_layers(num_layers)
    assert layers == expected
    assert all(0 <= i < num_layers for i in layers)
