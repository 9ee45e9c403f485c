"""Two CPU processes (gloo), each over half of the data, give the statistics of one process over all of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
LAYERS = [1, 2]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    out = []
    for i in range(4):
        ids = torch.randint(1, 300, (2, 10), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 4 + i :] = 0  # padding in every batch, a different amount each time
        out.append((ids * mask, mask))
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_model

    from lightning_kedit.statistics import KeyStatistics, collect_key_statistics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:

        def no_gather(*args, **kwargs):
            raise AssertionError("states must be all-reduced in place, not gathered")

        dist.all_gather = no_gather  # type: ignore[assignment]
        model = tiny_model("llama")
        stats = collect_key_statistics(model, None, LAYERS, _batches()[rank::WORLD])
        local_count = int(stats._count(LAYERS[0]))
        moments = stats.compute()
        counts = {layer: stats.count(layer) for layer in LAYERS}
        # After compute, the local states are restored: accumulation goes on per process.
        assert int(stats._count(LAYERS[0])) == local_count
        stats.save(Path(out_dir) / "stats.safetensors", {"model_type": "llama"}, source="halves")
        torch.save({"moments": moments, "counts": counts, "local": local_count}, Path(out_dir) / f"rank{rank}.pt")
        assert isinstance(stats, KeyStatistics)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_match_one(tmp_path):
    from tiny_models import tiny_model

    from lightning_kedit.statistics import KeyStatistics, collect_key_statistics

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)

    whole = collect_key_statistics(tiny_model("llama"), None, LAYERS, _batches())
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    assert results[0]["local"] + results[1]["local"] == whole.count(LAYERS[0])
    assert results[0]["local"] != results[1]["local"]
    for result in results:
        for layer in LAYERS:
            assert result["counts"][layer] == whole.count(layer)
            expected = whole.second_moment(layer)
            assert float((result["moments"][layer] - expected).norm() / expected.norm()) < 1e-10
    saved = KeyStatistics.load(tmp_path / "stats.safetensors")
    for layer in LAYERS:
        assert saved.count(layer) == whole.count(layer)
        assert float((saved.second_moment(layer) - whole.second_moment(layer)).norm()) < 1e-10
