"""``kedit eval`` on a tiny model folder: JSON keys and ranges, agreement with the API, and bad input."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import shared_data
from tiny_models import _CORPUS, tiny_model, tiny_tokenizer

from lightning_kedit.cli import main
from lightning_kedit.evaluation.request_evaluation import evaluate_requests
from lightning_kedit.requests import load_requests

KEYS = ["n", "efficacy", "paraphrase", "neighborhood", "consistency", "score", "efficacy_prob", "paraphrase_prob",
        "neighborhood_prob", "perplexity", "model", "seconds"]

RECORDS = [  # the KnowEdit CounterFact layout of ../shared/data/counterfact
    {"case_id": 0, "prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target_new": "piano",
     "ground_truth": "guitar", "rephrase_prompt": "Toko Yasuda is known for playing the",
     "locality_prompt": "Michael Jordan plays", "locality_ground_truth": "basketball"},
    {"case_id": 1, "prompt": "The capital of Italy is", "subject": "Italy", "target_new": "London",
     "ground_truth": "Rome", "rephrase_prompt": "Italy has its capital in",
     "locality_prompt": "Berlin is the capital of", "locality_ground_truth": "Germany"},
    {"case_id": 2, "prompt": "Apple was founded by", "subject": "Apple", "target_new": "Bill Gates",
     "ground_truth": "Steve Jobs", "rephrase_prompt": "The founder of Apple is",
     "locality_prompt": "Microsoft was founded by", "locality_ground_truth": "Bill Gates"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "requests.json").write_text(json.dumps(RECORDS))
    (root / "text.txt").write_text(_CORPUS)
    return root


def kedit(*argv: str) -> int:
    return main(["eval", *map(str, argv)])


def test_json_keys_ranges_and_api_agreement(files, tmp_path, capsys):
    out = tmp_path / "out.json"
    code = kedit("--model", files / "model", "--requests", files / "requests.json", "--ppl-text", files / "text.txt",
                 "--ppl-tokens", 100, "--batch-size", 2, "--json", out)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(out.read_text())
    assert list(result) == KEYS
    assert result["n"] == 3 and result["model"] == str(files / "model") and result["seconds"] > 0
    assert result["consistency"] is None and result["perplexity"] > 1
    for key in ("efficacy", "paraphrase", "neighborhood", "score", "efficacy_prob", "paraphrase_prob",
                "neighborhood_prob"):
        assert 0.0 <= result[key] <= 1.0, key
    assert "efficacy" in captured.out and "perplexity" in captured.out
    assert "scoring" not in captured.err  # no progress bar off a terminal
    from lightning_kedit.models import load_model

    model, tokenizer = load_model(str(files / "model"))
    direct = evaluate_requests(model, tokenizer, load_requests(files / "requests.json"))
    for key in ("efficacy", "paraphrase", "neighborhood", "score", "efficacy_prob"):
        assert result[key] == pytest.approx(direct[key], abs=1e-6), key


def test_n_limits_the_requests(files, tmp_path, capsys):
    out = tmp_path / "out.json"
    assert kedit("--model", files / "model", "--requests", files / "requests.json", "--n", 2, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and result["perplexity"] is None


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--requests", "missing.json"], "--requests 'missing.json' is not a file"),
        (["--requests", "{requests}", "--n", "10"], "n=10"),
        (["--requests", "{requests}", "--n", "0"], "--n must be a positive"),
        (["--requests", "{requests}", "--ppl-text", "missing.txt"], "--ppl-text 'missing.txt' is not a file"),
        (["--requests", "{requests}", "--ppl-text", "{binary}"], "not UTF-8"),
        (["--requests", "{requests}", "--ppl-tokens", "1"], "--ppl-tokens must be at least 2"),
        (["--requests", "{requests}", "--batch-size", "0"], "--batch-size must be positive"),
        (["--requests", "{requests}", "--delta", "{requests}"], "delta"),
        (["--requests", "{text}"], "{text}"),
    ],
)
def test_bad_input(files, tmp_path, capsys, argv, message):
    (files / "binary.txt").write_bytes(bytes(range(256)) * 8)
    names = {"requests": files / "requests.json", "binary": files / "binary.txt", "text": files / "text.txt"}
    argv = [a.format(**names) for a in argv]
    out = tmp_path / "out.json"
    assert kedit("--model", files / "model", *argv, "--json", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kedit eval: error:") and len(err.splitlines()) == 1
    assert message.format(**names) in err
    assert not out.exists()


def test_delta_is_applied(files, tmp_path, capsys):
    import torch

    from lightning_kedit.editing import EditDelta
    from lightning_kedit.models import load_model

    model, _ = load_model(str(files / "model"))
    delta_path = tmp_path / "delta.safetensors"
    EditDelta.from_model(model, {1: 0.5 * torch.randn(32, 64, generator=torch.Generator().manual_seed(0))},
                         method="test").save(delta_path)
    base, edited = tmp_path / "base.json", tmp_path / "edited.json"
    common = ["--model", files / "model", "--requests", files / "requests.json"]
    assert kedit(*common, "--json", base) == 0
    assert kedit(*common, "--delta", delta_path, "--json", edited) == 0
    before, after = json.loads(base.read_text()), json.loads(edited.read_text())
    assert list(after) == KEYS
    assert after["efficacy_prob"] != pytest.approx(before["efficacy_prob"], abs=1e-6)
    other = tmp_path / "other.safetensors"
    EditDelta.from_model(tiny_model("gpt2"), {1: torch.ones(32, 64)}, method="test").save(other)
    assert kedit(*common, "--delta", other) == 2
    assert "another architecture" in capsys.readouterr().err


def test_delta_without_editing_module(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning_kedit.editing", None)  # makes the import fail
    assert kedit("--model", files / "model", "--requests", files / "requests.json", "--delta",
                 files / "requests.json") == 2
    assert "editing" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_counterfact(tmp_path, capsys):
    requests = shared_data("counterfact", "counterfact-val.json")
    text = shared_data("text", "wikitext2_test.txt")
    out = tmp_path / "out.json"
    assert kedit("--requests", requests, "--n", 8, "--ppl-text", text, "--ppl-tokens", 600, "--json", out) == 0
    result = json.loads(out.read_text())
    assert list(result) == KEYS and result["n"] == 8 and result["model"] == "smollm2"
    for key in KEYS[1:9]:
        assert result[key] is None if key == "consistency" else 0.0 <= result[key] <= 1.0, key
    assert 5 < result["perplexity"] < 100  # an unedited 135M model on WikiText-2
