"""Padding of token rows (lightning_kedit/token_batches.py) against a row-by-row reading."""

from types import SimpleNamespace

import pytest
import torch

from lightning_kedit.errors import KeditError
from lightning_kedit.token_batches import padded_batch, padding_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_every_row_reads_back_from_its_masked_positions_and_padding_fills_the_rest(side):
    rows = [[5, 6, 7], [8], [], [9, 10]]
    ids, mask = padded_batch(rows, pad_id=-1, side=side)
    assert ids.shape == mask.shape == (4, 3) and ids.dtype == mask.dtype == torch.long
    for i, row in enumerate(rows):
        assert ids[i][mask[i] == 1].tolist() == row
        assert ids[i][mask[i] == 0].tolist() == [-1] * (3 - len(row))
        tokens = mask[i].nonzero().flatten().tolist()
        expected = list(range(3 - len(row), 3)) if side == "left" else list(range(len(row)))
        assert tokens == expected


def test_tensor_rows_pad_like_lists():
    ids, mask = padded_batch([torch.tensor([1, 2]), torch.tensor([3])], pad_id=0)
    assert ids.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_bad_inputs_name_the_problem():
    with pytest.raises(KeditError, match="no token rows"):
        padded_batch([], pad_id=0)
    with pytest.raises(KeditError, match="'middle'"):
        padded_batch([[1]], pad_id=0, side="middle")  # type: ignore[arg-type]


def test_padding_id_prefers_pad_then_eos_then_the_fallback_or_an_error():
    assert padding_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert padding_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    bare = SimpleNamespace(pad_token_id=None, eos_token_id=None)
    assert padding_id(bare) == 0
    with pytest.raises(KeditError, match="set tokenizer.pad_token"):
        padding_id(bare, fallback=None)
