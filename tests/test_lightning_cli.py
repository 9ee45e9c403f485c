"""`kedit fit|predict --config`: the example configs run end to end on a tiny model saved as a folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.cli import main
from lightning_kedit.requests import load_requests

ROOT = Path(__file__).resolve().parents[1]
TEXT = "The Eiffel Tower is located in Paris. Toko Yasuda plays the guitar. Berlin is the capital of Germany. " * 8


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama", num_layers=4).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _config(name: str, tmp_path: Path, tiny_folder: Path) -> dict:
    config = yaml.safe_load((ROOT / "examples" / name).read_text())
    config["model"]["model"] = str(tiny_folder)
    (init,) = [c["init_args"] for c in config["trainer"]["callbacks"]]
    init["requests"] = str(ROOT / init["requests"])
    init["n_requests"] = 2
    init["layers"] = [1, 2]
    init["hparams"] = {"v_steps": 3, "prefix_lengths": []}
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    if init.get("statistics") is None:
        init["statistics"] = [str(text)]
    return config, init, text


def test_fit_config_fine_tunes_edits_and_saves_the_delta(tmp_path, tiny_folder, monkeypatch):
    config, init, text = _config("finetune_then_edit.yaml", tmp_path, tiny_folder)
    init["save_delta_to"] = str(tmp_path / "deltas")
    config["trainer"].update(max_steps=2, logger=False)
    config["data"].update(train_files=str(text), block_size=32, max_tokens=256)
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(path)]) == 0
    assert (tmp_path / "deltas" / "fit_end.safetensors").is_file()


def test_predict_config_writes_completions_of_the_request_prompts(tmp_path, tiny_folder, monkeypatch):
    config, _, _ = _config("serve_with_edits.yaml", tmp_path, tiny_folder)
    requests = ROOT / config["data"]["predict_file"]
    config["data"].update(predict_file=str(requests), n_prompts=3)
    config["completions"]["output"] = str(tmp_path / "completions.jsonl")
    path = tmp_path / "predict.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--config", str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [r.prompt_text for r in load_requests(requests, n=3)]
    assert all(isinstance(row["completion"], str) for row in rows)


def test_a_missing_file_is_a_one_line_error(tmp_path, tiny_folder, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.model", str(tiny_folder), "--data.train_files", str(tmp_path / "nope.txt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kedit fit: error: `train_files`: text file") and "nope.txt" in err[-1]


@pytest.mark.integration
def test_smollm2_serves_with_the_edit_applied_at_predict_start_and_reverts(smollm2, tmp_path):
    from lightning.pytorch import Trainer

    from lightning_kedit.editing import EditDelta
    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule
    from lightning_kedit.requests import bundled_requests

    model, tokenizer = smollm2
    requests = bundled_requests()[:2]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(r.prompt_text + "\n" for r in requests))
    module = KnowledgeEditModule(model, tokenizer=tokenizer, max_new_tokens=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if "down_proj" in k}
    # statistics=None: the cached statistics of the bundled corpus (collected once per machine).
    callback = KnowledgeEditCallback(tuple(requests), statistics=None, edit_at="predict_start",
                                     revert_at="predict_end", metrics=["efficacy"], save_delta_to=tmp_path)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[callback])
    served = [row for batch in trainer.predict(module, TextDataModule(predict_file=prompts)) for row in batch]
    assert callback.history[-1]["key"] == "predict_start" and callback.applied == ()
    after = {k: v for k, v in model.state_dict().items() if "down_proj" in k}
    assert all(torch.equal(after[k], before[k]) for k in before)

    # The completions served are those of the model with the saved delta applied.
    plain = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with EditDelta.load(tmp_path / "predict_start.safetensors").applied(model):
        again = plain.predict(module, TextDataModule(predict_file=prompts))
    assert [row for batch in again for row in batch] == served
