"""KnowledgeEditCallback under Lightning's ModelParallelStrategy with FSDP2 (fully_shard), 2 CPU processes (gloo).

The processes are started by ``torch.distributed.run`` (tests/lightning_fsdp2_run.py); the run is compared with one
process training the unsharded model on the same global batches.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_fsdp2_run import BLOCK, BLOCKS, LAYERS, main

from lightning_kedit.lightning.strategies import check_strategy

HERE = Path(__file__).parent


def _load(folder: Path, stage: str, rank: int) -> dict:
    return torch.load(folder / f"{stage}-rank{rank}.pt", weights_only=False)


@pytest.mark.distributed
def test_model_parallel_fsdp2_run_edits_like_one_process_and_reverts_exactly(tmp_path):
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    sharded.mkdir()
    single.mkdir()
    run = _torchrun(str(sharded))
    assert run.returncode == 0, run.stderr[-3000:]
    threads = torch.get_num_threads()
    try:
        main(single, sharded=False)
    finally:
        torch.set_num_threads(threads)

    ranks = [{stage: _load(sharded, stage, rank) for stage in ("trained", "edited", "reverted")} for rank in (0, 1)]
    expected = {stage: _load(single, stage, 0) for stage in ("trained", "edited", "reverted")}
    assert ranks[0]["edited"]["sharded"] == "DTensor"  # the edit ran on the sharded weights
    for rank in ranks:
        assert rank["edited"]["digests"] == ranks[0]["edited"]["digests"] and len(rank["edited"]["digests"]) == 1
        for name, value in expected["edited"]["statistics"].items():
            if name.startswith("count"):
                assert int(rank["edited"]["statistics"][name]) == int(value) == BLOCK * BLOCKS
            torch.testing.assert_close(rank["edited"]["statistics"][name], value, rtol=1e-10, atol=1e-12)
        for layer in LAYERS:
            # Every process ends with the same whole weights, the edit's; revert restores the trained ones exactly.
            assert torch.equal(rank["edited"]["weights"][layer], ranks[0]["edited"]["weights"][layer])
            assert torch.equal(rank["reverted"]["weights"][layer], rank["trained"]["weights"][layer])
            assert torch.equal(rank["trained"]["weights"][layer], expected["trained"]["weights"][layer])
            change = rank["edited"]["weights"][layer] - rank["trained"]["weights"][layer]
            reference = expected["edited"]["weights"][layer] - expected["trained"]["weights"][layer]
            assert float(change.norm()) > 0
            assert float((change - reference).norm() / reference.norm()) < 1e-5  # measured: 8e-7
        history, reference_history = rank["edited"]["history"][-1], expected["edited"]["history"][-1]
        assert history["efficacy"] == reference_history["efficacy"]
        assert history["neighborhood"] == reference_history["neighborhood"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "lightning_fsdp2_run.py"), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.distributed
def test_model_parallel_fsdp2_run_resumed_from_its_checkpoint_edits_as_an_uninterrupted_one(tmp_path):
    for stage in ("whole", "cut", "resumed"):
        run = _torchrun(str(tmp_path), stage)
        # The cut run stops both processes with exit code 3 at the start of its second epoch.
        assert run.returncode == (1 if stage == "cut" else 0), run.stderr[-3000:]
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert checkpoint.is_dir()  # a distributed checkpoint; the statistics files lie beside it
    assert len(list((tmp_path / "ckpt").glob("kedit-statistics-*.safetensors"))) == 2
    for rank in (0, 1):
        whole, resumed = _load(tmp_path, "whole-edited", rank), _load(tmp_path, "resumed-edited", rank)
        assert resumed["digests"] == whole["digests"] and len(whole["digests"]) == 1
        for name, value in whole["statistics"].items():
            if name.startswith("count"):
                assert int(value) == 2 * BLOCK * BLOCKS  # both epochs' keys
            assert torch.equal(resumed["statistics"][name], value)
        for layer in LAYERS:
            assert torch.equal(resumed["weights"][layer], whole["weights"][layer])


def test_strategies_are_accepted_or_refused_by_name():
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    for strategy, name in ((ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2), "tensor_parallel"),
                           (ModelParallelStrategy(), "tensor_parallel_size='auto'"),
                           (FSDPStrategy(), "FSDPStrategy"),
                           (type("DeepSpeedStrategy", (DDPStrategy,), {})(), "DeepSpeedStrategy")):
        with pytest.raises(MisconfigurationException, match=name):
            check_strategy(strategy)
