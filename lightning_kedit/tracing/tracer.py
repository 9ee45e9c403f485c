"""The runs of a causal trace: clean, corrupted (noised subject embeddings) and batched restored runs.

The *clean* run records every hidden state. The *corrupted* runs add Gaussian noise to the subject's token
embeddings (one row per noise draw) and record the block outputs. The *restored* runs are corrupted runs in
which the clean state of one (layer, token) cell is put back: the block output for ``"hidden"``, or the MLP /
attention outputs of a window of layers centred on the layer for ``"mlp"`` / ``"attn"``
(:func:`restored_layers`).

All restorations go through the model batched (noise draws x cells in the batch dimension), and two exact
shortcuts avoid recomputing what every cell shares: the blocks below a batch's first restored layer replay the
corrupted run's outputs instead of running, and the tokens before the restored one come from a key/value cache
of the corrupted prefix.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    >>> tracer = Tracer(model, torch.tensor([5, 6, 7]), (1, 2), torch.zeros(2, 1, 32), batch_size=4)
    >>> tracer.run_clean().shape
    torch.Size([64])
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kedit.models.adapters import ModelAdapter, forward_parameters, kv_cache_argument
from lightning_kedit.models.forward_hooks import capture_outputs, first_tensor, output_hooks, replace_first_tensor

__all__ = ["Tracer", "embedding_noise_scale", "model_device", "restored_layers"]

_NOISE_TOKENS = 8192  # token ids sampled to measure the spread of the embeddings
_noise_scales: weakref.WeakKeyDictionary[nn.Module, float] = weakref.WeakKeyDictionary()


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters."""
    return next(model.parameters()).device


def embedding_noise_scale(model: nn.Module, factor: float = 3.0) -> float:
    """``factor`` times the standard deviation of the model's token embeddings (ROME's noise level).

    Measured once per model over up to 8192 token ids spread over the vocabulary, on the output of the
    embedding module (so that scaled embeddings, as in Gemma, are measured where the noise is added).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64))
        >>> 0.03 < embedding_noise_scale(model) < 0.09  # GPT-2 initialises embeddings with std 0.02
        True
    """
    if model not in _noise_scales:
        embeddings = ModelAdapter.for_model(model).embeddings()
        vocab = int(getattr(embeddings, "num_embeddings", 0) or getattr(model.config, "vocab_size", 0))
        ids = torch.linspace(0, vocab - 1, min(vocab, _NOISE_TOKENS)).long()
        with torch.no_grad():
            _noise_scales[model] = float(embeddings(ids.to(model_device(model))).double().std())
    return factor * _noise_scales[model]


def restored_layers(kind: str, layer: int, window: int, num_layers: int) -> range:
    """The layers restored for the cell at ``layer``: itself for ``"hidden"``, else a centred window.

    The window is ``[layer - window // 2, layer + ceil(window / 2))`` clipped to the model, as in ROME.

    Example:
        >>> restored_layers("mlp", 0, 10, 30), restored_layers("mlp", 12, 10, 30), restored_layers("hidden", 3, 10, 30)
        (range(0, 5), range(7, 17), range(3, 4))
    """
    if kind == "hidden":
        return range(layer, layer + 1)
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


@contextmanager
def _replayed(blocks: Sequence[nn.Module], outputs: Sequence[Any]) -> Iterator[None]:
    """Skip ``blocks``: each returns the matching precomputed output instead of running."""
    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block, output in zip(blocks, outputs, strict=True):
            block.forward = (lambda value: lambda *args, **kwargs: value)(output)  # type: ignore[method-assign]
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward  # type: ignore[method-assign]


class Tracer:
    """Clean, corrupted and batched restored runs of one tokenised prompt.

    Args:
        model: a causal LM supported by :class:`~lightning_kedit.models.adapters.ModelAdapter`.
        ids: the prompt's token ids, ``(tokens,)``.
        subject: ``(start, end)`` token indices of the subject, ``end`` exclusive.
        noise: the noise draws added to the subject's embeddings, ``(samples, end - start, width)``.
        batch_size: sequences per forward pass (noise draws x cells).
    """

    def __init__(
        self, model: nn.Module, ids: Tensor, subject: tuple[int, int], noise: Tensor, batch_size: int
    ) -> None:
        self.model = model
        self.adapter = ModelAdapter.for_model(model)
        self.device = model_device(model)
        self.ids = ids.to(self.device)
        self.subject = subject
        self.noise = noise.to(self.device, next(self.adapter.embeddings().parameters()).dtype)
        self.samples = int(noise.shape[0])
        self.cells_per_batch = max(1, batch_size // self.samples)
        self.keep_one = "logits_to_keep" in forward_parameters(model)
        self.cache_name = kv_cache_argument(model)
        self.modules: dict[str, list[nn.Module]] = {
            "hidden": list(self.adapter.blocks),
            "mlp": [self.adapter.mlp(i) for i in range(self.adapter.num_layers)],
            "attn": [self.adapter.attn(i) for i in range(self.adapter.num_layers)],
        }
        self.clean: dict[str, list[Tensor]] = {}
        self.corrupted_blocks: list[Any] = []
        self.prefixes: dict[int, Any] = {}

    def _forward(self, ids: Tensor, past: Any = None, use_cache: bool = False) -> Any:
        """One forward of ``ids`` after the cached ``past``, computing the logits of the last token only."""
        kwargs: dict[str, Any] = {"use_cache": use_cache or past is not None}
        if self.keep_one:
            kwargs["logits_to_keep"] = 1
        if past is not None:
            kwargs[self.cache_name] = past
        return self.model(input_ids=ids, **kwargs)

    @contextmanager
    def _noised(self, offset: int, repeats: int) -> Iterator[None]:
        """Add the noise draws to the subject's embeddings of a forward starting at token ``offset``."""
        noise = self.noise.repeat_interleave(repeats, dim=0)  # row r holds draw r // repeats
        first, end = self.subject

        def add(embedded: Tensor) -> Tensor | None:
            lo, hi = max(first, offset), min(end, offset + embedded.shape[1])
            if lo >= hi:
                return None
            out = embedded.clone()
            out[:, lo - offset : hi - offset] += noise[:, lo - first : hi - first]
            return out

        with output_hooks({self.adapter.embeddings(): add}):
            yield

    def run_clean(self) -> Tensor:
        """The clean run: records every state, returns the next-token probabilities ``(vocab,)``."""
        names = {f"{kind}.{i}": module for kind, modules in self.modules.items() for i, module in enumerate(modules)}
        with capture_outputs(names) as seen:
            logits = self._forward(self.ids[None]).logits
        for kind, modules in self.modules.items():
            # OPT's fc2 sees tokens flattened to (batch * tokens, width): view every state as (tokens, width).
            self.clean[kind] = [seen[f"{kind}.{i}"][0].reshape(len(self.ids), -1) for i in range(len(modules))]
        return logits[0, -1].double().softmax(-1)

    def run_corrupted(self, answer: int) -> float:
        """The corrupted runs: record the block outputs (replayed later), return the mean ``p(answer)``."""
        outputs: list[Any] = [None] * len(self.modules["hidden"])

        def keep(i: int) -> Callable[[nn.Module, Any, Any], None]:
            return lambda module, args, output: outputs.__setitem__(i, output)

        handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.modules["hidden"])]
        try:
            with self._noised(0, 1):
                logits = self._forward(self.ids[None].expand(self.samples, -1)).logits
        finally:
            for handle in handles:
                handle.remove()
        self.corrupted_blocks = outputs
        return float(logits[:, -1].double().softmax(-1)[:, answer].mean())

    def _prefix(self, offset: int) -> Any:
        """The key/value cache of the corrupted run over tokens ``[0, offset)``, or None without a cache."""
        if offset not in self.prefixes:
            with self._noised(0, 1):
                out = self._forward(self.ids[None, :offset].expand(self.samples, -1), use_cache=True)
            cache = out.get(self.cache_name)
            self.prefixes[offset] = cache if hasattr(cache, "batch_repeat_interleave") else None
        return self.prefixes[offset]

    def run_cells(self, cells: Sequence[tuple[str, int, int]], window: int, answer: int) -> Tensor:
        """Mean ``p(answer)`` over the noise draws for each ``(kind, token, layer)`` restored cell."""
        num_layers = self.adapter.num_layers
        restored = {cell: restored_layers(cell[0], cell[2], window, num_layers) for cell in cells}
        # The blocks below ``entry`` replay the corrupted run. A restored block output is applied by a hook
        # that also fires on a replayed block, and nothing before it differs: its block is replayed too.
        entry = {cell: r.start + (cell[0] == "hidden") for cell, r in restored.items()}
        # Batches share a token (for the prefix cache) and, as far as possible, an entry layer: kinds mixed.
        order = sorted(range(len(cells)), key=lambda i: (cells[i][1], entry[cells[i]]))
        probs = torch.empty(len(cells), dtype=torch.float64)
        batch: list[int] = []
        for position, index in enumerate(order):
            batch.append(index)
            following = order[position + 1] if position + 1 < len(order) else None
            if len(batch) == self.cells_per_batch or following is None or cells[following][1] != cells[index][1]:
                chosen = [cells[i] for i in batch]
                probs[batch] = self._run_batch(chosen, restored, min(entry[c] for c in chosen), answer)
                batch = []
        return probs

    def _run_batch(
        self, cells: list[tuple[str, int, int]], restored: dict[tuple[str, int, int], range], entry: int, answer: int
    ) -> Tensor:
        """Mean ``p(answer)`` of ``cells`` (all at one token) in one forward, blocks below ``entry`` replayed."""
        n = len(cells)
        offset = cells[0][1]
        past = self._prefix(offset) if offset > 0 else None
        if past is None:
            offset = 0
        else:
            past = copy.deepcopy(past)
            past.batch_repeat_interleave(n)
        replay = [
            replace_first_tensor(output, first_tensor(output)[:, offset:].repeat_interleave(n, dim=0))
            for output in self.corrupted_blocks[:entry]
        ]
        # Row r = draw * n + cell: cell c owns rows c, c + n, c + 2n, ...
        rows_of = torch.arange(self.samples, device=self.device) * n
        patches: dict[tuple[str, int], list[tuple[Tensor, int]]] = {}
        for c, cell in enumerate(cells):
            for layer in restored[cell]:
                patches.setdefault((cell[0], layer), []).append((rows_of + c, cell[1]))
        hooks = {
            self.modules[kind][layer]: self._restore(kind, layer, pairs, offset, self.samples * n)
            for (kind, layer), pairs in patches.items()
        }
        with ExitStack() as stack:
            stack.enter_context(self._noised(offset, n))
            stack.enter_context(_replayed(self.modules["hidden"][:entry], replay))
            stack.enter_context(output_hooks(hooks))
            ids = self.ids[None, offset:].expand(self.samples * n, -1)
            logits = self._forward(ids, past).logits
        p = logits[:, -1].double().softmax(-1)[:, answer]
        return p.view(self.samples, n).mean(0).cpu()

    def _restore(
        self, kind: str, layer: int, pairs: list[tuple[Tensor, int]], offset: int, batch: int
    ) -> Callable[[Tensor], Tensor]:
        """An output hook writing the clean state of ``(kind, layer)`` into the ``(rows, token)`` pairs."""
        rows = torch.cat([r for r, _ in pairs])
        tokens = torch.cat([torch.full_like(r, t) for r, t in pairs])
        values = self.clean[kind][layer][tokens]

        def restore(output: Tensor) -> Tensor:
            out = output.clone()
            out.view(batch, -1, out.shape[-1])[rows, tokens - offset] = values.to(out.dtype)
            return out

        return restore

