"""``kedit edit`` and ``kedit export`` on a tiny saved model; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from test_memit import REQUESTS, statistics_for
from tiny_models import tiny_model, tiny_tokenizer

from lightning_kedit.cli import main
from lightning_kedit.editing.delta import EditDelta
from lightning_kedit.models.adapters import ModelAdapter
from lightning_kedit.models.fingerprint import model_fingerprint
from lightning_kedit.requests import save_requests

FAST = ["--v-steps", "3", "--lambda", "1.0"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_edit")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_requests(REQUESTS, root / "requests.json")
    stats = statistics_for(model, [1, 2])
    stats.save(root / "stats.safetensors", model_fingerprint(model, tokenizer, [1, 2]))
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))


def _edit(workspace, out, *extra):
    return main(["edit", "--model", str(workspace / "model"), "--requests", str(workspace / "requests.json"),
                 "--stats", str(workspace / "stats.safetensors"), "--layers", "1,2", "--out", str(out), *FAST,
                 *extra])


def test_edit_then_export(workspace, tmp_path):
    out, report = tmp_path / "edit.safetensors", tmp_path / "edit.json"
    assert _edit(workspace, out, "--json", str(report)) == 0
    result = json.loads(report.read_text())
    assert result["n"] == 2 and result["layers"] == [1, 2] and result["hparams"]["mom2_weight"] == 1.0
    assert {"keys", "targets", "solve", "apply"} <= set(result["seconds"])
    assert 0.0 <= result["after"]["efficacy"] <= 1.0
    delta = EditDelta.load(out)
    assert delta.method == "memit" and delta.request_ids == ("a", "b")

    folder = tmp_path / "exported"
    assert main(["export", "--model", str(workspace / "model"), "--delta", str(out), "--out", str(folder)]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(workspace / "model")
    delta.apply(base)
    adapter = ModelAdapter.for_model(exported)
    for layer in range(adapter.num_layers):
        assert torch.equal(adapter.weight(layer), ModelAdapter.for_model(base).weight(layer))
    assert (folder / "tokenizer.json").is_file()
    # A second export onto the non-empty folder is refused.
    assert main(["export", "--model", str(workspace / "model"), "--delta", str(out), "--out", str(folder)]) == 2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "1,9"], "outside the model"),
        (["--layers", "2,3"], "layers"),
        (["--v-lr", "0"], "v_lr"),
        (["--n", "0"], "--n"),
    ],
)
def test_bad_edit_input_exits_2_and_writes_nothing(workspace, tmp_path, capsys, extra, message):
    out = tmp_path / "edit.safetensors"
    assert _edit(workspace, out, "--no-eval", *extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_empty_request_file(workspace, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    out = tmp_path / "edit.safetensors"
    code = main(["edit", "--model", str(workspace / "model"), "--requests", str(empty), "--out", str(out)])
    assert code == 2 and not out.exists()


def test_every_scalar_hyper_parameter_is_an_option_of_edit_and_serve():
    """The options come from EditHyperParams: each scalar field has one, with its docstring as help."""
    import dataclasses

    from lightning_kedit.cli import build_parser
    from lightning_kedit.cli.edit import hparams_from_args
    from lightning_kedit.cli.hparam_options import hparam_options
    from lightning_kedit.editing.hparams import EditHyperParams

    own_options = {"layers", "lambda_relative", "v_bfloat16", "prefix_lengths", "extra"}
    scalar = {f.name for f in dataclasses.fields(EditHyperParams)} - own_options
    options = hparam_options()
    assert {option.field for option in options.values()} == scalar
    assert {"lambda", "clamp", "kl", "v_steps", "v_lr"} <= set(options)  # the contract's names
    assert all(option.help for option in options.values())
    # A valid value other than the default, for every option, reaches the hyper-parameters through both parsers.
    model = tiny_model()
    defaults = EditHyperParams.for_model(model, "memit")
    values = {name: getattr(defaults, option.field) + 1 if option.kind is int else getattr(defaults, option.field) / 2
              for name, option in options.items()}
    flags = [item for name, value in values.items() for item in (f"--{name.replace('_', '-')}", str(value))]
    parser = build_parser()
    edit_args = parser.parse_args(["edit", "--requests", "r.json", "--out", "d.safetensors", *flags])
    serve_args = parser.parse_args(["serve", "--history", "h", *flags])
    hp = hparams_from_args(model, edit_args)
    for name, option in options.items():
        assert getattr(hp, option.field) == values[name], name
    assert not hp.lambda_relative  # --lambda without --lambda-relative is absolute, whatever the default's kind
    relative = parser.parse_args(["edit", "--requests", "r.json", "--out", "d.safetensors", "--lambda", "50",
                                  "--lambda-relative"])
    assert hparams_from_args(model, relative).lambda_relative
    from lightning_kedit.cli.hparam_options import given_hparams

    assert given_hparams(serve_args) == {option.field: values[name] for name, option in options.items()}
