"""Knowledge Edit Callback: write facts into a model at chosen points of a Lightning fine-tuning or serving run.

:class:`KnowledgeEditCallback` collects the MLP-key statistics MEMIT needs from the batches that flow anyway
(or takes them from a file, a :class:`~lightning_kedit.statistics.KeyStatistics` or a text source), computes one
batched edit of its requests at the configured moments, applies it to the weights, and reports the edit
metrics through the trainer's loggers. Its checkpoint state records which edits are in the weights, so a resumed
run neither applies an edit twice nor loses one.

Under DDP every process sums its statistics with the others' (an all-reduce) and computes the same edit from the
same requests; the callback checks the deltas' digests agree and otherwise adopts rank 0's, so the weights stay
bit-identical. A checkpoint references each process's statistics, kept in a file beside it
(:mod:`.statistics_checkpoint`). Under FSDP2 (``fully_shard`` in ``configure_model`` of a ``ModelParallelStrategy``
run) the edit runs on the sharded model itself, gathering only the edit layers' weights. DeepSpeed, FSDP1 and
tensor parallelism are refused at ``setup`` (:mod:`.strategies`).

Its parts live beside it: :mod:`.edit_moments` (when to edit), :mod:`.batch_statistics` (the key statistics),
:mod:`.edit_metrics` (what is reported), :mod:`.applied_edits` (the records of the edits in the weights) and
:mod:`.strategies` (what an edit needs of the strategy).

Example::

    from lightning.pytorch import Trainer
    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

    callback = KnowledgeEditCallback("facts.json", statistics="train", edit_at="fit_end", save_delta_to="deltas/")
    trainer = Trainer(max_steps=200, callbacks=[callback])
    trainer.fit(KnowledgeEditModule("smollm2"), TextDataModule(train_files="corpus.txt"))
    callback.history[-1]["efficacy"]  # the facts now hold
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from transformers import PreTrainedTokenizerBase
from typing_extensions import override

# Imported at run time, not only for type checking: LightningCLI (jsonargparse) reads the signature.
from lightning_kedit.editing.damage_guard import DamageGuard
from lightning_kedit.editing.hparams import METHODS, EditHyperParams, hparams_with_overrides
from lightning_kedit.models import ModelAdapter
from lightning_kedit.models.model_mode import eval_mode
from lightning_kedit.requests import EditRequest
from lightning_kedit.statistics import KeyStatistics

from .applied_edits import (
    AppliedEdit,
    delta_from_bytes,
    delta_to_bytes,
    read_requests,
    recorded_delta,
    requests_source,
    save_delta,
)
from .batch_statistics import (
    BatchKeyCollector,
    PathLike,
    batch_source,
    check_statistics_source,
    gather_statistics,
    open_statistics,
)
from .configuration_error import KeditConfigurationError
from .delta_placement import check_edit_as, check_model_for, put_delta, take_delta
from .edit_guard import check_on_damage, guard_delta, handle_rejection, resolve_guard
from .edit_metrics import (
    EDIT_METRICS,
    announce_edit,
    edit_metric_values,
    evaluate_edit,
    log_edit_metrics,
    metric_names,
)
from .edit_moments import EDIT_MOMENTS, Moment, check_moments, moment_key, takes_moment
from .statistics_checkpoint import restore_statistics, save_statistics_files
from .strategies import check_edit_weights, check_strategy, language_model, module_tokenizer, same_on_every_rank

if TYPE_CHECKING:
    from lightning_kedit.editing.damage_guard import DamageReport
    from lightning_kedit.editing.delta import EditDelta

__all__ = ["EDIT_METRICS", "EDIT_MOMENTS", "AppliedEdit", "KnowledgeEditCallback"]


class KnowledgeEditCallback(Callback):
    r"""Edits facts into the model at chosen moments of ``fit`` or ``predict``, with statistics from the batches.

    You can decide when to edit with ``edit_at`` (any of ``"fit_end"``, ``"epoch_end"``, ``"step"``,
    ``"predict_start"``), or by overriding :meth:`should_edit`, which is asked at each of those moments
    (its ``moment`` argument says which). Each edit happens at most once per moment key (``"fit_end"``,
    ``"epoch:3"``, ``"step:200"``, ``"predict_start"``), also across a resume from a checkpoint.

    Args:
        requests: a request file (any layout ``load_requests`` reads), or ``EditRequest`` objects.
        n_requests: read only the first ``n_requests`` of a file.
        method: an editing method of ``lightning_kedit.editing.METHODS`` (``"memit"``, ``"rome"``, ``"ft"``,
            ``"alphaedit"``, ``"lifelong"``; each edit is computed from the weights as they are, without an
            ``EditHistory``, so the lifelong method normalises by the statistics of that edit's facts alone).
        layers: layers to edit (default: the method's default for the model).
        hparams: hyper-parameters, an ``EditHyperParams`` or a mapping of its fields to override.
        statistics: where the key statistics come from: ``"train"``, ``"validation"`` or ``"predict"``
            batches; a ``.safetensors`` statistics file; a ``KeyStatistics``; text file(s) (collected at
            setup); or None for the cached statistics of the bundled corpus.
        statistics_tokens: tokens read from a text source.
        edit_at: the moment(s) to edit.
        epochs: with ``"epoch_end"``: the 0-based epochs after which to edit (None: every epoch).
        every_n_steps: with ``"step"``: edit after every ``every_n_steps`` optimizer steps.
        revert_at: undo the edits at ``"fit_end"``, ``"predict_end"`` or ``"teardown"`` (None: keep them).
        metrics: edit metrics to report after each edit (True: all of ``EDIT_METRICS``, False: none).
        ppl_text: a text file whose perplexity is measured before and after each edit.
        ppl_tokens: tokens of ``ppl_text`` scored.
        save_delta_to: a folder where rank 0 saves each delta as ``<moment key>.safetensors``.
        checkpoint_deltas: also store the deltas themselves in checkpoints (so ``revert`` works after a resume
            without ``save_delta_to``).
        tokenizer: the tokenizer (default: the LightningModule's ``tokenizer``).
        damage_guard: a :class:`~lightning_kedit.editing.damage_guard.DamageGuard` that measures each edit before
            it enters the weights (True: the default guard; False: none); see :meth:`on_edit_rejected`.
        on_damage: what a rejected edit does: ``"skip"`` (warn, not applied), ``"raise"`` (a
            ``MisconfigurationException``) or ``"apply"`` (warn, applied anyway).
        edit_as: ``"weights"`` (into the edit layers' weights) or ``"adapter"`` (a new frozen LoRA adapter of a
            ``peft.PeftModel``, the base weights and trained adapters untouched; see :mod:`.delta_placement`).

    Example::

        class EditWhenLossIsLow(KnowledgeEditCallback):
            def should_edit(self, trainer, pl_module, moment):
                return moment == "epoch_end" and trainer.callback_metrics["train_loss"] < 2.0

        trainer = Trainer(callbacks=[EditWhenLossIsLow("facts.json", edit_at="epoch_end")])
    """
    def __init__(
        self,
        # Tuples rather than sequences in these hints: LightningCLI (jsonargparse) reads a path given for a
        # `Sequence` argument as a file holding the list. Lists work as well at run time.
        requests: PathLike | tuple[EditRequest, ...],
        *,
        n_requests: int | None = None,
        method: str = "memit",
        layers: Sequence[int] | None = None,
        hparams: Mapping[str, Any] | EditHyperParams | None = None,
        statistics: PathLike | list[PathLike] | KeyStatistics | None = "train",
        statistics_tokens: int = 100_000,
        edit_at: str | Sequence[str] = "fit_end",
        epochs: Sequence[int] | None = None,
        every_n_steps: int | None = None,
        revert_at: str | None = None,
        metrics: bool | Sequence[str] = True,
        ppl_text: PathLike | None = None,
        ppl_tokens: int = 5_000,
        save_delta_to: PathLike | None = None,
        checkpoint_deltas: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        damage_guard: DamageGuard | bool = True,
        on_damage: str = "skip",
        edit_as: str = "weights",
    ) -> None:
        self._requests_source, requests_key = requests_source(requests, n_requests)
        if method not in METHODS:
            raise KeditConfigurationError(f"`method` must be one of {METHODS}, got {method!r}")
        moments = check_moments(edit_at, every_n_steps, epochs, revert_at)
        check_statistics_source(statistics, moments)
        names = metric_names(metrics)
        if ppl_text is not None and not Path(ppl_text).expanduser().is_file():
            raise KeditConfigurationError(
                f"`ppl_text` file {str(ppl_text)!r} not found; give a UTF-8 text file or None"
            )
        if statistics_tokens < 1 or ppl_tokens < 1:
            raise KeditConfigurationError(f"token counts must be >= 1, got {statistics_tokens=} and {ppl_tokens=}")

        self.n_requests = n_requests
        self.method = method
        self.layers = None if layers is None else [int(i) for i in layers]
        self._hparams_arg = hparams
        self._statistics_arg = statistics
        self.statistics_tokens = statistics_tokens
        self.edit_at = moments
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.every_n_steps = every_n_steps
        self.revert_at = revert_at
        self.metrics = names
        self.ppl_text = ppl_text
        self.ppl_tokens = ppl_tokens
        self.save_delta_to = None if save_delta_to is None else Path(save_delta_to).expanduser()
        self.checkpoint_deltas = checkpoint_deltas
        self._tokenizer_arg = tokenizer
        self.damage_guard = resolve_guard(damage_guard)
        self.on_damage = check_on_damage(on_damage)
        self.edit_as = check_edit_as(edit_as)
        #: The damage reports of the edits the guard rejected, oldest first.
        self.rejections: list[DamageReport] = []
        self._state_key = self._generate_state_key(
            requests=requests_key, method=method, layers=self.layers, edit_at=self.edit_at
        )

        #: Deprecated: the moment, for overrides of :meth:`should_edit` without the ``moment`` argument.
        self.moment: Moment | None = None
        #: One dict of metrics per edit made in this process, oldest first.
        self.history: list[dict[str, Any]] = []
        self.rank_disagreements: list[tuple[int, str, str]] = []
        self.requests: list[EditRequest] = []
        self.hparams: EditHyperParams | None = None
        self.statistics: KeyStatistics | None = None
        self._applied: list[AppliedEdit] = []
        self._deltas: dict[str, EditDelta] = {}
        self._collector = BatchKeyCollector()

    @property
    @override
    def state_key(self) -> str:
        return self._state_key

    @property
    def applied(self) -> tuple[AppliedEdit, ...]:
        """The edits in the weights, oldest first."""
        return tuple(self._applied)

    @property
    def statistics_source(self) -> str | None:
        """``"train"``, ``"validation"`` or ``"predict"`` when statistics come from batches, else None."""
        return batch_source(self._statistics_arg)

    def should_edit(self, trainer: Trainer, pl_module: LightningModule, moment: Moment | None = None) -> bool:
        """Whether to edit at ``moment``: ``"step"``, ``"epoch_end"``, ``"fit_end"`` or ``"predict_start"``.

        Override to edit on other conditions. Under DDP the answer must be the same on every process.
        An override without ``moment`` (reading ``self.moment``) still works, with a ``DeprecationWarning``.
        """
        moment = self.moment if moment is None else moment
        if moment not in self.edit_at:
            return False
        if moment == "epoch_end":
            return self.epochs is None or trainer.current_epoch in self.epochs
        if moment == "step":
            return trainer.global_step > 0 and trainer.global_step % cast(int, self.every_n_steps) == 0
        return True

    # ------------------------------------------------- Lightning hooks, in the order Lightning calls them
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_strategy(trainer.strategy)
        model = language_model(pl_module)
        adapter = ModelAdapter.for_model(model)
        check_model_for(self.edit_as, model)
        tokenizer = module_tokenizer(pl_module, self._tokenizer_arg)
        if not self.requests:
            self.requests = read_requests(self._requests_source, self.n_requests)
        if self.hparams is None:
            self.hparams = hparams_with_overrides(model, self.method, self.layers, self._hparams_arg)
            self.layers = adapter.check_layers(list(self.hparams.layers), "layers")
        if self.statistics is None:
            layers = cast(list[int], self.layers)
            self.statistics = open_statistics(trainer, model, tokenizer, self._statistics_arg, layers,
                                              self.statistics_tokens)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_collecting(pl_module, "train")
        self._start_collecting(pl_module, "validation")

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start(batch, "train", trainer)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collector.batch_end()
        self._maybe_edit(trainer, pl_module, "step")

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._start_collecting(pl_module, "validation")

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch, "validation", trainer)

    @override
    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collector.batch_end()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._collector.stop()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_edit(trainer, pl_module, "epoch_end")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_edit(trainer, pl_module, "fit_end")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collector.stop()
        if self.revert_at == "fit_end":
            self.revert(trainer)

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_edit(trainer, pl_module, "predict_start")
        self._start_collecting(pl_module, "predict")

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch, "predict", trainer)

    @override
    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collector.batch_end()

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._collector.stop()
        if self.revert_at == "predict_end":
            self.revert(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"applied": [asdict(record) for record in self._applied]}
        if self.checkpoint_deltas:
            state["deltas"] = {r.digest: delta_to_bytes(self._deltas[r.digest]) for r in self._applied}
        return state

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Statistics from batches go to one file per process beside the checkpoint (statistics_checkpoint.py).
        if self.statistics is not None and self.statistics_source is not None:
            state = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})
            state["statistics_files"] = save_statistics_files(trainer, self.statistics)

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.statistics is not None and self.statistics_source is not None:
            restore_statistics(trainer, self.statistics, checkpoint.get("callbacks", {}).get(self.state_key, {}))

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The weights restored with this state already hold these edits: they are recorded, not re-applied.
        self._applied = [AppliedEdit.from_dict(item) for item in state_dict.get("applied", [])]
        for digest, payload in state_dict.get("deltas", {}).items():
            self._deltas[digest] = delta_from_bytes(payload)
        if self._applied:
            keys = ", ".join(record.key for record in self._applied)
            rank_zero_info(f"KnowledgeEditCallback: restored {len(self._applied)} applied edit(s): {keys}")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._collector.stop()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._collector.stop()
        if self.revert_at == "teardown":
            self.revert(trainer)

    # --------------------------------------------------------------------- editing, statistics, revert
    def _start_collecting(self, pl_module: LightningModule, source: str) -> None:
        if self.statistics_source != source or self._collector.active:
            return
        statistics = cast(KeyStatistics, self.statistics).to(pl_module.device)
        self._collector.start(language_model(pl_module), statistics)

    def _batch_start(self, batch: Any, source: str, trainer: Trainer) -> None:
        if self.statistics_source == source and not trainer.sanity_checking:
            self._collector.batch_start(batch)

    def _maybe_edit(self, trainer: Trainer, pl_module: LightningModule, moment: Moment) -> None:
        key = moment_key(trainer, moment)
        if any(record.key == key for record in self._applied):
            return
        self.moment = moment  # deprecated: read by overrides of should_edit without `moment`
        try:
            new_style = takes_moment(self.should_edit)
            if self.should_edit(trainer, pl_module, moment) if new_style else self.should_edit(trainer, pl_module):
                self.edit(trainer, pl_module, key=key, can_log=moment in ("step", "epoch_end"))
        finally:
            self.moment = None

    def edit(
        self, trainer: Trainer, pl_module: LightningModule, *, key: str = "manual", can_log: bool = False
    ) -> EditDelta:
        """Compute the edit of all requests from the current weights and statistics, apply it and report it.

        Called by the hooks; call it yourself to edit at another moment (``can_log`` only inside hooks where
        ``LightningModule.log`` is allowed, otherwise the metrics go straight to the loggers).
        """
        from lightning_kedit.editing import compute_edit

        model = language_model(pl_module)
        tokenizer = module_tokenizer(pl_module, self._tokenizer_arg)
        check_edit_weights(ModelAdapter.for_model(model), cast(list[int], self.layers))  # sharded by configure_model
        statistics = self.gathered_statistics(trainer)
        started = time.perf_counter()
        # Prediction runs under inference mode, but the target values are found by gradient descent.
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(model):
            before = self._evaluate(model, tokenizer)
            delta = compute_edit(
                model,
                tokenizer,
                self.requests,
                method=self.method,
                layers=self.layers,
                statistics=statistics,
                hparams=self.hparams,
            )
            adopted = same_on_every_rank(trainer, delta)
            if adopted.digest() != delta.digest():
                self.on_ranks_disagree(trainer, pl_module, delta, adopted)
            delta = adopted
            report = guard_delta(trainer, self.damage_guard, model, tokenizer, delta, self.requests)
            if report is not None and not report.passed and not self.on_edit_rejected(trainer, pl_module, report):
                return delta  # not applied
            put_delta(model, delta, self.edit_as, key)
            seconds = time.perf_counter() - started
            after = self._evaluate(model, tokenizer)
        record = AppliedEdit(
            key=key,
            request_ids=tuple(r.case_id for r in self.requests),
            digest=delta.digest(),
            method=self.method,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            path=save_delta(self.save_delta_to, key, delta, trainer.is_global_zero),
        )
        self._applied.append(record)
        self._deltas[record.digest] = delta
        values = edit_metric_values(len(record.request_ids), before, after, seconds, self.metrics)
        self.history.append({"key": key, "global_step": record.global_step, **values})
        log_edit_metrics(trainer, pl_module, values, can_log)
        announce_edit(key, record.method, values)
        return delta

    def on_edit_rejected(self, trainer: Trainer, pl_module: LightningModule, report: DamageReport) -> bool:
        """Called when the damage guard rejects an edit; return True to apply it anyway. Override to decide.

        Records the report in :attr:`rejections`, then follows ``on_damage`` (raise, warn and skip, or apply).
        """
        self.rejections.append(report)
        return handle_rejection(self.on_damage, report)

    def on_ranks_disagree(
        self, trainer: Trainer, pl_module: LightningModule, computed: EditDelta, adopted: EditDelta
    ) -> None:
        """Called on a process whose own delta differs from rank 0's, which it applies instead.

        The weights stay bit-identical on every process either way; by default the event is recorded in
        :attr:`rank_disagreements` (``(global_step, computed digest, adopted digest)``). Override it to raise
        where the processes must agree (deterministic kernels), or to log the difference.
        """
        self.rank_disagreements.append((trainer.global_step, computed.digest(), adopted.digest()))

    def revert(self, trainer: Trainer) -> int:
        """Undo every edit this callback put in the model (newest first); returns how many were undone."""
        model = language_model(trainer.lightning_module)
        records = list(reversed(self._applied))
        deltas = [recorded_delta(record, self._deltas) for record in records]
        for record, delta in zip(records, deltas, strict=True):
            take_delta(model, delta, self.edit_as, record.key)
        count = len(self._applied)
        self._applied.clear()
        if count:
            rank_zero_info(f"KnowledgeEditCallback: reverted {count} edit(s)")
        return count

    def gathered_statistics(self, trainer: Trainer) -> KeyStatistics | None:
        """The statistics an edit would use now: under DDP, the sum over every process's batches so far.

        A collective call when the statistics come from batches and several processes run: call it on all.
        """
        statistics = self.statistics
        if statistics is None or self.statistics_source is None:
            return statistics
        return gather_statistics(trainer, statistics, self.statistics_source)

    def _evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """The edit metrics of the requests now (``{}`` when none is reported)."""
        return evaluate_edit(model, tokenizer, self.requests, self.metrics, self.ppl_text, self.ppl_tokens)
