"""``kedit info``: what the library sees in a model."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``kedit info`` takes only ``--model`` and ``--json``."""


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lightning_kedit.models import ModelAdapter, load_model

    model, tokenizer = load_model(args.model)
    adapter = ModelAdapter.for_model(model)
    info: dict[str, Any] = {
        "model": args.model,
        "model_type": adapter.model_type,
        "layers": adapter.num_layers,
        "key_size": adapter.key_size,
        "value_size": adapter.value_size,
        "projection": "Conv1D (in x out)" if adapter.is_conv1d else "Linear (out x in)",
        "default_edit_layers": adapter.default_layers(),
        "parameters": adapter.parameter_count(),
        "dtype": str(adapter.dtype()).removeprefix("torch."),
        "vocab_size": len(tokenizer),
        "adds_bos": tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id],
        "padding_side": tokenizer.padding_side,
    }
    from lightning_kedit.editing.hparams import EditHyperParams
    from lightning_kedit.models.fingerprint import model_digest

    info["digest"] = model_digest(model)
    defaults = EditHyperParams.for_model(model, "memit")
    sources = EditHyperParams.default_sources(model, "memit")
    info["memit_defaults"] = {name: {"value": getattr(defaults, name), "source": source}
                              for name, source in sources.items()}
    try:
        adapter.check_linear_residual()
        info["editable_by"] = "memit, rome, alphaedit, ft"
    except ValueError as err:
        info["editable_by"] = f"ft only ({str(err).split(':')[1].strip()})"
    width = max(len(key) for key in info)
    for key, value in info.items():
        if key == "memit_defaults":
            for name, item in value.items():
                print(f"{'memit ' + name:<{width}}  {item['value']}  ({item['source']})")
        else:
            print(f"{key:<{width}}  {value}")
    return info
