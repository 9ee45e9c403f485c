"""``kedit stats`` on a tiny model saved as a Hugging Face folder."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.cli import main
from lightning_kedit.cli.stats import parse_layers
from lightning_kedit.statistics import KeyStatistics

TEXT = "The Eiffel Tower is located in Paris. Toko Yasuda plays the guitar. Berlin is the capital of Germany.\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_model("gpt2").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT * 20)
    return path


def _stats(folder, *extra):
    return main(["stats", "--model", str(folder), "--no-progress", "--window", "32", *map(str, extra)])


def test_writes_statistics_and_json(folder, text, tmp_path, capsys):
    out, report = tmp_path / "s.safetensors", tmp_path / "s.json"
    code = _stats(folder, "--text", text, "--layers", "0-1", "--tokens", 150, "--out", out, "--json", report)
    assert code == 0
    result = json.loads(report.read_text())
    assert result["layers"] == [0, 1] and result["tokens"] == 150 and result["path"] == str(out)
    assert result["tokens_per_second"] > 0 and result["source"] == "text:corpus.txt"
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and str(out) in printed
    from lightning_kedit import load_model

    model, tokenizer = load_model(str(folder))
    stats = KeyStatistics.load(out, model=model, tokenizer=tokenizer)
    assert stats.count(1) == 150 and torch.isfinite(stats.second_moment(1)).all()


def test_existing_output_needs_force(folder, text, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    assert _stats(folder, "--text", text, "--layers", "1", "--tokens", 40, "--out", out) == 0
    before = out.read_bytes()
    assert _stats(folder, "--text", text, "--layers", "1", "--tokens", 40, "--out", out) == 2
    assert "--force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _stats(folder, "--text", text, "--layers", "1", "--tokens", 60, "--out", out, "--force") == 0
    assert KeyStatistics.load(out).count(1) == 60


def test_default_output_is_the_cache(folder, text, tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert _stats(folder, "--text", text, "--layers", "0,1", "--tokens", 50, "--json", first) == 0
    assert _stats(folder, "--text", text, "--layers", "0,1", "--tokens", 50, "--json", second) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert not a["cached"] and b["cached"] and a["path"] == b["path"]
    assert a["path"].startswith(str(tmp_path / "cache" / "stats"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "0,7"], "outside the model"),
        (["--layers", "four"], "not a list of layer indices"),
        (["--layers", "0", "--window", "512"], "context of 256"),
        (["--layers", "0", "--tokens", "0"], "--tokens must be positive"),
    ],
)
def test_bad_arguments(folder, text, tmp_path, capsys, args, message):
    out = tmp_path / "s.safetensors"
    assert _stats(folder, "--text", text, "--out", out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_empty_and_missing_text(folder, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "s.safetensors"
    assert _stats(folder, "--text", empty, "--layers", "0", "--out", out) == 2
    assert "hold no text" in capsys.readouterr().err
    assert _stats(folder, "--text", tmp_path / "nope.txt", "--layers", "0", "--out", out) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_parse_layers():
    assert parse_layers("4-8", 30) == [4, 5, 6, 7, 8]
    assert parse_layers("3, 1,1", 4) == [1, 3]


def test_auto_layers_use_tracing_or_the_default(folder, text, tmp_path, monkeypatch):
    import sys

    import lightning_kedit.tracing

    monkeypatch.setattr(lightning_kedit.tracing, "choose_edit_layers", lambda model, tokenizer, window: [2])
    report = tmp_path / "auto.json"
    assert _stats(folder, "--text", text, "--tokens", 30, "--out", tmp_path / "a", "--json", report) == 0
    result = json.loads(report.read_text())
    assert result["layers"] == [2] and "tracing" in result["layers_note"]

    monkeypatch.setitem(sys.modules, "lightning_kedit.tracing", None)  # tracing unavailable: import fails
    assert _stats(folder, "--text", text, "--tokens", 30, "--out", tmp_path / "b", "--json", report) == 0
    result = json.loads(report.read_text())
    assert result["layers"] == [0, 1, 2] and "default" in result["layers_note"]
