"""One process of a Lightning ``ModelParallelStrategy`` (FSDP2) run on CPU, for tests/test_lightning_fsdp2.py.

Started by ``torch.distributed.run`` (Lightning then takes the processes it finds). The module shards each block
and the model with ``fully_shard`` in ``configure_model``; the callback edits at fit end and reverts after it.
Each process writes, per stage, the edit layers' whole weights, the gathered statistics and the edit's digests.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/lightning_fsdp2_run.py OUT_DIR [STAGE]
(STAGE ``whole``, ``cut`` or ``resumed``: the resume comparison of :func:`resume_stage`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).parent))
from test_lightning_callback import FAST, LAYERS, REQUESTS, TEXT
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

BLOCK, BLOCKS = 16, 8


class ShardedModule(KnowledgeEditModule):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def edit_layer_weights(module) -> dict[int, torch.Tensor]:
    """The edit layers' whole weights (every process calls it: a sharded weight is gathered)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for layer in LAYERS:
        weight = module.model.model.layers[layer].mlp.down_proj.weight
        out[layer] = (weight.full_tensor() if isinstance(weight, DTensor) else weight).detach().clone()
    return out


class Dump(Callback):
    def __init__(self, folder: Path, stage: str, edit: KnowledgeEditCallback) -> None:
        self.folder, self.stage, self.edit = folder, stage, edit

    def _dump(self, trainer, pl_module) -> None:
        weight = pl_module.model.model.layers[LAYERS[0]].mlp.down_proj.weight
        record = {"weights": edit_layer_weights(pl_module), "digests": [r.digest for r in self.edit.applied],
                  "history": self.edit.history, "sharded": type(weight).__name__}
        if self.stage.endswith("edited"):
            statistics = self.edit.gathered_statistics(trainer)
            record["statistics"] = {k: v.clone() for k, v in statistics.metric_state.items()}
        torch.save(record, self.folder / f"{self.stage}-rank{trainer.global_rank}.pt")

    def on_train_end(self, trainer, pl_module) -> None:
        if self.stage != "reverted":
            self._dump(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.stage == "reverted":
            self._dump(trainer, pl_module)


def parts(folder: Path, sharded: bool, batch_size: int):
    path = folder / "train.txt"
    path.write_text(TEXT)
    model = tiny_model("llama", num_layers=4)
    # Only the top block and the head train: the edit layers' keys then do not depend on how gradients were
    # reduced, so both runs see the same keys.
    for param in [*model.model.embed_tokens.parameters(), *model.model.layers[:3].parameters()]:
        param.requires_grad_(False)
    module = (ShardedModule if sharded else KnowledgeEditModule)(model, tokenizer=tiny_tokenizer(), learning_rate=1e-3)
    data = TextDataModule(train_files=path, block_size=BLOCK, max_tokens=BLOCK * BLOCKS, batch_size=batch_size,
                          shuffle=False)
    # Float32 targets in both runs: a sharded model cannot run the bfloat16 phase, which is on by default for the
    # single process on a CPU with native bfloat16.
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams={**FAST, "v_bfloat16": False}, statistics="train",
                                     metrics=["efficacy", "neighborhood"], revert_at="fit_end")
    return module, data, callback


def main(folder: Path, sharded: bool) -> None:
    torch.set_num_threads(1)
    # One optimizer step over all blocks: the gradient is the same mean whatever order each process reads them in.
    module, data, callback = parts(folder, sharded, batch_size=BLOCKS // 2 if sharded else BLOCKS)
    dumps = [Dump(folder, "trained", callback), callback, Dump(folder, "edited", callback),
             Dump(folder, "reverted", callback)]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if sharded else "auto"
    trainer = Trainer(accelerator="cpu", devices=2 if sharded else 1, strategy=strategy, max_steps=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=folder, callbacks=dumps)
    trainer.fit(module, data)


class InterruptAtEpoch(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            raise SystemExit(3)  # stands for a pre-emption after the first epoch's checkpoint


def resume_stage(folder: Path, stage: str) -> None:
    """Two epochs of one step each: ``whole`` uninterrupted, ``cut`` stopped after epoch 0's checkpoint,
    ``resumed`` from that checkpoint; each edits at fit end."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.set_num_threads(1)
    module, data, callback = parts(folder, True, batch_size=BLOCKS // 2)
    callbacks: list[Callback] = [callback, Dump(folder, f"{stage}-edited", callback)]
    if stage == "cut":
        callbacks += [ModelCheckpoint(dirpath=folder / "ckpt", save_on_train_epoch_end=True), InterruptAtEpoch()]
    trainer = Trainer(accelerator="cpu", devices=2, max_epochs=2, logger=False, enable_progress_bar=False,
                      strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                      enable_checkpointing=stage == "cut", enable_model_summary=False, default_root_dir=folder,
                      callbacks=callbacks)
    checkpoint = next((folder / "ckpt").glob("*.ckpt"), None) if stage == "resumed" else None
    trainer.fit(module, data, ckpt_path=checkpoint)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        resume_stage(Path(sys.argv[1]), sys.argv[2])
    else:
        main(Path(sys.argv[1]), sharded=True)
    # Lightning leaves a gloo process group alive at exit. Even destroyed, its C++ worker threads can abort the
    # interpreter's finalisation ("terminate called without an active exception", SIGABRT with no Python frame;
    # about 1 run in 6 on a 2-core machine). Every file is written and closed by now, so the process waits for the
    # other, destroys the group and leaves without finalisation.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
