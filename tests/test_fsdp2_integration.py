"""SmolLM2 sharded with FSDP2 over 2 CPU processes (gloo): 3 real CounterFact facts edited as on one process."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import shared_data

from lightning_kedit import load_model, load_requests
from lightning_kedit.editing import EditHyperParams, compute_edit, resolve_statistics
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.models import ModelAdapter

pytestmark = [pytest.mark.integration, pytest.mark.distributed]

WORLD = 2


def _setup(requests_path: str):
    model, tokenizer = load_model("smollm2")
    # A sharded model optimises its targets in float32 (the bfloat16 phase needs whole copies of the upper
    # blocks); the unsharded reference must too, also on a CPU with native bfloat16 where it is on by default.
    hparams = EditHyperParams.for_model(model, "memit").replace(v_bfloat16=False)
    statistics = resolve_statistics(model, tokenizer, hparams.layers)  # the cached statistics of the corpus
    return model, tokenizer, hparams, statistics, load_requests(requests_path, n=3)


def _whole(model, layers) -> dict[int, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    adapter = ModelAdapter.for_model(model)
    weights = {layer: adapter.mlp_out(layer).weight for layer in layers}
    return {layer: (w.full_tensor() if isinstance(w, DTensor) else w).detach().clone() for layer, w in weights.items()}


def _worker(rank: int, init_file: str, out_dir: str, requests_path: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model, tokenizer, hparams, statistics, requests = _setup(requests_path)
        mesh = init_device_mesh("cpu", (WORLD,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        delta = compute_edit(model, tokenizer, requests, statistics=statistics, hparams=hparams)
        delta.apply(model)
        edited = _whole(model, delta.layers)
        after = evaluate_requests(model, tokenizer, requests)
        exact = delta.revert(model).exact
        reverted = _whole(model, delta.layers)  # gathered by every process
        if rank == 0:
            updates = {layer: delta.update(layer).dense() for layer in delta.layers}
            torch.save({"updates": updates, "edited": edited, "after": after, "exact": exact, "reverted": reverted},
                       Path(out_dir) / "rank0.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_edit_of_smollm2_takes_and_equals_the_unsharded_edit(tmp_path):
    requests_path = str(shared_data("counterfact", "counterfact-val.json"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: the float32 kernels then add in the same order
    try:
        model, tokenizer, hparams, statistics, requests = _setup(requests_path)  # also warms the statistics cache
        original = _whole(model, hparams.layers)
        start = evaluate_requests(model, tokenizer, requests)
        reference = compute_edit(model, tokenizer, requests, statistics=statistics, hparams=hparams)
        with reference.applied(model):
            edited = _whole(model, hparams.layers)
    finally:
        torch.set_num_threads(threads)
    del model

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), requests_path), nprocs=WORLD, join=True)
    result = torch.load(tmp_path / "rank0.pt", weights_only=False)

    assert result["after"]["efficacy"] >= 0.8 > start["efficacy"]
    for layer in hparams.layers:
        expected = reference.update(layer).dense()
        assert float((result["updates"][layer] - expected).norm() / expected.norm()) <= 1e-6
        assert torch.equal(result["edited"][layer], edited[layer])
        assert torch.equal(result["reverted"][layer], original[layer])
    assert result["exact"]
