"""KnowledgeEditCallback under DDP (2 CPU processes, gloo): the same edit on every rank."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from test_lightning_callback import FAST, LAYERS, REQUESTS, TEXT
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

BLOCK, BLOCKS = 16, 8


class DumpPerRank(Callback):
    """After the edit: each rank writes its weights, the gathered statistics, the edit's digest, whether it
    adopted rank 0's delta instead of its own, and the warnings raised while it ran."""

    def __init__(self, folder, edit: KnowledgeEditCallback) -> None:
        self.folder = folder
        self.edit = edit
        self._warnings = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._warnings = self._catcher.__enter__()
        warnings.simplefilter("always")

    def on_train_end(self, trainer, pl_module) -> None:
        statistics = self.edit.gathered_statistics(trainer)
        self._catcher.__exit__(None, None, None)
        torch.save(
            {
                "weights": {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()},
                "statistics": {k: v.clone() for k, v in statistics.metric_state.items()},
                "digests": [record.digest for record in self.edit.applied],
                "history": self.edit.history,
                "disagreements": list(self.edit.rank_disagreements),
                "warnings": [str(w.message) for w in self._warnings],
            },
            self.folder / f"rank{trainer.global_rank}.pt",
        )


class DifferentOnRankOne(KnowledgeEditCallback):
    """Rank 1 optimises its target values with other settings, so it computes another delta than rank 0."""

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.global_rank == 1:
            self.hparams = self.hparams.replace(v_lr=self.hparams.v_lr * 0.5)


def _setup(tmp_path, batch_size: int):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    model = tiny_model("llama", num_layers=4)
    # Only the top block and the head train: the keys of the edit layers (1, 2) then do not depend on how
    # the gradients were reduced, so the statistics of both runs must agree to float64 rounding.
    for param in [*model.model.embed_tokens.parameters(), *model.model.layers[:3].parameters()]:
        param.requires_grad_(False)
    module = KnowledgeEditModule(model, tokenizer=tiny_tokenizer(), learning_rate=1e-3)
    data = TextDataModule(train_files=path, block_size=BLOCK, max_tokens=BLOCK * BLOCKS, batch_size=batch_size,
                          shuffle=False)
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train",
                                     metrics=["efficacy", "neighborhood", "score"])
    return module, data, callback


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(accelerator="cpu", max_steps=2, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path)
    return Trainer(**{**defaults, **kwargs})


@pytest.mark.distributed
def test_ddp_edit_is_bit_identical_on_both_ranks_and_uses_every_batch(tmp_path):
    module, data, callback = _setup(tmp_path, batch_size=BLOCKS // 4)
    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn", logger=CSVLogger(tmp_path, name="logs"),
                       callbacks=[callback, DumpPerRank(tmp_path, callback)])
    trainer.fit(module, data)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    assert rank0["digests"] == rank1["digests"] and len(rank0["digests"]) == 1
    # Each rank computed that delta on its own: rank 0's was not sent to the other.
    assert rank0["disagreements"] == rank1["disagreements"] == []
    assert not any("computed different deltas" in w for w in rank0["warnings"] + rank1["warnings"])
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])

    # One process over the same global batches (each step sees the union of both ranks' batches).
    single_module, single_data, single = _setup(tmp_path, batch_size=BLOCKS // 2)
    _trainer(tmp_path, devices=1, logger=False, callbacks=[single]).fit(single_module, single_data)
    expected = single.statistics.metric_state
    for name, value in rank0["statistics"].items():
        if name.startswith("count"):
            assert int(value) == int(expected[name]) == BLOCK * BLOCKS
        else:
            torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12)

    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"edit/efficacy", "edit/neighborhood", "edit/score", "edit/efficacy_before"} <= logged
    assert rank0["history"][-1]["efficacy"] == rank1["history"][-1]["efficacy"]


@pytest.mark.distributed
def test_ranks_that_compute_different_deltas_all_apply_rank_zeros_and_say_so(tmp_path):
    module, data, _ = _setup(tmp_path, batch_size=BLOCKS // 4)
    callback = DifferentOnRankOne(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=["efficacy"])
    trainer = _trainer(tmp_path, devices=2, strategy="ddp_spawn", logger=False,
                       callbacks=[callback, DumpPerRank(tmp_path, callback)])
    trainer.fit(module, data)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    assert rank0["disagreements"] == [] and len(rank1["disagreements"]) == 1
    _, computed, adopted = rank1["disagreements"][0]
    assert computed != adopted == rank0["digests"][0] == rank1["digests"][0]
    assert any("computed different deltas" in w for w in rank0["warnings"])
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
