"""KnowledgeEditCallback resumed under DDP (2 CPU processes, gloo): the statistics of every process carry over.

A run is interrupted after its first epoch (a checkpoint written at the epoch's end), resumed from that checkpoint,
and edits at fit end. Its statistics and its edited weights must be those of a run that was never interrupted,
over the same batches.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_lightning_callback import FAST, LAYERS, REQUESTS, TEXT
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.errors import KeditError
from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule
from lightning_kedit.lightning.statistics_checkpoint import statistics_file_name

BLOCK, BLOCKS, EPOCHS = 16, 8, 2


class Interrupted(RuntimeError):
    """Stands for a crash or a pre-emption between two epochs."""


class InterruptAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise Interrupted(f"interrupted at the start of epoch {self.epoch}")


class DumpPerRank(Callback):
    """After the edit: each rank writes its weights, gathered statistics and the edit's digest."""

    def __init__(self, folder, edit: KnowledgeEditCallback) -> None:
        self.folder = folder
        self.edit = edit

    def on_train_end(self, trainer, pl_module) -> None:
        statistics = self.edit.gathered_statistics(trainer)
        torch.save(
            {
                "weights": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                "statistics": {k: v.clone() for k, v in statistics.metric_state.items()},
                "digests": [record.digest for record in self.edit.applied],
                "global_step": trainer.global_step,
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


def _parts(folder, batch_size: int, freeze_lower: bool):
    path = folder / "train.txt"
    path.write_text(TEXT)
    model = tiny_model("llama", num_layers=4)
    if freeze_lower:
        # The keys of the edit layers (1, 2) then do not depend on training, so runs with other batch splits
        # see the same keys.
        for param in [*model.model.embed_tokens.parameters(), *model.model.layers[:3].parameters()]:
            param.requires_grad_(False)
    module = KnowledgeEditModule(model, tokenizer=tiny_tokenizer(), learning_rate=1e-3)
    data = TextDataModule(train_files=path, block_size=BLOCK, max_tokens=BLOCK * BLOCKS, batch_size=batch_size,
                          shuffle=False)
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train",
                                     metrics=["efficacy"])
    return module, data, callback


def _trainer(folder, devices: int, callbacks, **kwargs) -> Trainer:
    settings = dict(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                    max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=folder, callbacks=callbacks)
    return Trainer(**{**settings, **kwargs})


def _dumps(folder, world: int) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _interrupted_checkpoint(folder, freeze_lower: bool):
    """Train one epoch on 2 processes, checkpoint it, and stop at the next epoch's start."""
    module, data, callback = _parts(folder, batch_size=2, freeze_lower=freeze_lower)
    checkpoint = ModelCheckpoint(dirpath=folder / "ckpt", save_on_train_epoch_end=True, save_top_k=-1)
    trainer = _trainer(folder, 2, [callback, checkpoint, InterruptAtEpoch(1)], enable_checkpointing=True)
    with pytest.raises(Exception, match="interrupted at the start of epoch 1"):
        trainer.fit(module, data)
    (path,) = sorted((folder / "ckpt").glob("*.ckpt"))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-process run, and a checkpoint of the same run interrupted after epoch 0."""
    whole = tmp_path_factory.mktemp("whole")
    module, data, callback = _parts(whole, batch_size=2, freeze_lower=True)
    _trainer(whole, 2, [callback, DumpPerRank(whole, callback)], enable_checkpointing=False).fit(module, data)
    cut = tmp_path_factory.mktemp("cut")
    return whole, cut, _interrupted_checkpoint(cut, freeze_lower=True)


@pytest.mark.distributed
def test_resumed_ddp_run_edits_with_the_statistics_and_weights_of_an_uninterrupted_one(runs, tmp_path):
    whole, _, checkpoint = runs
    saved = torch.load(checkpoint, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if k.startswith("KnowledgeEditCallback")]
    reference = state["statistics_files"]
    # Every process's sums are referenced once, with the world size; none is inside the checkpoint file.
    assert reference["world_size"] == 2 and len(reference["files"]) == 2 and "statistics" not in state
    assert len({entry["name"] for entry in reference["files"]}) == 2
    assert all((checkpoint.parent / entry["name"]).is_file() for entry in reference["files"])

    module, data, callback = _parts(tmp_path, batch_size=2, freeze_lower=True)
    _trainer(tmp_path, 2, [callback, DumpPerRank(tmp_path, callback)], enable_checkpointing=False).fit(
        module, data, ckpt_path=checkpoint
    )
    expected, resumed = _dumps(whole, 2), _dumps(tmp_path, 2)
    assert resumed[0]["global_step"] == expected[0]["global_step"] == EPOCHS * BLOCKS // 4
    for name, value in expected[0]["statistics"].items():
        if name.startswith("count"):
            assert int(value) == BLOCK * BLOCKS * EPOCHS
        for rank in range(2):
            torch.testing.assert_close(resumed[rank]["statistics"][name], value, rtol=1e-10, atol=0)
            # Same world size: each rank continues from its own sums, so even the rounding is the same.
            assert torch.equal(resumed[rank]["statistics"][name], value)
    for rank in range(2):
        assert resumed[rank]["digests"] == expected[rank]["digests"] and len(resumed[rank]["digests"]) == 1
        for key, value in expected[rank]["weights"].items():
            assert torch.equal(resumed[rank]["weights"][key], value), key


@pytest.mark.distributed
def test_a_two_process_checkpoint_resumes_on_one_process_with_the_summed_statistics(runs, tmp_path):
    whole, _, checkpoint = runs
    # One process over the same global batches: each of its steps sees both ranks' batches.
    module, data, callback = _parts(tmp_path, batch_size=4, freeze_lower=True)
    _trainer(tmp_path, 1, [callback, DumpPerRank(tmp_path, callback)], enable_checkpointing=False).fit(
        module, data, ckpt_path=checkpoint
    )
    (resumed,), expected = _dumps(tmp_path, 1), _dumps(whole, 2)[0]
    for name, value in expected["statistics"].items():
        torch.testing.assert_close(resumed["statistics"][name], value, rtol=1e-10, atol=1e-12)


def test_a_missing_or_altered_statistics_file_stops_the_resume_with_its_name(tmp_path):
    module, data, callback = _parts(tmp_path, batch_size=4, freeze_lower=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True)
    trainer = _trainer(tmp_path, 1, [callback, checkpoint], enable_checkpointing=True)
    trainer.fit(module, data)
    (path,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    state = torch.load(path, weights_only=False)["callbacks"][callback.state_key]
    assert set(state) == {"applied", "statistics_files"}  # the sums are beside the checkpoint, not inside
    stats_file = path.parent / statistics_file_name(state["statistics_files"]["files"][0]["sha256"])
    assert stats_file.is_file()

    def resume() -> None:
        fresh, fresh_data, again = _parts(tmp_path, batch_size=4, freeze_lower=False)
        _trainer(tmp_path, 1, [again], enable_checkpointing=False, max_epochs=EPOCHS + 1).fit(
            fresh, fresh_data, ckpt_path=path
        )

    original = stats_file.read_bytes()
    stats_file.write_bytes(original[:-8] + bytes(8))  # the last values altered, the header intact
    with pytest.raises(KeditError, match="content hash differs"):
        resume()
    stats_file.unlink()
    with pytest.raises(KeditError, match=stats_file.name):
        resume()
