"""EditDelta: apply/revert exactness, atomicity, files, composition, on Linear (llama) and Conv1D (gpt2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_model

import lightning_kedit.editing.delta as delta_module
import lightning_kedit.editing.layer_update as layer_update_module
from lightning_kedit.editing.delta import (
    DeltaError,
    DeltaFileError,
    DeltaMismatchError,
    EditDelta,
    LayerUpdate,
    RevertReport,
)
from lightning_kedit.editing.solvers import LowRankUpdate
from lightning_kedit.models.adapters import ModelAdapter

ARCHS = ["llama", "gpt2"]


def _factors(model: torch.nn.Module, rank: int, seed: int, scale: float = 0.05) -> LowRankUpdate:
    adapter = ModelAdapter.for_model(model)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(adapter.value_size, rank, generator=gen, dtype=torch.float64) * scale
    v = torch.randn(adapter.key_size, rank, generator=gen, dtype=torch.float64)
    return LowRankUpdate(u, v)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    adapter = ModelAdapter.for_model(model)
    return [adapter.weight(layer).detach().clone() for layer in range(adapter.num_layers)]


def _same(model: torch.nn.Module, weights: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(_weights(model), weights, strict=True))


def _delta(model: torch.nn.Module, layers=(1, 2), rank: int = 2, seed: int = 0, **kw) -> EditDelta:
    updates = {layer: _factors(model, rank, seed + layer) for layer in layers}
    return EditDelta.from_model(model, updates, method="test", request_ids=["a", "b"], **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_adds_the_update_in_out_x_in_layout_and_revert_is_bit_exact(arch):
    model = tiny_model(arch)
    adapter = ModelAdapter.for_model(model)
    before = _weights(model)
    delta = _delta(model)
    delta.apply(model)
    for layer in (1, 2):
        expected = (adapter.from_stored_layout(before[layer]).double() + _factors(model, 2, layer).dense()).float()
        assert torch.equal(adapter.from_stored_layout(adapter.weight(layer)), expected)
    assert torch.equal(adapter.weight(0), before[0])
    report = delta.revert(model)
    assert report == RevertReport(exact=True, max_deviation={1: 0.0, 2: 0.0})
    assert _same(model, before)


def test_low_rank_factors_are_kept_only_when_smaller():
    model = tiny_model("llama")  # dv=32, dk=64: factors are smaller while 96 r < 2048, i.e. r <= 21
    assert _delta(model, layers=(0,), rank=21).update(0).rank == 21
    assert _delta(model, layers=(0,), rank=22).update(0).rank is None
    dense = _delta(model, layers=(0,), rank=22).update(0).dense()
    assert torch.allclose(dense, _factors(model, 22, 0).dense())


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_and_loaded_delta_applies_identically(arch, tmp_path):
    model, twin = tiny_model(arch), tiny_model(arch)
    delta = _delta(model, layers=(0, 3), rank=3, hparams={"lam": 1.5, "layers": [0, 3]})
    loaded = EditDelta.load(delta.save(tmp_path / "d.safetensors"))
    assert loaded.digest() == delta.digest()
    assert (loaded.method, loaded.request_ids, loaded.hparams) == ("test", ("a", "b"), {"lam": 1.5, "layers": [0, 3]})
    delta.apply(model)
    loaded.apply(twin)
    assert _same(twin, _weights(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_revert_from_a_file_with_base_is_exact_and_without_base_reports_the_deviation(arch, tmp_path):
    model = tiny_model(arch)
    before = _weights(model)
    delta = _delta(model, rank=4, keep_base=True)
    delta.save(tmp_path / "with.safetensors", with_base=True)
    delta.save(tmp_path / "without.safetensors")

    delta.apply(model)
    assert EditDelta.load(tmp_path / "with.safetensors").revert(model).exact
    assert _same(model, before)

    delta.apply(model)
    report = EditDelta.load(tmp_path / "without.safetensors").revert(model)
    adapter = ModelAdapter.for_model(model)
    for layer in (1, 2):
        error = float((adapter.weight(layer).detach() - before[layer]).abs().max())
        assert error <= report.max_deviation[layer]
        assert report.max_deviation[layer] < 1e-6
    assert report.exact == _same(model, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_mismatched_base_weights_are_refused_unless_forced(arch):
    model = tiny_model(arch)
    delta = _delta(model)
    other = tiny_model(arch, seed=1)
    before = _weights(other)
    with pytest.raises(DeltaMismatchError, match=r"layer 1 .*force"):
        delta.apply(other)
    assert _same(other, before)
    delta.apply(other, force=True)  # the kept originals still give a bit-exact revert
    assert delta.revert(other).exact and _same(other, before)


def test_applying_twice_is_refused_and_other_architectures_or_sizes_too():
    model = tiny_model("llama")
    delta = _delta(model)
    delta.apply(model)
    with pytest.raises(DeltaMismatchError, match="another delta is applied"):
        delta.apply(model)
    with pytest.raises(DeltaMismatchError, match="another architecture"):
        delta.apply(tiny_model("gpt2"), force=True)
    with pytest.raises(DeltaMismatchError, match="another architecture"):
        _delta(model, layers=(3,)).apply(tiny_model("llama", num_layers=2), force=True)
    other_vocab = _delta(tiny_model("llama"))
    other_vocab.fingerprint["vocab_size"] = "999"
    with pytest.raises(DeltaMismatchError, match="vocab_size: stored '999', current '320'"):
        other_vocab.apply(tiny_model("llama"))


def test_revert_is_refused_when_not_applied_or_when_a_later_delta_sits_on_top():
    model = tiny_model("llama")
    first = _delta(model, layers=(1,))
    with pytest.raises(DeltaMismatchError, match="not what applying"):
        first.revert(model)
    first.apply(model)
    second = _delta(model, layers=(1,), seed=5)
    second.apply(model)
    on_top = _weights(model)
    with pytest.raises(DeltaMismatchError, match="revert later deltas first"):
        first.revert(model)
    assert _same(model, on_top)
    second.revert(model)
    assert first.revert(model).exact


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("phase", ["compute", "write", "write-interrupt"])
def test_apply_is_atomic_when_a_phase_fails(arch, phase, monkeypatch):
    model = tiny_model(arch)
    before = _weights(model)
    delta = _delta(model, layers=(0, 1, 2))
    calls = {"n": 0}

    def failing(real, error):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise error
            return real(*args, **kwargs)
        return wrapper

    if phase == "compute":
        real_updated = layer_update_module._updated
        monkeypatch.setattr(layer_update_module, "_updated", failing(real_updated, RuntimeError("boom")))
    else:
        error = KeyboardInterrupt() if phase == "write-interrupt" else RuntimeError("boom")
        monkeypatch.setattr(delta_module, "_write", failing(delta_module._write, error))
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        delta.apply(model)
    assert _same(model, before)


def test_revert_is_atomic_too(monkeypatch):
    model = tiny_model("gpt2")
    delta = _delta(model)
    delta.apply(model)
    edited = _weights(model)
    real = delta_module._write
    calls = {"n": 0}

    def flaky(param, value):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(param, value)

    monkeypatch.setattr(delta_module, "_write", flaky)
    with pytest.raises(KeyboardInterrupt):
        delta.revert(model)
    assert _same(model, edited)


def test_non_finite_updates_are_refused_with_the_model_unchanged():
    with pytest.raises(DeltaError, match="nan or inf"):
        LayerUpdate(0, "w", "h", matrix=torch.full((2, 2), float("nan")))
    model = tiny_model("llama", dtype=torch.float16)
    before = _weights(model)
    huge = EditDelta.from_model(model, {1: torch.full((32, 64), 1e6, dtype=torch.float64)}, method="test")
    with pytest.raises(DeltaError, match="overflows"):
        huge.apply(model)
    assert _same(model, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_round_trip(dtype, tmp_path):
    model = tiny_model("llama", dtype=dtype)
    adapter = ModelAdapter.for_model(model)
    before = _weights(model)
    delta = _delta(model, layers=(2,), keep_base=True)
    delta.apply(model)
    expected = (before[2].double() + _factors(model, 2, 2).dense()).to(dtype)
    assert adapter.weight(2).dtype == dtype and torch.equal(adapter.weight(2), expected)
    loaded = EditDelta.load(delta.save(tmp_path / "bf.safetensors", with_base=True))
    assert loaded.base[2].dtype == dtype
    assert loaded.revert(model).exact and _same(model, before)


@pytest.mark.parametrize("arch", ARCHS)
def test_compose_equals_sequential_application(arch):
    model = tiny_model(arch)
    before = _weights(model)
    first = _delta(model, layers=(1, 2), seed=0)
    first.apply(model)
    second = _delta(model, layers=(2, 3), seed=10)
    second.apply(model)
    sequential = _weights(model)
    second.revert(model)
    first.revert(model)
    assert _same(model, before)

    composed = first.compose(second)
    assert composed.digest() == EditDelta.compose([first, second]).digest()
    assert composed.layers == [1, 2, 3] and composed.update(2).rank == 4
    assert composed.update(2).base_hash == first.update(2).base_hash
    assert composed.request_ids == ("a", "b", "a", "b")
    assert sorted(composed.base) == [1, 2, 3] and all(composed.update(la).result_hash for la in (1, 2, 3))
    composed.apply(model)
    for now, seq in zip(_weights(model), sequential, strict=True):
        assert torch.allclose(now, seq, rtol=0, atol=1e-6)
    assert composed.revert(model).exact and _same(model, before)


def test_compose_refuses_deltas_computed_on_unrelated_weights():
    first = _delta(tiny_model("llama"), layers=(1,))
    unrelated = _delta(tiny_model("llama", seed=3), layers=(1,))
    with pytest.raises(DeltaMismatchError, match="force"):
        first.compose(unrelated)
    assert first.compose(unrelated, force=True).update(1).rank == 4
    independent = _delta(tiny_model("llama"), layers=(1,), seed=7)  # same base: independent edits sum
    assert first.compose(independent).update(1).rank == 4


def test_applied_context_manager_reverts_on_errors():
    model = tiny_model("gpt2")
    before = _weights(model)
    delta = _delta(model)
    with pytest.raises(RuntimeError, match="inside"), delta.applied(model):
        assert not _same(model, before)
        raise RuntimeError("inside")
    assert _same(model, before)


def test_hparams_dataclass_and_validation():
    @dataclasses.dataclass
    class HParams:
        lam: float = 2.0
        layers: tuple[int, ...] = (1, 2)

    model = tiny_model("llama")
    assert _delta(model, hparams=HParams()).hparams == {"lam": 2.0, "layers": (1, 2)}
    with pytest.raises(ValueError, match="JSON"):
        _delta(model, hparams={"x": object()})
    with pytest.raises(ValueError, match="shape"):
        EditDelta.from_model(model, {0: torch.zeros(3, 3)}, method="test")
    with pytest.raises(ValueError, match="layers outside"):
        EditDelta.from_model(model, {9: torch.zeros(32, 64)}, method="test")


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(DeltaFileError, match="no delta file"):
        EditDelta.load(tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(DeltaFileError, match="not a readable"):
        EditDelta.load(garbage)

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(DeltaFileError, match="not a lightning_kedit delta"):
        EditDelta.load(other)

    model = tiny_model("llama")
    delta = _delta(model)
    path = delta.save(tmp_path / "d.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["layers.1.u"] = tensors["layers.1.u"] * 2
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(DeltaFileError, match="corrupt"):
        EditDelta.load(path)

    with pytest.raises(DeltaError, match="keep_base"):
        delta.save(tmp_path / "base.safetensors", with_base=True)
    good = delta.save(tmp_path / "good.safetensors")
    content = good.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        _delta(model, seed=4).save(good)
    assert good.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.integration
def test_smollm2_delta_round_trip_through_a_file(smollm2, tmp_path):
    model, tokenizer = smollm2
    adapter = ModelAdapter.for_model(model)
    layers = adapter.default_layers()
    before = [adapter.weight(layer).detach().clone() for layer in layers]
    delta = EditDelta.from_model(model, {layer: _factors(model, 10, layer, scale=1e-3) for layer in layers},
                                 method="test", tokenizer=tokenizer)
    assert delta.fingerprint["model_type"] == "llama" and "tokenizer" in delta.fingerprint
    path = delta.save(tmp_path / "smollm2.safetensors")
    dense_bytes = len(layers) * adapter.key_size * adapter.value_size * 8
    assert path.stat().st_size < dense_bytes / 20  # rank-10 factors, not dense matrices
    loaded = EditDelta.load(path)
    with loaded.applied(model):
        changed = [adapter.weight(layer).detach().clone() for layer in layers]
        assert not any(torch.equal(a, b) for a, b in zip(changed, before, strict=True))
    assert all(torch.equal(adapter.weight(la), w) for la, w in zip(layers, before, strict=True))
