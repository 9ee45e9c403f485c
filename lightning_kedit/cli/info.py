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
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return info
