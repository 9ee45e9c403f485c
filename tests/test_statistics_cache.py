"""Statistics files: round trip, refusal of another model or other layers, atomic writes, the cache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from lightning_kedit.errors import KeditError, StatisticsMismatchError
from lightning_kedit.models.fingerprint import model_fingerprint, weights_hash
from lightning_kedit.statistics import KeyStatistics, collect_key_statistics, load_or_collect_statistics

LAYERS = [1, 2]


def _batches(seed: int = 0) -> list[torch.Tensor]:
    return [torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(seed))]


@pytest.fixture
def saved(tmp_path, tokenizer):
    model = tiny_model("llama")
    stats = collect_key_statistics(model, tokenizer, LAYERS, _batches())
    path = stats.save(tmp_path / "stats.safetensors", model_fingerprint(model, tokenizer, LAYERS), source="unit")
    return model, stats, path


def test_round_trip_is_exact(saved, tokenizer):
    model, stats, path = saved
    loaded = KeyStatistics.load(path, model=model, tokenizer=tokenizer)
    assert loaded.layers == LAYERS and loaded.source == "unit"
    assert loaded.fingerprint == model_fingerprint(model, tokenizer, LAYERS)
    for layer in LAYERS:
        assert loaded.count(layer) == stats.count(layer)
        assert torch.equal(loaded.second_moment(layer), stats.second_moment(layer))
        assert torch.equal(loaded.mean(layer), stats.mean(layer))


def test_loaded_statistics_keep_accumulating(saved):
    model, _, path = saved
    loaded = KeyStatistics.load(path)
    more = collect_key_statistics(model, None, LAYERS, _batches(1))
    whole = collect_key_statistics(model, None, LAYERS, _batches() + _batches(1))
    loaded.merge(more)
    for layer in LAYERS:
        assert loaded.count(layer) == whole.count(layer)
        assert torch.allclose(loaded.second_moment(layer), whole.second_moment(layer), rtol=1e-12, atol=0)


def test_subset_of_layers_is_selected(saved):
    _, stats, path = saved
    loaded = KeyStatistics.load(path, layers=[2])
    assert loaded.layers == [2]
    assert torch.equal(loaded.second_moment(2), stats.second_moment(2))


def test_other_layers_refused_even_with_force(saved):
    _, _, path = saved
    with pytest.raises(StatisticsMismatchError, match=r"hold layers \[1, 2\], not \[3\].*kedit stats"):
        KeyStatistics.load(path, layers=[2, 3], force=True)


def test_other_weights_refused_unless_forced(saved, tokenizer):
    _, stats, path = saved
    other = tiny_model("llama", seed=1)
    with pytest.raises(StatisticsMismatchError, match=r"weights: stored .*--force") as info:
        KeyStatistics.load(path, model=other, tokenizer=tokenizer)
    assert "model_type" not in str(info.value)
    forced = KeyStatistics.load(path, model=other, tokenizer=tokenizer, force=True)
    assert torch.equal(forced.second_moment(1), stats.second_moment(1))


def test_other_architecture_refused(saved):
    _, _, path = saved
    with pytest.raises(StatisticsMismatchError, match="model_type: stored 'llama', current 'gpt2'"):
        KeyStatistics.load(path, model=tiny_model("gpt2"))


def test_other_tokenizer_refused(saved, tokenizer):
    model, _, path = saved

    class Other:
        all_special_tokens = ("<eos>",)

        def get_vocab(self):
            return {"x": 0}

    with pytest.raises(StatisticsMismatchError, match="tokenizer"):
        KeyStatistics.load(path, model=model, tokenizer=Other())


def test_missing_and_corrupt_files_refused(tmp_path):
    with pytest.raises(KeditError, match="does not exist"):
        KeyStatistics.load(tmp_path / "absent.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(KeditError, match="not a readable safetensors file"):
        KeyStatistics.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(KeditError, match="not a key statistics file"):
        KeyStatistics.load(tmp_path / "other.safetensors")


def test_interrupted_write_leaves_old_file(saved, monkeypatch):
    _, stats, path = saved
    before = path.read_bytes()

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        stats.save(path, None)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_load_or_collect_uses_the_cache(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path))
    model = tiny_model("gpt2")
    text = tmp_path / "t.txt"
    text.write_text("The Eiffel Tower is located in Paris. Berlin is the capital of Germany.\n" * 5)
    first = load_or_collect_statistics(model, tokenizer, [0, 1], source=text, max_tokens=60, window=16)
    files = list((tmp_path / "stats").glob("*.safetensors"))
    assert len(files) == 1

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr("lightning_kedit.statistics.collection.collect_key_statistics", fail)
    again = load_or_collect_statistics(model, tokenizer, [0, 1], source=text, max_tokens=60, window=16)
    assert torch.equal(again.second_moment(1), first.second_moment(1))
    with pytest.raises(AssertionError, match="cache"):
        load_or_collect_statistics(model, tokenizer, [0, 1], source=text, max_tokens=60, window=16, force=True)
    with pytest.raises(AssertionError, match="cache"):  # another budget is another cache entry
        load_or_collect_statistics(model, tokenizer, [0, 1], source=text, max_tokens=61, window=16)


def test_weights_hash_sees_one_changed_value():
    weight = torch.randn(4, 4)
    changed = weight.clone()
    changed[2, 3] += 1e-6
    assert weights_hash(weight) != weights_hash(changed)
    assert weights_hash(weight) == weights_hash(weight.clone())
    assert weights_hash(weight.to(torch.bfloat16)) != weights_hash(weight)


def test_product_dtype_is_kept_in_the_file(tmp_path):
    stats = KeyStatistics([0], 3, product_dtype=torch.float32)
    stats.update(0, torch.randn(5, 3))
    loaded = KeyStatistics.load(stats.save(tmp_path / "s.safetensors", None))
    assert loaded.product_dtype == torch.float32 and loaded.state_dtype == torch.float64
