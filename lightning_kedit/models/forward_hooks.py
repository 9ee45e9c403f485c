"""Context managers that read or patch activations inside a model, and always remove their hooks.

Every part of the library that looks inside a forward pass (key statistics, key and target computation,
causal tracing, the Lightning callback) goes through these, so that no hook outlives the ``with`` block,
whatever happens inside it.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(3, 2)
    >>> with capture_inputs({"fc": layer}) as seen:
    ...     _ = layer(torch.ones(1, 3))
    >>> seen["fc"][0].shape
    torch.Size([1, 3])
    >>> len(layer._forward_pre_hooks)
    0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = [
    "StopForward",
    "capture_inputs",
    "capture_outputs",
    "first_tensor",
    "input_hooks",
    "output_hooks",
    "run_until",
    "stop_after",
    "stop_before",
]


class StopForward(Exception):
    """Raised by :func:`stop_after` and :func:`stop_before` to end a forward pass once it has what it needs."""


def first_tensor(value: Any) -> torch.Tensor:
    """The first tensor of a module's input or output (modules return tensors, tuples or dataclasses)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value:
        return first_tensor(value[0])
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


def replace_first_tensor(value: Any, tensor: torch.Tensor) -> Any:
    """``value`` with its first tensor replaced by ``tensor`` (keeps tuples' other members)."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple):
        return (replace_first_tensor(value[0], tensor), *value[1:])
    if isinstance(value, list):
        return [replace_first_tensor(value[0], tensor), *value[1:]]
    raise TypeError(f"expected a tensor or a tuple starting with one, got {type(value).__name__}")


@contextmanager
def _registered(handles_factory: Callable[[], list[RemovableHandle]]) -> Iterator[None]:
    handles: list[RemovableHandle] = []
    try:
        handles.extend(handles_factory())
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def input_hooks(hooks: Mapping[nn.Module, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Call ``fn(x)`` on the first input ``x`` of each module; a returned tensor replaces the input."""

    def make(fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> Any:
            new = fn(first_tensor(args))
            return None if new is None else replace_first_tensor(args, new)

        return hook

    with _registered(lambda: [m.register_forward_pre_hook(make(fn)) for m, fn in hooks.items()]):
        yield


@contextmanager
def output_hooks(hooks: Mapping[nn.Module, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Call ``fn(y)`` on the first output ``y`` of each module; a returned tensor replaces the output."""

    def make(fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            new = fn(first_tensor(output))
            return None if new is None else replace_first_tensor(output, new)

        return hook

    with _registered(lambda: [m.register_forward_hook(make(fn)) for m, fn in hooks.items()]):
        yield


@contextmanager
def capture_inputs(modules: Mapping[str, nn.Module], detach: bool = True) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the first input of each named module on every call, in call order."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def make(name: str) -> Callable[[torch.Tensor], None]:
        return lambda x: seen[name].append(x.detach() if detach else x)

    with input_hooks({module: make(name) for name, module in modules.items()}):
        yield seen


@contextmanager
def capture_outputs(
    modules: Mapping[str, nn.Module], detach: bool = True
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record the first output of each named module on every call, in call order."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in modules}

    def make(name: str) -> Callable[[torch.Tensor], None]:
        return lambda y: seen[name].append(y.detach() if detach else y)

    with output_hooks({module: make(name) for name, module in modules.items()}):
        yield seen


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Raise :class:`StopForward` once ``module`` has run, so that later layers never run."""

    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        raise StopForward

    with _registered(lambda: [module.register_forward_hook(hook)]):
        yield


@contextmanager
def stop_before(module: nn.Module) -> Iterator[None]:
    """Raise :class:`StopForward` when ``module`` is called, before it runs.

    The hook is appended after those already registered on ``module``, so their input hooks see the input first:
    a pass that only needs a module's input (its keys) stops without computing the module.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> with capture_inputs({"fc": layer}) as seen, stop_before(layer):
        ...     try:
        ...         _ = layer(torch.ones(1, 3))
        ...     except StopForward:
        ...         pass
        >>> len(seen["fc"]), len(layer._forward_pre_hooks)
        (1, 0)
    """

    def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        raise StopForward

    with _registered(lambda: [module.register_forward_pre_hook(hook)]):
        yield


def run_until(model: nn.Module, module: nn.Module | None, *, before: bool = False, **inputs: Any) -> Any:
    """Run ``model(**inputs)`` and stop right after ``module`` (or run it all when ``module`` is None).

    With ``before=True`` the pass stops when ``module`` is called, after the input hooks already registered on
    it have run but before the module itself (see :func:`stop_before`).

    Returns the model's output when it ran to the end, else ``None``.
    """
    if module is None:
        return model(**inputs)
    with stop_before(module) if before else stop_after(module):
        try:
            return model(**inputs)
        except StopForward:
            return None
