"""The lifelong method under torch.distributed: two CPU processes (gloo), each computing the features of half
of the facts, give every process the features and the delta of one process over all of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _setting(solve: str = "batch"):
    from test_lifelong import LAYERS, REQUESTS, hparams
    from tiny_models import tiny_model, tiny_tokenizer

    from lightning_kedit.statistics import load_or_collect_statistics

    model, tok = tiny_model("llama"), tiny_tokenizer()
    stats = load_or_collect_statistics(model, tok, list(LAYERS), cache=False, max_tokens=2000)
    # Five facts: the processes hold three and two, so the globally indexed buffers are uneven.
    return model, tok, REQUESTS[:5], hparams(model, step=4.0, positions="subject", preserve_weight=0.1,
                                                   solve=solve), stats


def _worker(rank: int, init_file: str, out_dir: str, solve: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lightning_kedit.editing import compute_edit
    from lightning_kedit.editing.lifelong import fact_features

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, tok, requests, hp, stats = _setting(solve)
        features = fact_features(model, tok, requests, hp.layers, positions="subject")
        extras: dict[str, torch.Tensor] = {}
        delta = compute_edit(model, tok, requests, method="lifelong", hparams=hp, statistics=stats, extras=extras)
        torch.save({"keys": features.keys, "grads": features.grads, "digest": delta.digest(),
                    "dense": {layer: delta.update(layer).dense() for layer in delta.layers}, "extras": extras},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("solve", ["batch", "cumulative"])
def test_two_processes_give_the_features_and_delta_of_one(tmp_path, solve):
    from lightning_kedit.editing import compute_edit
    from lightning_kedit.editing.lifelong import fact_features

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), solve), nprocs=WORLD, join=True)
    model, tok, requests, hp, stats = _setting(solve)
    whole = fact_features(model, tok, requests, hp.layers, positions="subject")
    extras: dict[str, torch.Tensor] = {}
    delta = compute_edit(model, tok, requests, method="lifelong", hparams=hp, statistics=stats, extras=extras)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for result in ranks:
        for layer in hp.layers:
            assert result["keys"][layer].shape == (len(requests), whole.keys[layer].shape[1])
            torch.testing.assert_close(result["keys"][layer], whole.keys[layer], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(result["grads"][layer], whole.grads[layer], rtol=1e-4, atol=1e-7)
            reference = delta.update(layer).dense()
            assert float((result["dense"][layer] - reference).norm() / reference.norm()) < 1e-4
        # The running sums (and, cumulative, the rows) every process records are the whole batch's; the
        # gradients summed in another order differ in their last digits, as above.
        assert set(result["extras"]) == set(extras)
        for name, value in extras.items():
            assert float((result["extras"][name] - value).norm() / value.norm()) < 1e-5, name
    assert ranks[0]["digest"] == ranks[1]["digest"]  # every process holds the same delta, bit for bit
