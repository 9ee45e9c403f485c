"""GGUF export: edited tensors are W + ΔW, everything else is copied byte for byte; bad inputs write nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.editing.layer_update import LayerUpdate, compact_update
from lightning_kedit.models.fingerprint import weights_hash
from lightning_kedit.models.gguf_export import GGUFExportError, export_gguf


def _gguf(path, arch: str = "llama") -> dict[str, np.ndarray]:
    """A small GGUF: a Q8_0 tensor, an F32 ffn_down on layer 1, metadata of several types."""
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((4, 64)).astype(np.float32),
               "blk.1.ffn_down.weight": rng.standard_normal((8, 32)).astype(np.float32)}
    writer = GGUFWriter(str(path), arch)
    writer.add_key_value(f"{arch}.block_count", 2, GGUFValueType.UINT32)
    writer.add_key_value("general.name", "tiny", GGUFValueType.STRING)
    writer.add_key_value("tokenizer.ggml.tokens", ["a", "b"], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", [1, 3], GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
    writer.add_key_value(f"{arch}.rope.freq_base", 1e4, GGUFValueType.FLOAT32)
    writer.add_tensor("token_embd.weight", quantize(tensors["token_embd.weight"], GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.1.ffn_down.weight", tensors["blk.1.ffn_down.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def _delta(base: np.ndarray, name: str = "model.layers.1.mlp.down_proj.weight") -> EditDelta:
    gen = torch.Generator().manual_seed(1)
    update = torch.randn(8, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 32, generator=gen,
                                                                                   dtype=torch.float64)
    record = LayerUpdate(1, name, weights_hash(torch.from_numpy(base)), None,
                         **compact_update(update * 0.1, (8, 32), 1))
    return EditDelta([record], method="memit")


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_edited_tensor_is_base_plus_update_and_the_rest_is_copied(tmp_path, dtype):
    tensors = _gguf(tmp_path / "src.gguf")
    delta = _delta(tensors["blk.1.ffn_down.weight"])
    result = export_gguf(tmp_path / "src.gguf", delta, tmp_path / "out.gguf", dtype=dtype)
    assert result["replaced"] == ["blk.1.ffn_down.weight"]
    source, out = GGUFReader(tmp_path / "src.gguf"), GGUFReader(tmp_path / "out.gguf")
    assert {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")} == \
        {k: f.contents() for k, f in out.fields.items() if not k.startswith("GGUF.")}
    assert [f.types for f in source.fields.values()] == [f.types for f in out.fields.values()]
    by_name = {t.name: t for t in out.tensors}
    embd = next(t for t in source.tensors if t.name == "token_embd.weight")
    assert by_name["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert by_name["token_embd.weight"].data.tobytes() == embd.data.tobytes()
    expected = tensors["blk.1.ffn_down.weight"].astype(np.float64) + delta.update(1).dense().numpy()  # naive sum
    edited = by_name["blk.1.ffn_down.weight"]
    assert edited.tensor_type == (GGMLQuantizationType.F32 if dtype == "f32" else GGMLQuantizationType.F16)
    tol = 1e-6 if dtype == "f32" else 2e-3
    np.testing.assert_allclose(np.asarray(edited.data, dtype=np.float64), expected, atol=tol, rtol=tol)


def test_bad_inputs_raise_and_write_nothing(tmp_path):
    tensors = _gguf(tmp_path / "src.gguf")
    delta = _delta(tensors["blk.1.ffn_down.weight"])
    out = tmp_path / "out.gguf"
    with pytest.raises(GGUFExportError, match="computed on base weights with hash"):
        export_gguf(tmp_path / "src.gguf", _delta(tensors["blk.1.ffn_down.weight"] + 1), out)
    with pytest.raises(GGUFExportError, match="another architecture"):
        gpt2_name = "transformer.h.1.mlp.c_proj.weight"
        export_gguf(tmp_path / "src.gguf", _delta(tensors["blk.1.ffn_down.weight"], gpt2_name), out)
    with pytest.raises(GGUFExportError, match="'f32' \\(exact\\) or 'f16'"):
        export_gguf(tmp_path / "src.gguf", delta, out, dtype="q4_1")
    _gguf(tmp_path / "bloom.gguf", arch="bloom")
    with pytest.raises(GGUFExportError, match="'bloom' GGUF"):
        export_gguf(tmp_path / "bloom.gguf", delta, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bloom.gguf", "src.gguf"]


def test_kedit_export_format_gguf_needs_a_gguf_model(tmp_path, monkeypatch):
    from tiny_models import tiny_model, tiny_tokenizer

    from lightning_kedit.cli import main

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    EditDelta.from_model(model, {1: torch.zeros(32, 64)}, method="memit").save(tmp_path / "d.safetensors")
    args = ["export", "--model", str(tmp_path / "model"), "--delta", str(tmp_path / "d.safetensors"),
            "--format", "gguf"]
    assert main([*args, "--out", str(tmp_path / "edited.gguf")]) == 2
    assert main([*args, "--out", str(tmp_path / "edited.bin")]) == 2
    assert not (tmp_path / "edited.gguf").exists() and not (tmp_path / "edited.bin").exists()
