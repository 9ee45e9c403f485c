"""Figures of causal traces: a heatmap per kind for one prompt, and averaged curves over many facts.

The heatmaps follow the ROME paper's layout (tokens top to bottom with the subject's tokens starred,
layers left to right, one colour map per kind). Figures are built on ``matplotlib.figure.Figure`` without
pyplot, so that no GUI backend or global state is involved.

Example:
    >>> paths = save_trace_figures(causal_trace(model, tokenizer, prompt, subject), "out/")  # doctest: +SKIP
    >>> [p.name for p in paths][:2]  # doctest: +SKIP
    ['trace_hidden.png', 'trace_hidden.svg']
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lightning_kedit.files import atomic_path
from lightning_kedit.tracing import AverageTrace, TraceResult

__all__ = ["plot_average", "plot_trace", "save_average_figure", "save_trace_figures"]

#: Colour map and title per kind (ROME's colours: purple, green, red).
_STYLE: dict[str, tuple[str, str, str]] = {
    "hidden": ("Purples", "the residual stream (one block output)", "tab:purple"),
    "mlp": ("Greens", "MLP outputs", "tab:green"),
    "attn": ("Reds", "attention outputs", "tab:red"),
}


def plot_trace(result: TraceResult, kind: str, ax: Axes | None = None) -> Figure:
    """A heatmap of the indirect effects of ``kind``: tokens on the y axis, layers on the x axis.

    Args:
        result: a trace from :func:`~lightning_kedit.tracing.causal_trace`.
        kind: one of ``result.kinds``.
        ax: draw into these axes (a new figure when omitted).

    Returns:
        The figure holding the heatmap.
    """
    if kind not in result.effects:
        raise ValueError(f"`kind`={kind!r} was not traced; the result holds {list(result.kinds)}")
    cmap, what, _ = _STYLE[kind]
    if ax is None:
        ax = Figure(figsize=(6.4, 0.9 + 0.32 * len(result.tokens)), layout="constrained").add_subplot()
    figure = ax.get_figure()
    assert isinstance(figure, Figure)
    effects = result.effects[kind].numpy()
    image = ax.imshow(effects, cmap=cmap, aspect="auto", interpolation="nearest", vmin=min(0.0, effects.min()))
    first, end = result.subject_range
    labels = [
        f"{token.strip() or repr(token)}{'*' if first <= i < end else ''}" for i, token in enumerate(result.tokens)
    ]
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("layer")
    window = "" if kind == "hidden" else f", window of {result.window} layers"
    ax.set_title(
        f"Restoring {what}{window}\np({result.answer.strip()!r}): clean {result.clean_prob:.3f}, "
        f"corrupted {result.corrupted_prob:.3f}",
        fontsize=10,
    )
    colorbar = figure.colorbar(image, ax=ax)
    colorbar.set_label("p(restored) − p(corrupted)")
    return figure


def save_trace_figures(result: TraceResult, out_dir: str | os.PathLike[str], stem: str = "trace") -> list[Path]:
    """Write one heatmap per traced kind as ``<stem>_<kind>.png`` and ``.svg`` in ``out_dir``."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for kind in result.kinds:
        figure = plot_trace(result, kind)
        for suffix in (".png", ".svg"):
            path = folder / f"{stem}_{kind}{suffix}"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, dpi=150, format=suffix[1:])
            paths.append(path)
    return paths


def plot_average(average: AverageTrace) -> Figure:
    """Mean indirect effect per layer for each kind, at the last subject token and at the last token.

    The bands are one standard error of the mean over the facts.
    """
    if average.n == 0:
        raise ValueError("the average holds no facts; trace at least one before plotting")
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    for ax, (where, title) in zip(
        axes, (("last_subject", "last subject token"), ("last_token", "last token")), strict=True
    ):
        for kind in average.kinds:
            table = {"last_subject": average.last_subject, "last_token": average.last_token}[where][kind]
            mean = table.mean(0)
            error = table.std(0) / max(1, average.n) ** 0.5 if average.n > 1 else torch.zeros_like(mean)
            layers = range(len(mean))
            colour = _STYLE[kind][2]
            ax.plot(layers, mean.numpy(), color=colour, label=kind)
            ax.fill_between(layers, (mean - error).numpy(), (mean + error).numpy(), color=colour, alpha=0.2)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.set_title(f"Average indirect effect at the {title}", fontsize=10)
        ax.set_xlabel("layer")
    axes[0].set_ylabel(f"p(restored) − p(corrupted), {average.n} facts")
    axes[0].legend()
    return figure


def save_average_figure(
    average: AverageTrace, out_dir: str | os.PathLike[str], stem: str = "trace_average"
) -> list[Path]:
    """Write :func:`plot_average` as ``<stem>.png`` and ``<stem>.svg`` in ``out_dir``."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    figure = plot_average(average)
    paths = [folder / f"{stem}{suffix}" for suffix in (".png", ".svg")]
    for path in paths:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=150, format=path.suffix[1:])
    return paths
