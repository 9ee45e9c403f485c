"""MEMIT orchestration on tiny models: exactness, atomicity under injected failures, bad input."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from lightning_kedit.editing import compute_edit, edit, memit, weight_edits
from lightning_kedit.editing.hparams import EditHyperParams, HyperParamError
from lightning_kedit.editing.keys import subject_states
from lightning_kedit.editing.targets import NonFiniteEditError, compute_target_values
from lightning_kedit.errors import KeditError, StatisticsMismatchError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.requests import EditRequest
from lightning_kedit.statistics import KeyStatistics

REQUESTS = [
    EditRequest("a", "{} plays the", "Toko Yasuda", "Paris", "guitar"),
    EditRequest("b", "The mother tongue of {} is", "Danielle Darrieux", "London", "French"),
]
TEMPLATES = ["{}", "The capital. {}"]


def peaky(model_type: str, num_layers: int = 4) -> torch.nn.Module:
    model = tiny_model(model_type, num_layers=num_layers).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)
    return model


def statistics_for(model: torch.nn.Module, layers: list[int], scale: float = 1.0) -> KeyStatistics:
    adapter = ModelAdapter.for_model(model)
    stats = KeyStatistics(layers, adapter.key_size)
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        stats.update(layer, scale * torch.randn(4 * adapter.key_size, adapter.key_size, generator=generator))
    return stats


def hparams(layers: tuple[int, ...], **kw) -> EditHyperParams:
    base = dict(layers=layers, v_steps=6, clamp_norm=50.0, kl_factor=0.0, weight_decay=0.0,
                prefix_lengths=((3, 1),), mom2_weight=1.0)
    base.update(kw)
    return EditHyperParams(**base)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def identical(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_single_layer_memit_writes_targets_exactly(model_type, tokenizer):
    """With λ → 0 and fewer keys than the key size, the edited layer maps each averaged key to h + δ."""
    model = peaky(model_type)
    hp = hparams((2,), mom2_weight=1e-8)
    stats = statistics_for(model, [2])
    values = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp)
    before = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[2], out_layer=2).outputs
    factors, fitted = memit.memit_updates(model, tokenizer, REQUESTS, stats, hp, templates=TEMPLATES)
    torch.testing.assert_close(fitted.delta, values.delta)
    adapter = ModelAdapter.for_model(model)
    weight_edits.add_to_weight(adapter, 2, factors[2].dense())
    after = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[2], out_layer=2).outputs
    torch.testing.assert_close(after, before + values.delta, rtol=1e-3, atol=1e-3)


def test_memit_matches_naive_normal_equations(tokenizer):
    """The first layer's update equals R Kᵀ (λC + KKᵀ)⁻¹ from the keys and residuals, solved naively."""
    model = peaky("llama")
    hp = hparams((1, 2), mom2_weight=0.5)
    stats = statistics_for(model, [1, 2])
    factors, values = memit.memit_updates(model, tokenizer, REQUESTS, stats, hp, templates=TEMPLATES)
    states = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[1], out_layer=2)
    keys, residuals = states.keys[1], values.delta / 2  # z − h = δ before any update, spread over 2 layers
    c = stats.second_moment(1).double()
    naive = residuals.T @ keys @ torch.linalg.inv(0.5 * c + keys.T @ keys)
    torch.testing.assert_close(factors[1].dense(), naive, rtol=1e-6, atol=1e-8)


def test_memit_moves_hidden_states_to_targets_and_reverts(tokenizer):
    """After a two-layer edit, the last edit layer's hidden states at the subjects are closer to z = h + δ."""
    model = peaky("llama")
    before = snapshot(model)
    hp = hparams((1, 2), mom2_weight=1e-6)
    stats = statistics_for(model, [1, 2])
    values = compute_target_values(model, tokenizer, REQUESTS, 2, TEMPLATES, hp)
    start = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[2], out_layer=2).outputs
    delta = edit(model, tokenizer, REQUESTS, hparams=hp, statistics=stats)
    moved = subject_states(model, tokenizer, REQUESTS, TEMPLATES, key_layers=[2], out_layer=2).outputs
    target = start + values.delta
    assert ((moved - target).norm(dim=-1) < 0.5 * (start - target).norm(dim=-1)).all()
    assert delta.method == "memit" and delta.layers == [1, 2] and delta.request_ids == ("a", "b")
    delta.revert(model)
    assert identical(model, before)


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("phase", ["keys", "keys-later", "targets", "solve", "nan", "delta", "interrupt"])
def test_failure_in_any_phase_leaves_model_bit_identical(phase, tokenizer, monkeypatch):
    model = peaky("llama")
    before = snapshot(model)
    calls = {"n": 0}
    real_states = memit.subject_states

    def failing_states(*args, **kwargs):
        calls["n"] += 1
        if phase == "keys" or (phase in ("keys-later", "interrupt") and calls["n"] == 2):
            raise KeyboardInterrupt if phase == "interrupt" else Boom("keys")
        return real_states(*args, **kwargs)

    def failing(*args, **kwargs):
        raise Boom(phase)

    monkeypatch.setattr(memit, "subject_states", failing_states)
    if phase == "targets":
        monkeypatch.setattr(memit, "compute_target_values", failing)
    if phase == "solve":
        monkeypatch.setattr(memit, "spread_residuals", failing)
    if phase == "nan":
        real = memit.memit_factors
        def nan_factors(*args, **kwargs):
            return real(*args, **kwargs)._replace(u=torch.full((2, 2), torch.nan))

        monkeypatch.setattr(memit, "memit_factors", nan_factors)
    if phase == "delta":
        from lightning_kedit.editing import editor

        monkeypatch.setattr(editor.EditDelta, "from_model", failing)
    expected = {"interrupt": KeyboardInterrupt, "nan": NonFiniteEditError}.get(phase, Boom)
    with pytest.raises(expected):
        compute_edit(
            model, tokenizer, REQUESTS, hparams=hparams((1, 2, 3)), statistics=statistics_for(model, [1, 2, 3])
        )
    assert identical(model, before)
    assert model.training is False


def test_bad_input_is_refused_with_model_unchanged(tokenizer):
    model = peaky("llama")
    before = snapshot(model)
    stats = statistics_for(model, [1, 2])
    with pytest.raises(KeditError, match="empty"):
        compute_edit(model, tokenizer, [], hparams=hparams((1, 2)), statistics=stats)
    with pytest.raises(HyperParamError, match="outside the model"):
        compute_edit(model, tokenizer, REQUESTS, layers=[2, 9], statistics=stats)
    with pytest.raises(HyperParamError, match="outside the model"):
        compute_edit(model, tokenizer, REQUESTS, hparams=hparams((1, 7)), statistics=stats)
    with pytest.raises(StatisticsMismatchError, match="layers"):
        compute_edit(model, tokenizer, REQUESTS, hparams=hparams((2, 3)), statistics=stats)
    other = KeyStatistics([1, 2], 16)
    other.update(1, torch.randn(40, 16))
    other.update(2, torch.randn(40, 16))
    with pytest.raises(StatisticsMismatchError, match="another model"):
        compute_edit(model, tokenizer, REQUESTS, hparams=hparams((1, 2)), statistics=other)
    with pytest.raises(HyperParamError, match="method"):
        compute_edit(model, tokenizer, REQUESTS, method="magic", statistics=stats)
    assert identical(model, before)


def test_statistics_file_for_another_model_is_refused(tmp_path, tokenizer):
    model, other = peaky("llama"), tiny_model("llama", seed=1)
    stats = statistics_for(other, [1, 2])
    from lightning_kedit.models.fingerprint import model_fingerprint

    path = stats.save(tmp_path / "stats.safetensors", model_fingerprint(other, tokenizer, [1, 2]))
    with pytest.raises(StatisticsMismatchError):
        compute_edit(model, tokenizer, REQUESTS, hparams=hparams((1, 2)), statistics=path)


def test_relative_lambda_is_scale_free(tokenizer):
    """With λ relative to mean(diag C), scaling the statistics does not change the update."""
    model = peaky("llama")
    hp = hparams((2,), lambda_relative=True, mom2_weight=3.0)
    small = memit.memit_updates(model, tokenizer, REQUESTS, statistics_for(model, [2]), hp, templates=TEMPLATES)
    large = memit.memit_updates(
        model, tokenizer, REQUESTS, statistics_for(model, [2], scale=10.0), hp, templates=TEMPLATES
    )
    torch.testing.assert_close(small[0][2].dense(), large[0][2].dense(), rtol=1e-6, atol=1e-9)


def test_timings_add_to_the_callers_phases_instead_of_replacing_them(tokenizer):
    """A caller that timed its own statistics collection keeps that time (``kedit demo`` printed 0.0 for it)."""
    model = peaky("llama")
    timings = {"statistics": 5.0, "load": 1.0}
    compute_edit(model, tokenizer, REQUESTS[:1], method="memit", statistics=statistics_for(model, [1, 2]),
                 hparams=hparams((1, 2)), timings=timings)
    assert timings["statistics"] >= 5.0 and timings["load"] == 1.0
    assert {"keys", "targets", "solve"} <= set(timings) and all(timings[k] > 0 for k in ("keys", "targets"))
