"""A ``LightningModule`` around a Hugging Face causal LM: fine-tune on text, serve completions, edit facts.

:class:`KnowledgeEditModule` is the model half of a knowledge-editing pipeline: ``training_step`` is causal-LM
fine-tuning, ``validation_step``/``test_step`` report the loss and the perplexity of held-out text,
``predict_step`` generates greedy completions of prompts, and :meth:`~KnowledgeEditModule.edit`,
:meth:`~KnowledgeEditModule.apply_delta` and :meth:`~KnowledgeEditModule.revert` write facts into the weights
and take them out again. Batches are the dictionaries made by :class:`~lightning_kedit.lightning.data.TextDataModule`.

Example:
    >>> import lightning as L
    >>> from lightning_kedit.lightning import KnowledgeEditModule, TextDataModule
    >>> module = KnowledgeEditModule("smollm2", learning_rate=1e-5)  # doctest: +SKIP
    >>> data = TextDataModule(train_files="corpus.txt", block_size=128)  # doctest: +SKIP
    >>> L.Trainer(max_steps=50).fit(module, data)  # doctest: +SKIP
    >>> delta = module.edit(requests)  # doctest: +SKIP
    >>> module.revert()  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import SumMetric

from lightning_kedit.errors import KeditError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lightning_kedit.editing.delta import EditDelta
    from lightning_kedit.editing.hparams import EditHyperParams
    from lightning_kedit.requests import EditRequest
    from lightning_kedit.statistics import KeyStatistics

__all__ = ["KnowledgeEditModule", "token_nll"]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token negative log-likelihood of ``labels`` under ``logits``, and the number of tokens.

    Position ``t`` of ``logits`` predicts ``labels[t + 1]``; labels equal to ``-100`` (padding) are skipped.

    Args:
        logits: ``(B, T, V)`` scores.
        labels: ``(B, T)`` token ids, ``-100`` where no loss is taken.

    Returns:
        The float64 sum of the NLL over predicted tokens and their count (a 0-d int64 tensor).

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> nll, n = token_nll(logits, torch.tensor([[0, 1, -100]]))
        >>> round(float(nll), 4), int(n)  # one predicted token, uniform over 4: log 4
        (1.3863, 1)
    """
    shifted_logits = logits[:, :-1].flatten(0, 1).float()
    targets = labels[:, 1:].flatten()
    nll = nn.functional.cross_entropy(shifted_logits, targets, ignore_index=-100, reduction="sum")
    return nll.double(), (targets != -100).sum()


class KnowledgeEditModule(LightningModule):
    """Causal-LM fine-tuning, serving and knowledge editing of one Hugging Face model.

    Args:
        model: a model spec for :func:`~lightning_kedit.load_model` (``"smollm2"``, a Hugging Face folder,
            a ``.gguf`` file) or a causal-LM object; an object needs ``tokenizer``.
        tokenizer: the model's tokenizer (loaded with the model when ``model`` is a spec).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_new_tokens: tokens generated per prompt by ``predict_step``.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> net = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> module = KnowledgeEditModule(net, tokenizer=object(), learning_rate=1e-3)
        >>> module.applied_deltas
        ()
    """

    def __init__(
        self,
        model: str | nn.Module = "smollm2",
        tokenizer: PreTrainedTokenizerBase | None = None,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        max_new_tokens: int = 16,
    ) -> None:
        super().__init__()
        if not learning_rate >= 0:
            raise KeditError(f"`learning_rate` must be >= 0, got {learning_rate}")
        if not weight_decay >= 0:
            raise KeditError(f"`weight_decay` must be >= 0, got {weight_decay}")
        if max_new_tokens < 1:
            raise KeditError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
        if isinstance(model, nn.Module):
            if tokenizer is None:
                raise KeditError(
                    "`tokenizer` is required when `model` is a model object; pass the model's tokenizer, "
                    "or give `model` as a spec such as 'smollm2' to load both"
                )
            self.save_hyperparameters(ignore=["model", "tokenizer"])
        else:
            from lightning_kedit.models import load_model

            self.save_hyperparameters(ignore=["tokenizer"])
            model, loaded_tokenizer = load_model(model)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        self.model = model
        self.tokenizer = tokenizer
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.max_new_tokens = max_new_tokens
        self._val_nll = SumMetric().set_dtype(torch.float64)
        self._val_tokens = SumMetric().set_dtype(torch.float64)
        self._applied: list[EditDelta] = []

    # ----------------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward (returns its output object, with ``.logits``)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def on_fit_start(self) -> None:
        # Loaded models come in eval mode and Lightning keeps each submodule's mode: fine-tuning needs train mode
        # (validation and prediction switch to eval mode and back by themselves).
        self.model.train()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Mean next-token cross-entropy over the non-padding tokens of the batch."""
        output = self(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"])
        self.log("train_loss", output.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return output.loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the summed NLL and token count (synchronised across processes at epoch end)."""
        self._eval_step(batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """As :meth:`validation_step`, logged as ``test_loss`` / ``test_perplexity``."""
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        output = self(batch["input_ids"], batch.get("attention_mask"))
        nll, count = token_nll(output.logits, batch["labels"])
        self._val_nll.update(nll)
        self._val_tokens.update(count.double())

    def _log_perplexity(self, prefix: str) -> None:
        # Token-weighted over the whole epoch (and all processes): ppl = exp(Σ nll / Σ tokens).
        tokens = float(self._val_tokens.compute())
        if tokens > 0:
            loss = float(self._val_nll.compute()) / tokens
            self.log(f"{prefix}_loss", loss, prog_bar=True)
            self.log(f"{prefix}_perplexity", math.exp(min(loss, 700.0)), prog_bar=True)
        self._val_nll.reset()
        self._val_tokens.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------------------------------ serving
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        """Greedy completions of the batch's (left-padded) prompts: ``[{"prompt", "completion"}, ...]``."""
        input_ids = batch["input_ids"]
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        generated = cast(Any, self.model).generate(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        completions = self.tokenizer.batch_decode(generated[:, input_ids.shape[1] :], skip_special_tokens=True)
        prompts = batch.get("prompts") or self.tokenizer.batch_decode(input_ids, skip_special_tokens=True)
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]

    # ------------------------------------------------------------------------------------------ editing
    @property
    def applied_deltas(self) -> tuple[EditDelta, ...]:
        """The deltas applied through this module, oldest first."""
        return tuple(self._applied)

    def edit(
        self,
        requests: Sequence[EditRequest],
        *,
        method: str = "memit",
        layers: Sequence[int] | None = None,
        statistics: KeyStatistics | None = None,
        hparams: EditHyperParams | None = None,
    ) -> EditDelta:
        """Compute an edit of ``requests`` and apply it; returns the delta (revert it with :meth:`revert`).

        The model is put in eval mode and its parameters' ``requires_grad`` flags are kept while the edit is
        computed; the weights change only once the whole delta is known.
        """
        from lightning_kedit.editing import compute_edit

        was_training = self.model.training
        self.model.eval()
        try:
            delta = compute_edit(
                self.model,
                self.tokenizer,
                list(requests),
                method=method,
                layers=None if layers is None else list(layers),
                statistics=statistics,
                hparams=hparams,
            )
        finally:
            self.model.train(was_training)
        self.apply_delta(delta)
        return delta

    def apply_delta(self, delta: EditDelta, *, force: bool = False) -> None:
        """Add ``delta`` to the weights (``force`` skips the check that it was made for these weights)."""
        delta.apply(self.model, force=force)
        self._applied.append(delta)

    def revert(self, delta: EditDelta | None = None) -> list[EditDelta]:
        """Undo ``delta``, or every delta applied through this module (newest first); returns those undone."""
        if delta is None:
            undone = list(reversed(self._applied))
        elif any(d is delta for d in self._applied):
            undone = [delta]
        else:
            raise KeditError(
                "`delta` was not applied through this module; apply it with `apply_delta` first, "
                "or call `delta.revert(module.model)` directly"
            )
        for item in undone:
            item.revert(self.model)
            self._applied = [d for d in self._applied if d is not item]
        return undone
