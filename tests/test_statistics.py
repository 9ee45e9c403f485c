"""KeyStatistics and its one-pass collection against an independent float64 computation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model

from lightning_kedit.errors import KeditError, StatisticsMismatchError
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.forward_hooks import capture_inputs
from lightning_kedit.statistics import KeyStatistics, collect_key_statistics, track_keys
from lightning_kedit.statistics.key_statistics import accumulate_outer, symmetric_from_lower


def _padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids * mask, mask


def _explicit_second_moments(model, layers, batches) -> dict[int, torch.Tensor]:
    """All keys gathered with a full forward, padding rows dropped, then Kᵀ K / n in float64."""
    adapter = ModelAdapter.for_model(model)
    keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids, mask in batches:
        with torch.no_grad(), capture_inputs({str(i): adapter.mlp_out(i) for i in layers}) as seen:
            model(input_ids=ids, attention_mask=mask)
        for layer in layers:
            (x,) = seen[str(layer)]
            keys[layer].append(x.reshape(-1, x.shape[-1])[mask.reshape(-1).bool()].double())
    return {layer: torch.cat(k).T @ torch.cat(k) / torch.cat(k).shape[0] for layer, k in keys.items()}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_second_moment_matches_explicit_float64(model_type):
    model = tiny_model(model_type)
    layers = [1, 2]
    batches = [_padded_batch(0), _padded_batch(1)]
    stats = collect_key_statistics(model, None, layers, batches, max_tokens=10_000)
    expected = _explicit_second_moments(model, layers, batches)
    valid = sum(int(mask.sum()) for _, mask in batches)
    for layer in layers:
        assert stats.count(layer) == valid
        assert stats.second_moment(layer).dtype == torch.float64
        assert _relative(stats.second_moment(layer), expected[layer]) < 1e-10


def test_padding_changes_nothing():
    """The same tokens with extra padding columns give the same statistics."""
    model = tiny_model("llama")
    ids, mask = _padded_batch()
    padded_ids = torch.cat([ids, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 5, dtype=torch.long)], dim=1)
    a = collect_key_statistics(model, None, [2], [(ids, mask)])
    b = collect_key_statistics(model, None, [2], [{"input_ids": padded_ids, "attention_mask": padded_mask}])
    assert a.count(2) == b.count(2) == int(mask.sum())
    assert _relative(b.second_moment(2), a.second_moment(2)) < 1e-6


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_forward_stops_at_the_last_projection(model_type):
    """The pass ends when the last edit layer's projection is called: it and the blocks above never run."""
    model = tiny_model(model_type, num_layers=4)
    adapter = ModelAdapter.for_model(model)
    blocks: list[int] = []
    projections: list[int] = []
    handles = [adapter.block(i).register_forward_hook(lambda m, a, o, i=i: blocks.append(i)) for i in range(4)]
    handles += [adapter.mlp_out(i).register_forward_hook(lambda m, a, o, i=i: projections.append(i)) for i in range(4)]
    try:
        stats = collect_key_statistics(model, None, [0, 1], [torch.randint(1, 60, (2, 8))])
    finally:
        for handle in handles:
            handle.remove()
    assert blocks == [0] and projections == [0]
    assert stats.count(0) == stats.count(1) == 16
    assert all(len(adapter.mlp_out(i)._forward_pre_hooks) == 0 for i in range(4))
    assert all(len(adapter.mlp_out(i)._forward_hooks) == 0 for i in range(4))


def test_hooks_removed_on_error():
    model = tiny_model("gpt2")
    adapter = ModelAdapter.for_model(model)
    stats = KeyStatistics([0, 1], adapter.key_size)
    with pytest.raises(RuntimeError, match="boom"), track_keys(model, stats):
        raise RuntimeError("boom")
    assert all(len(adapter.mlp_out(i)._forward_pre_hooks) == 0 for i in range(adapter.num_layers))


def test_tracker_mask_must_match_batch():
    model = tiny_model("llama")
    stats = KeyStatistics([0], ModelAdapter.for_model(model).key_size)
    with track_keys(model, stats) as tracker, pytest.raises(KeditError, match="mask"):
        tracker.mask = torch.ones(2, 3)
        model(torch.randint(1, 300, (2, 5)))


def test_max_tokens_is_exact_and_bos_skipped():
    model = tiny_model("llama")
    ids = torch.randint(5, 300, (4, 10))
    ids[:, 0] = 1
    stats = collect_key_statistics(model, None, [1], [ids], max_tokens=23)
    assert stats.count(1) == 23

    class Bos:
        bos_token_id = 1

    no_bos = collect_key_statistics(model, Bos(), [1], [ids], skip_bos=True)
    assert no_bos.count(1) == 36


def test_merge_adds_up_to_one_pass():
    model = tiny_model("qwen2")
    batches = [_padded_batch(0), _padded_batch(1)]
    whole = collect_key_statistics(model, None, [1, 3], batches)
    first = collect_key_statistics(model, None, [1, 3], batches[:1])
    second = collect_key_statistics(model, None, [1, 3], batches[1:])
    merged = first.merge(second)
    for layer in (1, 3):
        assert merged.count(layer) == whole.count(layer)
        assert _relative(merged.second_moment(layer), whole.second_moment(layer)) < 1e-12


def test_merge_refuses_other_layers():
    with pytest.raises(StatisticsMismatchError, match="layers"):
        KeyStatistics([1], 4).merge(KeyStatistics([2], 4))


def test_mean_and_float32_accumulation():
    keys = torch.randn(50, 6, dtype=torch.float64)
    stats = KeyStatistics([0], 6, dtype=torch.float32)
    stats.update(0, keys)
    assert stats.second_moment(0).dtype == torch.float64
    assert _relative(stats.second_moment(0), keys.T @ keys / 50) < 1e-6
    assert torch.allclose(stats.mean(0), keys.mean(0), atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": [], "key_size": 4}, "layers"),
        ({"layers": [-1], "key_size": 4}, "layers"),
        ({"layers": [0], "key_size": 0}, "key_size"),
        ({"layers": [0], "key_size": 4, "dtype": torch.float16}, "dtype"),
    ],
)
def test_constructor_validates(kwargs, match):
    with pytest.raises(KeditError, match=match):
        KeyStatistics(**kwargs)


def test_update_validates_shape_and_layer():
    stats = KeyStatistics([0], 4)
    with pytest.raises(KeditError, match=r"\(n, 4\)"):
        stats.update(0, torch.ones(3, 5))
    with pytest.raises(KeditError, match="layer 7"):
        stats.update(7, torch.ones(3, 4))
    with pytest.raises(KeditError, match="no keys"):
        stats.compute()


def test_layers_outside_model_refused():
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(KeditError, match="outside the model"):
        collect_key_statistics(model, None, [2, 9], [torch.ones(1, 4, dtype=torch.long)])


def test_window_longer_than_context_refused(tokenizer, tmp_path):
    model = tiny_model("gpt2")  # n_positions = 256
    text = tmp_path / "t.txt"
    text.write_text("Paris is in France.\n")
    with pytest.raises(KeditError, match="context of 256"):
        collect_key_statistics(model, tokenizer, [0], text, window=512)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_blocked_accumulation_matches_full_product(block):
    keys = torch.randn(40, 10)  # 10 keys wide: not a multiple of 3 or 7
    total = torch.zeros(10, 10, dtype=torch.float64)
    accumulate_outer(total, keys[:25], block=block)
    accumulate_outer(total, keys[25:], block=block)
    expected = keys.double().T @ keys.double()
    assert _relative(symmetric_from_lower(total), expected) < 1e-14


def test_wide_keys_use_blocks_and_stay_exact():
    keys = torch.randn(300, 450)  # wider than the default block of 192
    stats = KeyStatistics([0], 450)
    stats.update(0, keys[:100])
    stats.update(0, keys[100:])
    expected = keys.double().T @ keys.double() / 300
    assert _relative(stats.second_moment(0), expected) < 1e-13
    assert torch.equal(stats.second_moment(0), stats.second_moment(0).T)


def test_batches_of_every_supported_kind():
    model = tiny_model("llama")
    ids = torch.randint(1, 300, (2, 6))
    as_rows = collect_key_statistics(model, None, [1], [ids[0], ids[1]])  # 1-D sequences
    as_tuple = collect_key_statistics(model, None, [1], [(ids, torch.ones_like(ids))])
    bool_mask = collect_key_statistics(model, None, [1], [{"input_ids": ids, "attention_mask": ids > 0}])
    assert as_rows.count(1) == as_tuple.count(1) == bool_mask.count(1) == 12
    assert _relative(as_rows.second_moment(1), as_tuple.second_moment(1)) < 1e-6


@pytest.mark.parametrize(
    ("batches", "match"),
    [([3.5], "cannot read token ids"), ([{"ids": torch.ones(1, 3)}], "must hold 'input_ids'"), ([], "no tokens")],
)
def test_unusable_batches_are_refused(batches, match):
    with pytest.raises(KeditError, match=match):
        collect_key_statistics(tiny_model("llama"), None, [1], batches)


@pytest.mark.parametrize("block", [5, 192])
def test_float32_products_are_summed_in_float64(block):
    keys = torch.randn(600, 20) * 3 + 1
    total = torch.zeros(20, 20, dtype=torch.float64)
    for chunk in keys.split(100):
        accumulate_outer(total, chunk, block=block, product_dtype=torch.float32)
    expected = keys.double().T @ keys.double()
    assert 1e-10 < _relative(symmetric_from_lower(total), expected) < 1e-6
    stats = KeyStatistics([0], 20, product_dtype=torch.float32)
    stats.update(0, keys)
    assert stats.product_dtype == torch.float32 and stats.state_dtype == torch.float64
    assert _relative(stats.second_moment(0), expected / 600) < 1e-6


def test_reset_and_state_memory():
    stats = KeyStatistics([0, 1], 300)
    assert all(default.untyped_storage().nbytes() <= 8 for default in stats._defaults.values())
    stats.update(0, torch.randn(4, 300))
    stats.reset()
    assert stats._sum_kk(0).shape == (300, 300) and stats._sum_kk(0).is_contiguous()
    assert stats._count(0) == 0 and float(stats._sum_kk(0).abs().sum()) == 0.0
    keys = torch.randn(7, 300)
    stats.update(0, keys)
    assert _relative(stats.second_moment(0), keys.double().T @ keys.double() / 7) < 1e-13


def test_dataloader_of_padded_examples():
    from torch.utils.data import DataLoader

    ids, mask = _padded_batch(3)
    examples = [{"input_ids": i, "attention_mask": m, "labels": i} for i, m in zip(ids, mask, strict=True)]
    model = tiny_model("gpt_neox")
    from_loader = collect_key_statistics(model, None, [0, 2], DataLoader(examples, batch_size=2))
    expected = _explicit_second_moments(model, [0, 2], [(ids[:2], mask[:2]), (ids[2:], mask[2:])])
    for layer in (0, 2):
        assert from_loader.count(layer) == int(mask.sum())
        assert _relative(from_loader.second_moment(layer), expected[layer]) < 1e-10
