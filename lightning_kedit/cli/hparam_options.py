"""Command-line options of the edit hyper-parameters, read from :class:`EditHyperParams` itself.

Every scalar field of the dataclass is an option of ``kedit edit`` and ``kedit serve``, with the help text of
its docstring, so a new field needs no change here. Three fields keep the short names of the ``kedit``
contract (``--lambda``, ``--clamp``, ``--kl``); ``layers``, ``lambda_relative`` and ``v_bfloat16`` have options
of their own (``--layers 4-8|auto``, ``--lambda-relative``, ``--bf16/--no-bf16``), and the structured fields
(``prefix_lengths``, ``extra``) are set from Python.

Example:
    >>> options = hparam_options()
    >>> options["lambda"].field, options["v_steps"].kind.__name__
    ('mom2_weight', 'int')
    >>> parser = argparse.ArgumentParser()
    >>> add_hparam_arguments(parser)
    >>> given_hparams(parser.parse_args(["--lambda", "2000", "--ft-steps", "3"]))
    {'mom2_weight': 2000.0, 'ft_steps': 3}
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from functools import cache
from typing import Any, NamedTuple

import docstring_parser

from lightning_kedit.editing.hparams import EditHyperParams

__all__ = ["OPTION_NAMES", "HyperParamOption", "add_hparam_arguments", "given_hparams", "hparam_options"]

#: Fields whose option is not named after the field (the `kedit` contract's short names).
OPTION_NAMES: dict[str, str] = {"mom2_weight": "lambda", "clamp_norm": "clamp", "kl_factor": "kl"}
#: Fields with an option of their own, or no scalar form on a command line.
_NOT_SCALAR_OPTIONS = frozenset({"layers", "lambda_relative", "v_bfloat16", "prefix_lengths", "extra"})


class HyperParamOption(NamedTuple):
    """One command-line option: the field it sets, the type it parses, its help text."""

    field: str
    kind: type
    help: str


def _scalar_type(hint: Any) -> type | None:
    """``int``/``float``/``str`` of a field's annotation (``float | None`` counts as ``float``), else None."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = kinds[0] if len(kinds) == 1 else None
    return hint if hint in (int, float, str) else None


@cache
def hparam_options() -> dict[str, HyperParamOption]:
    """Option name (underscores) -> :class:`HyperParamOption`, for every scalar field of :class:`EditHyperParams`."""
    helps = {
        param.arg_name: " ".join((param.description or "").replace("``", "").split())
        for param in docstring_parser.parse(EditHyperParams.__doc__ or "").params
    }
    hints = typing.get_type_hints(EditHyperParams)
    options: dict[str, HyperParamOption] = {}
    for field in dataclasses.fields(EditHyperParams):
        kind = _scalar_type(hints[field.name])
        if field.name in _NOT_SCALAR_OPTIONS or kind is None:
            continue
        options[OPTION_NAMES.get(field.name, field.name)] = HyperParamOption(field.name, kind, helps[field.name])
    return options


def add_hparam_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--lambda``, ``--v-steps``, ... (one per :func:`hparam_options` entry, default: per model)."""
    for option, (_, kind, help_text) in hparam_options().items():
        parser.add_argument(f"--{option.replace('_', '-')}", dest=f"hp_{option}", type=kind, default=None,
                            metavar=kind.__name__.upper(),
                            help=f"{help_text.rstrip('.').replace('%', '%%')} (default: per model)")


def given_hparams(args: argparse.Namespace) -> dict[str, Any]:
    """The fields set on the command line, by field name (options left out are not included)."""
    values = {field: getattr(args, f"hp_{option}") for option, (field, _, _) in hparam_options().items()}
    return {field: value for field, value in values.items() if value is not None}
