"""KnowledgeEditCallback in one process: statistics from batches, when to edit, logging, checkpoints, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.errors import KeditError
from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule
from lightning_kedit.lightning.strategies import check_strategy
from lightning_kedit.models.forward_hooks import capture_inputs
from lightning_kedit.requests import EditRequest, PromptAnswer

TEXT = (
    "The Eiffel Tower is located in Paris. Toko Yasuda plays the guitar. Danielle Darrieux speaks French. "
    "The capital of Italy is Rome. Michael Jordan plays basketball. Berlin is the capital of Germany. "
) * 4

REQUESTS = [
    EditRequest("a", "{} plays the", "Toko Yasuda", "piano", "guitar",
                paraphrase_prompts=("Toko Yasuda is known for the",),
                neighborhood=(PromptAnswer("Michael Jordan plays", "basketball"),)),
    EditRequest("b", "{} speaks", "Danielle Darrieux", "English", "French",
                neighborhood=(PromptAnswer("The capital of Italy is", "Rome"),)),
]
LAYERS = [1, 2]
FAST = {"v_steps": 4, "prefix_lengths": []}


class RecordingLogger(Logger):
    """Keeps what the trainer's loggers receive."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[dict[str, float], int | None]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((dict(metrics), step))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class NeverEdit(KnowledgeEditCallback):
    def should_edit(self, trainer, pl_module, moment=None) -> bool:
        return False


def test_an_override_without_the_moment_argument_is_told_it_is_deprecated():
    from lightning_kedit.lightning.edit_moments import takes_moment

    class OldStyle(KnowledgeEditCallback):
        def should_edit(self, trainer, pl_module) -> bool:
            return self.moment == "fit_end"

    with pytest.warns(DeprecationWarning, match=r"OldStyle.should_edit\(trainer, pl_module\) reads `self.moment`"):
        assert not takes_moment(OldStyle(REQUESTS, layers=LAYERS, metrics=False).should_edit)
    assert takes_moment(NeverEdit(REQUESTS, layers=LAYERS, metrics=False).should_edit)


def _module(lr: float = 1e-3) -> KnowledgeEditModule:
    return KnowledgeEditModule(tiny_model("llama", num_layers=4), tokenizer=tiny_tokenizer(), learning_rate=lr)


def _data(tmp_path, **kwargs) -> TextDataModule:
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return TextDataModule(train_files=path, **{"block_size": 24, "batch_size": 3, "shuffle": False, **kwargs})


def _trainer(tmp_path, **kwargs) -> Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    return Trainer(**{**defaults, **kwargs})


def _weights(module: KnowledgeEditModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_statistics_from_training_batches_match_a_naive_float64_sum(tmp_path):
    module, data = _module(lr=0.0), _data(tmp_path)
    callback = NeverEdit(REQUESTS, layers=LAYERS, statistics="train", metrics=False)
    _trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(module, data)
    model = module.model.eval()
    projections = {str(layer): model.model.layers[layer].mlp.down_proj for layer in LAYERS}
    # Naive reference: each block alone (no padding at all), Σ k kᵀ in float64 by a loop over tokens.
    total = {layer: torch.zeros(64, 64, dtype=torch.float64) for layer in LAYERS}
    count = 0
    with torch.no_grad(), capture_inputs(projections) as seen:
        for block in data.datasets["train"]:
            model(block[None])
            count += len(block)
    for layer in LAYERS:
        for keys in seen[str(layer)]:
            for k in keys[0].double():
                total[layer] += torch.outer(k, k)
    assert len(data.datasets["train"][-1]) < 24, "the last block must be padded to test the mask"
    for layer in LAYERS:
        assert callback.statistics.count(layer) == count
        torch.testing.assert_close(callback.statistics.second_moment(layer), total[layer] / count,
                                   rtol=1e-5, atol=1e-8)
    for layer in LAYERS:
        assert not model.model.layers[layer].mlp.down_proj._forward_pre_hooks


def test_edit_at_fit_end_writes_the_facts_logs_metrics_and_reverts(tmp_path):
    module, data, logger = _module(), _data(tmp_path), RecordingLogger()
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train",
                                     save_delta_to=tmp_path / "deltas")
    trainer = _trainer(tmp_path, max_steps=3, logger=logger, callbacks=[callback])
    trainer.fit(module, data)
    trained_then_edited = _weights(module)
    assert [record.key for record in callback.applied] == ["fit_end"]
    assert callback.applied[0].request_ids == ("a", "b")
    metrics = callback.history[-1]
    # A tiny random model's answers barely move (efficacy is checked on SmolLM2 in the example); here the
    # metrics must exist, before and after, as rates.
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("efficacy", "efficacy_before", "neighborhood", "score"))
    logged = {k for row, _ in logger.rows for k in row}
    assert {"edit/efficacy", "edit/neighborhood", "edit/score", "edit/efficacy_before"} <= logged
    assert (tmp_path / "deltas" / "fit_end.safetensors").is_file()
    assert callback.revert(trainer) == 1
    reverted = _weights(module)
    changed = [k for k in reverted if not torch.equal(reverted[k], trained_then_edited[k])]
    assert changed == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in LAYERS]


def test_resume_after_the_edit_applies_it_exactly_once(tmp_path):
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train",
                                     edit_at="epoch_end", epochs=[0], metrics=False, checkpoint_deltas=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True, save_top_k=-1)
    module = _module(lr=0.0)
    _trainer(tmp_path, max_epochs=1, callbacks=[callback, checkpoint], enable_checkpointing=True).fit(
        module, _data(tmp_path)
    )
    edited = _weights(module)
    (path,) = sorted((tmp_path / "ckpt").glob("*.ckpt"))

    # A fresh process would start from the unedited model: the checkpoint brings the edit and its record.
    resumed = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train",
                                    edit_at="epoch_end", epochs=[0], metrics=False, checkpoint_deltas=True)
    fresh = _module(lr=0.0)
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[resumed])
    trainer.fit(fresh, _data(tmp_path), ckpt_path=path)
    assert [record.key for record in resumed.applied] == ["epoch:0"]
    after = _weights(fresh)
    assert all(torch.equal(after[k], edited[k]) for k in edited)
    # The delta travelled in the checkpoint: the resumed callback can take the edit out.
    assert resumed.revert(trainer) == 1
    name = "model.layers.2.mlp.down_proj.weight"
    assert not torch.equal(fresh.model.state_dict()[name], edited[name])


def test_every_n_steps_edits_once_per_step_key(tmp_path):
    callback = KnowledgeEditCallback(REQUESTS[:1], layers=[2], hparams=FAST, statistics="train",
                                     edit_at="step", every_n_steps=2, metrics=["efficacy"])
    _trainer(tmp_path, max_steps=4, callbacks=[callback]).fit(_module(), _data(tmp_path, batch_size=2))
    assert [record.key for record in callback.applied] == ["step:2", "step:4"]
    assert len({record.digest for record in callback.applied}) == 2


def test_edit_at_predict_start_and_revert_at_predict_end(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Toko Yasuda plays the\n")
    module = _module()
    before = _weights(module)
    stats_file = tmp_path / "train.txt"
    stats_file.write_text(TEXT)
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics=[stats_file],
                                     edit_at="predict_start", revert_at="predict_end", metrics=["efficacy"])
    trainer = _trainer(tmp_path, callbacks=[callback])
    trainer.predict(module, TextDataModule(predict_file=prompts))
    assert callback.history[-1]["key"] == "predict_start"
    assert callback.applied == ()
    after = _weights(module)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_state_key_is_unique_per_configuration():
    a = KnowledgeEditCallback(REQUESTS, layers=[1])
    assert a.state_key == KnowledgeEditCallback(REQUESTS, layers=[1]).state_key
    assert a.state_key != KnowledgeEditCallback(REQUESTS, layers=[2]).state_key
    assert a.state_key != KnowledgeEditCallback(REQUESTS[:1], layers=[1]).state_key
    assert a.state_key != KnowledgeEditCallback(REQUESTS, layers=[1], edit_at="epoch_end").state_key


def test_unsupported_strategies_are_refused_by_name():
    deepspeed = type("DeepSpeedStrategy", (DDPStrategy,), {})()
    with pytest.raises(MisconfigurationException, match="DeepSpeedStrategy"):
        check_strategy(deepspeed)
    from lightning.pytorch.strategies import ModelParallelStrategy

    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        check_strategy(ModelParallelStrategy())
    callback = KnowledgeEditCallback(REQUESTS)
    trainer = SimpleNamespace(strategy=ModelParallelStrategy())
    with pytest.raises(MisconfigurationException, match="ModelParallelStrategy"):
        callback.setup(trainer, _module(), "fit")  # type: ignore[arg-type]


def test_no_statistics_collected_is_a_clear_error(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Paris\n")
    module = _module()
    before = _weights(module)
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, statistics="validation", edit_at="predict_start")
    with pytest.raises(KeditError, match="no key statistics were collected from 'validation'"):
        _trainer(tmp_path, callbacks=[callback]).predict(module, TextDataModule(predict_file=prompts))
    after = _weights(module)
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"requests": "missing.json"}, "`requests` file 'missing.json' not found"),
        ({"requests": []}, "non-empty sequence of EditRequest"),
        ({"method": "magic"}, "`method` must be one of"),
        ({"edit_at": "lunch"}, "unknown moments \\['lunch'\\]"),
        ({"edit_at": "step"}, "every_n_steps"),
        ({"every_n_steps": 0, "edit_at": "step"}, "`every_n_steps` must be >= 1"),
        ({"epochs": [1]}, "`epochs`=\\[1\\] needs edit_at='epoch_end'"),
        ({"revert_at": "never"}, "`revert_at` must be one of"),
        ({"statistics": "predict", "edit_at": "predict_start"}, "no prediction batch has run"),
        ({"statistics": "nope.safetensors"}, "`statistics` file\\(s\\) \\['nope.safetensors'\\] not found"),
        ({"metrics": ["efficacy", "joy"]}, "unknown names \\['joy'\\]"),
        ({"ppl_text": "nope.txt"}, "`ppl_text` file 'nope.txt' not found"),
    ],
)
def test_invalid_arguments_are_refused_with_their_name(kwargs, message):
    kwargs = {"requests": REQUESTS, **kwargs}
    with pytest.raises(KeditError, match=message):
        KnowledgeEditCallback(**kwargs)


def test_resume_of_a_finished_run_does_not_edit_twice(tmp_path):
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False)
    module = _module(lr=0.0)
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[callback])
    trainer.fit(module, _data(tmp_path))
    trainer.save_checkpoint(tmp_path / "edited.ckpt")
    edited = _weights(module)

    resumed = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False)
    fresh = _module(lr=0.0)
    _trainer(tmp_path, max_steps=3, callbacks=[resumed]).fit(fresh, _data(tmp_path), ckpt_path=tmp_path / "edited.ckpt")
    # One more (lr=0) step ran and fit ended again: the recorded fit-end edit is not applied a second time.
    assert [record.key for record in resumed.applied] == ["fit_end"]
    after = _weights(fresh)
    assert all(torch.equal(after[k], edited[k]) for k in edited)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_statistics_stay_float64_and_the_edit_applies_under_bf16(tmp_path, precision):
    callback = KnowledgeEditCallback(REQUESTS, layers=LAYERS, hparams=FAST, statistics="train", metrics=False)
    module = _module()
    _trainer(tmp_path, max_steps=2, precision=precision, callbacks=[callback]).fit(module, _data(tmp_path))
    assert callback.statistics.second_moment(LAYERS[0]).dtype == torch.float64
    assert [record.key for record in callback.applied] == ["fit_end"]
    weight = module.model.model.layers[LAYERS[-1]].mlp.down_proj.weight
    assert weight.dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert torch.isfinite(weight).all()
