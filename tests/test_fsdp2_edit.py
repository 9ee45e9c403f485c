"""Editing a model sharded with FSDP2 (``fully_shard``) over 2 CPU processes (gloo) gives the unsharded edit.

Every process computes the keys and target values with the sharded model's own forward and backward; only the
edit layers' weights are gathered (read) and written back as shards. The delta, the edited weights, the revert
and the edit metrics must be those of one process editing the unsharded model.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_lightning_callback import REQUESTS, TEXT
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.editing import EditHyperParams, compute_edit
from lightning_kedit.errors import KeditError
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models import ModelAdapter
from lightning_kedit.statistics import collect_key_statistics

WORLD = 2
LAYERS = [1, 2]


def _hparams(model) -> EditHyperParams:
    # Two generated prefixes (generation runs on the sharded model too) and enough steps to write the facts.
    # A sharded model optimises its targets in float32 (the bfloat16 phase needs whole copies of the upper
    # blocks); the unsharded reference must too, also on a CPU with native bfloat16 where it is on by default.
    return EditHyperParams.for_model(model, "memit", LAYERS).replace(v_steps=12, prefix_lengths=((3, 2),),
                                                                     v_bfloat16=False)


def _statistics(model, tokenizer):
    ids = tokenizer(TEXT, return_tensors="pt").input_ids[:, :192]
    return collect_key_statistics(model, tokenizer, LAYERS, [(ids, torch.ones_like(ids))])


def _shard(model, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _whole(adapter: ModelAdapter) -> dict[int, torch.Tensor]:
    """The edit layers' whole weights (gathered here with DTensor's own ``full_tensor``)."""
    from torch.distributed.tensor import DTensor

    weights = {layer: adapter.mlp_out(layer).weight for layer in LAYERS}
    return {layer: (w.full_tensor() if isinstance(w, DTensor) else w).detach().clone() for layer, w in weights.items()}


def _refusals(tokenizer, statistics) -> None:
    """Sharded layouts the edit cannot serve are refused by name (on every process alike)."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_kedit.lightning.strategies import check_edit_weights

    mesh = init_device_mesh("cpu", (WORLD,))
    root_only = tiny_model("llama")
    fully_shard(root_only, mesh=mesh)  # the blocks are not units of their own
    with pytest.raises(KeditError, match="not a sharded unit of its own"):
        compute_edit(root_only, tokenizer, REQUESTS, statistics=statistics, hparams=_hparams(root_only))
    column_split = tiny_model("llama")  # a tensor-parallel layout: columns split, no fully_shard
    projection = column_split.model.layers[1].mlp.down_proj
    projection.weight = torch.nn.Parameter(distribute_tensor(projection.weight.detach(), mesh, [Shard(1)]))
    with pytest.raises(MisconfigurationException, match="tensor parallelism"):
        check_edit_weights(ModelAdapter.for_model(column_split), LAYERS)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        model, tokenizer = tiny_model("llama"), tiny_tokenizer()
        statistics = _statistics(model, tokenizer)
        _shard(model, init_device_mesh("cpu", (WORLD,)))
        adapter = ModelAdapter.for_model(model)
        assert all(isinstance(adapter.mlp_out(layer).weight, DTensor) for layer in LAYERS)
        local_before = {layer: adapter.mlp_out(layer).weight.to_local().clone() for layer in LAYERS}
        before = evaluate_requests(model, tokenizer, REQUESTS)
        delta = compute_edit(model, tokenizer, REQUESTS, statistics=statistics, hparams=_hparams(model))
        delta.apply(model)
        applied = _whole(adapter)
        local_applied = {layer: adapter.mlp_out(layer).weight.to_local().clone() for layer in LAYERS}
        after = evaluate_requests(model, tokenizer, REQUESTS)
        report = delta.revert(model)
        reverted = _whole(adapter)
        local_reverted = {layer: adapter.mlp_out(layer).weight.to_local().clone() for layer in LAYERS}
        with pytest.raises(KeditError, match="ft"):
            compute_edit(model, tokenizer, REQUESTS, method="ft", layers=[1])
        _refusals(tokenizer, statistics)
        torch.save(
            {
                "updates": {layer: delta.update(layer).dense() for layer in delta.layers},
                "applied": applied, "reverted": reverted, "exact": report.exact, "before": before, "after": after,
                "local_before": local_before, "local_applied": local_applied, "local_reverted": local_reverted,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _reference() -> dict:
    """One process edits the unsharded model."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    adapter = ModelAdapter.for_model(model)
    original = _whole(adapter)
    before = evaluate_requests(model, tokenizer, REQUESTS)
    delta = compute_edit(model, tokenizer, REQUESTS, statistics=_statistics(model, tokenizer), hparams=_hparams(model))
    delta.apply(model)
    return {"original": original, "before": before, "delta": delta, "edited": _whole(adapter),
            "after": evaluate_requests(model, tokenizer, REQUESTS)}


@pytest.mark.distributed
def test_an_fsdp2_sharded_edit_equals_the_unsharded_one(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    # The reference with one thread, as each worker, so that the float32 kernels add in the same order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _reference()
    finally:
        torch.set_num_threads(threads)
    assert ref["after"]["efficacy_prob"] > ref["before"]["efficacy_prob"]  # the edit moves the facts

    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    for result in results:
        for layer in LAYERS:
            expected = ref["delta"].update(layer).dense()
            error = float((result["updates"][layer] - expected).norm() / expected.norm())
            assert error <= 1e-6, (layer, error)
            assert torch.equal(result["applied"][layer], ref["edited"][layer])
            assert torch.equal(result["reverted"][layer], ref["original"][layer])
        assert result["exact"]
        for name in ("efficacy", "paraphrase", "neighborhood", "score"):
            assert result["before"][name] == ref["before"][name] and result["after"][name] == ref["after"][name]
        for name in ("efficacy_prob", "paraphrase_prob", "neighborhood_prob"):
            assert result["after"][name] == pytest.approx(ref["after"][name], rel=1e-6), name
    # Each process holds its own half of the rows: the two shards differ and together make the whole weight.
    for layer in LAYERS:
        for key, whole in (("local_before", "original"), ("local_applied", "edited"), ("local_reverted", "original")):
            halves = [result[key][layer] for result in results]
            assert not torch.equal(halves[0], halves[1])
            assert torch.equal(torch.cat(halves), ref[whole][layer])
