"""Knowledge Edit Callback: write facts into a model at chosen points of a Lightning fine-tuning or serving run.

:class:`KnowledgeEditCallback` collects the MLP-key statistics MEMIT needs from the batches that flow anyway
(or takes them from a file, a :class:`~lightning_kedit.statistics.KeyStatistics` or a text source), computes one
batched edit of its requests at the configured moments, applies it to the weights, and reports the edit
metrics through the trainer's loggers. Its checkpoint state records which edits are in the weights, so a resumed
run neither applies an edit twice nor loses one.

Under DDP every process sums its statistics with the others' (an all-reduce) and computes the same edit from the
same requests; the callback checks the deltas' digests agree and otherwise adopts rank 0's, so the weights stay
bit-identical. Under FSDP (v1) the edit is computed and applied on full parameters (``summon_full_params`` with
write-back). DeepSpeed, FSDP2 and tensor parallelism are refused at ``setup``.

Example::

    from lightning.pytorch import Trainer
    from lightning_kedit.lightning import KnowledgeEditCallback, KnowledgeEditModule, TextDataModule

    callback = KnowledgeEditCallback("facts.json", statistics="train", edit_at="fit_end", save_delta_to="deltas/")
    trainer = Trainer(max_steps=200, callbacks=[callback])
    trainer.fit(KnowledgeEditModule("smollm2"), TextDataModule(train_files="corpus.txt"))
    callback.history[-1]["efficacy"]  # the facts now hold
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase

# Imported at run time, not only for type checking: LightningCLI (jsonargparse) reads the signature.
from lightning_kedit.editing.hparams import METHODS, EditHyperParams
from lightning_kedit.errors import KeditError
from lightning_kedit.models import ModelAdapter
from lightning_kedit.requests import EditRequest
from lightning_kedit.statistics import KeyStatistics, KeyTracker, track_keys

if TYPE_CHECKING:
    from lightning_kedit.editing.delta import EditDelta

__all__ = ["EDIT_METRICS", "EDIT_MOMENTS", "AppliedEdit", "KnowledgeEditCallback"]

Moment = Literal["step", "epoch_end", "fit_end", "predict_start"]
EDIT_MOMENTS: tuple[str, ...] = ("step", "epoch_end", "fit_end", "predict_start")
REVERT_MOMENTS: tuple[str, ...] = ("fit_end", "predict_end", "teardown")
BATCH_SOURCES: tuple[str, ...] = ("train", "validation", "predict")
EDIT_METRICS: tuple[str, ...] = ("efficacy", "paraphrase", "neighborhood", "consistency", "score", "perplexity")
DELTA_SUFFIX = ".safetensors"
_PROGRESS_BAR_METRICS = ("edit/efficacy", "edit/neighborhood")

# Not os.PathLike: in a LightningCLI signature it makes jsonargparse pass a file's contents instead of its path.
PathLike = str | Path


@dataclass(frozen=True)
class AppliedEdit:
    """One edit that is in the weights: where it was made, which requests, and the delta's content hash."""

    key: str
    request_ids: tuple[str, ...]
    digest: str
    method: str
    epoch: int
    global_step: int
    path: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AppliedEdit:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        return cls(**{**values, "request_ids": tuple(values["request_ids"])})


class KnowledgeEditCallback(Callback):
    r"""Edits facts into the model at chosen moments of ``fit`` or ``predict``, with statistics from the batches.

    You can decide when to edit with ``edit_at`` (any of ``"fit_end"``, ``"epoch_end"``, ``"step"``,
    ``"predict_start"``), or by overriding :meth:`should_edit`, which is asked at each of those moments
    (``self.moment`` says which). Each edit happens at most once per moment key (``"fit_end"``,
    ``"epoch:3"``, ``"step:200"``, ``"predict_start"``), also across a resume from a checkpoint.

    Args:
        requests: a request file (any layout ``load_requests`` reads), or ``EditRequest`` objects.
        n_requests: read only the first ``n_requests`` of a file.
        method: an editing method of ``lightning_kedit.editing.METHODS`` (``"memit"``, ``"rome"``, ``"ft"``).
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

    Example::

        class EditWhenLossIsLow(KnowledgeEditCallback):
            def should_edit(self, trainer, pl_module):
                return self.moment == "epoch_end" and trainer.callback_metrics["train_loss"] < 2.0

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
    ) -> None:
        if n_requests is not None and n_requests < 1:
            raise KeditError(f"`n_requests` must be >= 1 or None, got {n_requests}")
        if isinstance(requests, (str, os.PathLike)):
            if not Path(requests).expanduser().is_file():
                raise KeditError(f"`requests` file {str(requests)!r} not found; give a request file (.json/.jsonl)")
            self._requests_source: Path | list[EditRequest] = Path(requests).expanduser()
            requests_key = f"{self._requests_source}:{n_requests}"
        else:
            listed = list(requests)
            if not listed or not all(isinstance(r, EditRequest) for r in listed):
                raise KeditError("`requests` must be a request file or a non-empty sequence of EditRequest")
            self._requests_source = listed[:n_requests]
            ids = "\n".join(r.case_id for r in self._requests_source)
            requests_key = "ids:" + hashlib.sha256(ids.encode()).hexdigest()[:16]
        if method not in METHODS:
            raise KeditError(f"`method` must be one of {METHODS}, got {method!r}")
        moments = [edit_at] if isinstance(edit_at, str) else list(edit_at)
        unknown = [m for m in moments if m not in EDIT_MOMENTS]
        if unknown:
            raise KeditError(f"`edit_at`={edit_at!r} has unknown moments {unknown}; choose from {EDIT_MOMENTS}")
        if ("step" in moments) != (every_n_steps is not None):
            raise KeditError(
                f"`every_n_steps`={every_n_steps} and `edit_at`={edit_at!r} disagree: give edit_at='step' "
                "together with every_n_steps=N"
            )
        if every_n_steps is not None and every_n_steps < 1:
            raise KeditError(f"`every_n_steps` must be >= 1, got {every_n_steps}")
        if epochs is not None and "epoch_end" not in moments:
            raise KeditError(f"`epochs`={list(epochs)} needs edit_at='epoch_end', got edit_at={edit_at!r}")
        if revert_at is not None and revert_at not in REVERT_MOMENTS:
            raise KeditError(f"`revert_at` must be one of {REVERT_MOMENTS} or None, got {revert_at!r}")
        if isinstance(statistics, str) and statistics in BATCH_SOURCES:
            if statistics == "predict" and "predict_start" in moments:
                raise KeditError(
                    "`statistics`='predict' with edit_at='predict_start': no prediction batch has run at "
                    "predict start; take the statistics from a file, a text source or training batches"
                )
        elif isinstance(statistics, (str, os.PathLike)) or _is_path_list(statistics):
            paths = [statistics] if isinstance(statistics, (str, os.PathLike)) else list(statistics)  # type: ignore[arg-type]
            missing = [str(p) for p in paths if not Path(p).expanduser().is_file()]
            if missing:
                raise KeditError(
                    f"`statistics` file(s) {missing} not found; give {BATCH_SOURCES}, a statistics "
                    ".safetensors file, text file(s), a KeyStatistics or None"
                )
        names = list(EDIT_METRICS) if metrics is True else [] if metrics is False else list(metrics)
        bad = [m for m in names if m not in EDIT_METRICS]
        if bad:
            raise KeditError(f"`metrics` has unknown names {bad}; choose from {EDIT_METRICS}")
        if ppl_text is not None and not Path(ppl_text).expanduser().is_file():
            raise KeditError(f"`ppl_text` file {str(ppl_text)!r} not found; give a UTF-8 text file or None")
        if statistics_tokens < 1 or ppl_tokens < 1:
            raise KeditError(f"token counts must be >= 1, got {statistics_tokens=} and {ppl_tokens=}")

        self.n_requests = n_requests
        self.method = method
        self.layers = None if layers is None else [int(i) for i in layers]
        self._hparams_arg = hparams
        self._statistics_arg = statistics
        self.statistics_tokens = statistics_tokens
        self.edit_at = tuple(moments)
        self.epochs = None if epochs is None else {int(e) for e in epochs}
        self.every_n_steps = every_n_steps
        self.revert_at = revert_at
        self.metrics = tuple(names)
        self.ppl_text = ppl_text
        self.ppl_tokens = ppl_tokens
        self.save_delta_to = None if save_delta_to is None else Path(save_delta_to).expanduser()
        self.checkpoint_deltas = checkpoint_deltas
        self._tokenizer_arg = tokenizer
        self._state_key = self._generate_state_key(
            requests=requests_key, method=method, layers=self.layers, edit_at=self.edit_at
        )

        #: The moment being considered by :meth:`should_edit`.
        self.moment: Moment | None = None
        #: One dict of metrics per edit made in this process, oldest first.
        self.history: list[dict[str, Any]] = []
        self.requests: list[EditRequest] = []
        self.hparams: EditHyperParams | None = None
        self.statistics: KeyStatistics | None = None
        self._applied: list[AppliedEdit] = []
        self._deltas: dict[str, EditDelta] = {}
        self._pending_statistics: dict[str, Any] | None = None
        self._hooks: ExitStack | None = None
        self._tracker: KeyTracker | None = None

    @property
    def state_key(self) -> str:
        return self._state_key

    @property
    def applied(self) -> tuple[AppliedEdit, ...]:
        """The edits in the weights, oldest first."""
        return tuple(self._applied)

    @property
    def statistics_source(self) -> str | None:
        """``"train"``, ``"validation"`` or ``"predict"`` when statistics come from batches, else None."""
        source = self._statistics_arg
        return source if isinstance(source, str) and source in BATCH_SOURCES else None

    def should_edit(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        """Whether to edit now; ``self.moment`` is ``"step"``, ``"epoch_end"``, ``"fit_end"`` or ``"predict_start"``.

        Override to edit on other conditions. Under DDP the answer must be the same on every process.
        """
        if self.moment not in self.edit_at:
            return False
        if self.moment == "epoch_end":
            return self.epochs is None or trainer.current_epoch in self.epochs
        if self.moment == "step":
            return trainer.global_step > 0 and trainer.global_step % cast(int, self.every_n_steps) == 0
        return True

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _check_strategy(trainer.strategy)
        model = _language_model(pl_module)
        adapter = ModelAdapter.for_model(model)
        if any(type(adapter.weight(i)).__name__ == "DTensor" for i in range(adapter.num_layers)):
            raise MisconfigurationException(
                "KnowledgeEditCallback does not support FSDP2 / tensor-parallel (DTensor) weights; "
                "use DDP or FSDP (v1, strategy='fsdp')"
            )
        tokenizer = self._tokenizer(pl_module)
        if not self.requests:
            from lightning_kedit.requests import load_requests

            source = self._requests_source
            self.requests = load_requests(source, n=self.n_requests) if isinstance(source, Path) else source
        if self.hparams is None:
            hparams = self._hparams_arg
            if not isinstance(hparams, EditHyperParams):
                defaults = EditHyperParams.for_model(model, self.method, self.layers)
                hparams = defaults.replace(**dict(hparams or {}))
            elif self.layers is not None:
                hparams = hparams.replace(layers=tuple(self.layers))
            self.layers = adapter.check_layers(list(hparams.layers), "layers")
            self.hparams = hparams
        if self.statistics is None:
            self.statistics = self._setup_statistics(trainer, model, tokenizer, adapter)
            if self._pending_statistics is not None:
                self.statistics.load_state_dict(self._pending_statistics)
                self._pending_statistics = None

    def _setup_statistics(
        self, trainer: Trainer, model: nn.Module, tokenizer: PreTrainedTokenizerBase, adapter: ModelAdapter
    ) -> KeyStatistics:
        from lightning_kedit import statistics as stats

        layers = cast(list[int], self.layers)
        source = self._statistics_arg
        if self.statistics_source is not None:
            # Local sums only: they are all-reduced explicitly, once, when an edit needs them.
            collected = KeyStatistics(layers, adapter.key_size, distributed_available_fn=_not_distributed)
            collected.persistent(True)
            return collected
        if isinstance(source, KeyStatistics):
            return source
        if isinstance(source, (str, os.PathLike)) and str(source).endswith(".safetensors"):
            return KeyStatistics.load(source, model=model, tokenizer=tokenizer, layers=layers)
        # A text source or the bundled corpus: rank 0 first, so that a cache file is written once.
        if trainer.global_rank != 0:
            trainer.strategy.barrier("kedit_statistics")
        if source is None:
            result = stats.load_or_collect_statistics(model, tokenizer, layers)
        else:
            paths = [source] if isinstance(source, (str, os.PathLike)) else list(cast(Sequence[PathLike], source))
            result = stats.collect_key_statistics(
                model, tokenizer, layers, [str(p) for p in paths], max_tokens=self.statistics_tokens
            )
        if trainer.global_rank == 0:
            trainer.strategy.barrier("kedit_statistics")
        return result

    def _tokenizer(self, pl_module: LightningModule) -> PreTrainedTokenizerBase:
        tokenizer = self._tokenizer_arg or getattr(pl_module, "tokenizer", None)
        if tokenizer is None:
            raise MisconfigurationException(
                "KnowledgeEditCallback needs a tokenizer: pass `tokenizer=` or give the LightningModule a "
                "`tokenizer` attribute (KnowledgeEditModule has one)"
            )
        return tokenizer

    # ------------------------------------------------------------------------ statistics from batches
    def _start_collecting(self, pl_module: LightningModule, source: str) -> None:
        if self.statistics_source != source or self._hooks is not None:
            return
        statistics = cast(KeyStatistics, self.statistics).to(pl_module.device)
        self._hooks = ExitStack()
        self._tracker = self._hooks.enter_context(track_keys(_language_model(pl_module), statistics))
        self._tracker.enabled = False

    def _batch_start(self, batch: Any, source: str, trainer: Trainer) -> None:
        if self._tracker is not None and self.statistics_source == source and not trainer.sanity_checking:
            # Padding positions are not keys: the batch's attention mask drops them.
            self._tracker.mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            self._tracker.enabled = True

    def _batch_end(self) -> None:
        if self._tracker is not None:
            self._tracker.enabled = False
            self._tracker.mask = None

    def _stop_collecting(self) -> None:
        if self._hooks is not None:
            self._hooks.close()
        self._hooks = None
        self._tracker = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_collecting(pl_module, "train")
        self._start_collecting(pl_module, "validation")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._start_collecting(pl_module, "validation")

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_start(batch, "train", trainer)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch, "validation", trainer)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._batch_start(batch, "predict", trainer)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._stop_collecting()

    # ----------------------------------------------------------------------------------- when to edit
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch_end()
        self._maybe_edit(trainer, pl_module, "step")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_edit(trainer, pl_module, "epoch_end")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_edit(trainer, pl_module, "fit_end")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_collecting()
        if self.revert_at == "fit_end":
            self.revert(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._maybe_edit(trainer, pl_module, "predict_start")
        self._start_collecting(pl_module, "predict")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._stop_collecting()
        if self.revert_at == "predict_end":
            self.revert(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_collecting()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop_collecting()
        if self.revert_at == "teardown":
            self.revert(trainer)

    def _moment_key(self, trainer: Trainer, moment: Moment) -> str:
        if moment == "step":
            return f"step:{trainer.global_step}"
        if moment == "epoch_end":
            return f"epoch:{trainer.current_epoch}"
        return moment

    def _maybe_edit(self, trainer: Trainer, pl_module: LightningModule, moment: Moment) -> None:
        key = self._moment_key(trainer, moment)
        if any(record.key == key for record in self._applied):
            return
        self.moment = moment
        try:
            if self.should_edit(trainer, pl_module):
                self.edit(trainer, pl_module, key=key, can_log=moment in ("step", "epoch_end"))
        finally:
            self.moment = None

    # ------------------------------------------------------------------------------------------ editing
    def edit(
        self, trainer: Trainer, pl_module: LightningModule, *, key: str = "manual", can_log: bool = False
    ) -> EditDelta:
        """Compute the edit of all requests from the current weights and statistics, apply it and report it.

        Called by the hooks; call it yourself to edit at another moment (``can_log`` only inside hooks where
        ``LightningModule.log`` is allowed, otherwise the metrics go straight to the loggers).
        """
        from lightning_kedit.editing import compute_edit

        model = _language_model(pl_module)
        tokenizer = self._tokenizer(pl_module)
        statistics = self.gathered_statistics(trainer)
        started = time.perf_counter()
        # Prediction runs under inference mode, but the target values are found by gradient descent.
        with torch.inference_mode(False), torch.enable_grad(), _full_parameters(trainer.strategy), _eval_mode(model):
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
            delta = _same_on_every_rank(trainer, delta)
            delta.apply(model)
            seconds = time.perf_counter() - started
            after = self._evaluate(model, tokenizer)
        record = AppliedEdit(
            key=key,
            request_ids=tuple(r.case_id for r in self.requests),
            digest=delta.digest(),
            method=self.method,
            epoch=trainer.current_epoch,
            global_step=trainer.global_step,
            path=self._save_delta(trainer, delta, key),
        )
        self._applied.append(record)
        self._deltas[record.digest] = delta
        self._report(trainer, pl_module, record, before, after, seconds, can_log)
        return delta

    def revert(self, trainer: Trainer) -> int:
        """Undo every edit this callback put in the weights (newest first); returns how many were undone."""
        model = _language_model(trainer.lightning_module)
        deltas = [self._delta_for(record) for record in reversed(self._applied)]
        with _full_parameters(trainer.strategy):
            for delta in deltas:
                delta.revert(model)
        count = len(self._applied)
        self._applied.clear()
        if count:
            rank_zero_info(f"KnowledgeEditCallback: reverted {count} edit(s)")
        return count

    def _delta_for(self, record: AppliedEdit) -> EditDelta:
        if record.digest in self._deltas:
            return self._deltas[record.digest]
        if record.path is not None and Path(record.path).is_file():
            from lightning_kedit.editing.delta import EditDelta

            return EditDelta.load(record.path)
        raise KeditError(
            f"the delta of edit {record.key!r} (digest {record.digest}) is not available to revert it; "
            "keep deltas with `checkpoint_deltas=True` or `save_delta_to=DIR`"
        )

    def gathered_statistics(self, trainer: Trainer) -> KeyStatistics | None:
        """The statistics an edit would use now: under DDP, the sum over every process's batches so far.

        A collective call when the statistics come from batches and several processes run: call it on all.
        """
        statistics = self.statistics
        if statistics is None or self.statistics_source is None:
            return statistics
        # Σ k kᵀ and the counts are sums, so summing every process's states gives the statistics of all
        # batches. A copy is reduced, so that collection goes on locally; like the original it never syncs
        # by itself (distributed_available_fn), so it is not reduced a second time.
        reduced = copy.deepcopy(statistics)
        if trainer.world_size > 1:
            for name, value in reduced.metric_state.items():
                if not isinstance(value, torch.Tensor):
                    raise MisconfigurationException(f"KeyStatistics state {name!r} is not a tensor")
                setattr(reduced, name, trainer.strategy.reduce(value.clone(), reduce_op="sum"))
        counts = {layer: reduced.count(layer) for layer in reduced.layers}
        if min(counts.values()) == 0:
            raise KeditError(
                f"no key statistics were collected from {self.statistics_source!r} batches before the edit "
                f"(token counts per layer: {counts}); edit later, or give `statistics=` a file or text source"
            )
        if min(counts.values()) < reduced.key_size:
            rank_zero_warn(
                f"KnowledgeEditCallback: the key statistics hold {min(counts.values())} tokens for keys of size "
                f"{reduced.key_size}, so C is rank-deficient; edit later or raise `mom2_weight` if the solve fails"
            )
        return reduced

    def _evaluate(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        if not self.metrics:
            return {}
        from lightning_kedit.metrics import evaluate_requests

        ppl_text = self.ppl_text if "perplexity" in self.metrics else None
        return evaluate_requests(model, tokenizer, self.requests, ppl_text=ppl_text, ppl_tokens=self.ppl_tokens)

    def _save_delta(self, trainer: Trainer, delta: EditDelta, key: str) -> str | None:
        if self.save_delta_to is None:
            return None
        path = self.save_delta_to / (re.sub(r"[^A-Za-z0-9_.-]+", "-", key) + DELTA_SUFFIX)
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            delta.save(path)
        return str(path)

    def _report(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        record: AppliedEdit,
        before: Mapping[str, Any],
        after: Mapping[str, Any],
        seconds: float,
        can_log: bool,
    ) -> None:
        values: dict[str, float] = {"n": float(len(record.request_ids)), "seconds": seconds}
        for name in self.metrics:
            if after.get(name) is not None:
                values[name] = float(after[name])
            if before.get(name) is not None:
                values[f"{name}_before"] = float(before[name])
        if "perplexity" in values and "perplexity_before" in values:
            values["perplexity_shift"] = values["perplexity"] - values["perplexity_before"]
        self.history.append({"key": record.key, "global_step": record.global_step, **values})
        logged = {f"edit/{name}": value for name, value in values.items()}
        if can_log:
            # Every process holds the same values (same edit, same requests): no reduction needed.
            shown = {k: v for k, v in logged.items() if k in _PROGRESS_BAR_METRICS}
            pl_module.log_dict(shown, prog_bar=True, sync_dist=False)
            pl_module.log_dict({k: v for k, v in logged.items() if k not in shown}, sync_dist=False)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(logged, step=trainer.global_step)
        summary = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k not in ("n", "seconds"))
        rank_zero_info(
            f"KnowledgeEditCallback: edited {len(record.request_ids)} fact(s) at {record.key} with "
            f"{record.method} in {seconds:.1f}s" + (f": {summary}" if summary else "")
        )

    # -------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"applied": [asdict(record) for record in self._applied]}
        if self.checkpoint_deltas:
            state["deltas"] = {r.digest: _delta_to_bytes(self._deltas[r.digest]) for r in self._applied}
        if self.statistics is not None and self.statistics_source is not None:
            state["statistics"] = self.statistics.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The weights restored with this state already hold these edits: they are recorded, not re-applied.
        self._applied = [AppliedEdit.from_dict(item) for item in state_dict.get("applied", [])]
        for digest, payload in state_dict.get("deltas", {}).items():
            self._deltas[digest] = _delta_from_bytes(payload)
        if "statistics" in state_dict:
            if self.statistics is not None:
                self.statistics.load_state_dict(state_dict["statistics"])
            else:
                self._pending_statistics = state_dict["statistics"]
        if self._applied:
            keys = ", ".join(record.key for record in self._applied)
            rank_zero_info(f"KnowledgeEditCallback: restored {len(self._applied)} applied edit(s): {keys}")


def _not_distributed() -> bool:
    return False


def _is_path_list(value: Any) -> bool:
    return (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and bool(value)
        and all(isinstance(v, (str, os.PathLike)) for v in value)
    )


def _check_strategy(strategy: Strategy) -> None:
    name = type(strategy).__name__
    if "DeepSpeed" in name:
        raise MisconfigurationException(
            f"KnowledgeEditCallback does not support {name}: DeepSpeed partitions the weights it edits; "
            "use strategy='ddp' or strategy='fsdp'"
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, FSDPStrategy)):
        raise MisconfigurationException(
            f"KnowledgeEditCallback does not support {name} (FSDP2, tensor or model parallelism): the edited "
            "weights must be whole on every process; use a single device, strategy='ddp' or strategy='fsdp'"
        )


def _language_model(pl_module: LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    if hasattr(pl_module, "config"):
        return pl_module
    raise MisconfigurationException(
        f"KnowledgeEditCallback needs a Hugging Face causal LM: {type(pl_module).__name__} has no `model` "
        "attribute holding one; use KnowledgeEditModule or keep the model in `self.model`"
    )


@contextmanager
def _full_parameters(strategy: Strategy) -> Iterator[None]:
    """Under FSDP (v1): every process holds all parameters, and writes changes back to its shard on exit."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = cast(nn.Module, strategy.model)
        with FullyShardedDataParallel.summon_full_params(wrapped, writeback=True, with_grads=False):
            yield
    else:
        with nullcontext():
            yield


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _same_on_every_rank(trainer: Trainer, delta: EditDelta) -> EditDelta:
    """``delta`` if every process computed the same one (by digest), else rank 0's, sent to all."""
    if trainer.world_size == 1:
        return delta
    strategy = trainer.strategy
    digest = delta.digest()
    differs = strategy.reduce_boolean_decision(strategy.broadcast(digest, src=0) != digest, all=False)
    if not differs:
        return delta
    rank_zero_warn(
        "KnowledgeEditCallback: processes computed different deltas (non-deterministic kernels?); "
        "using rank 0's on every process"
    )
    # Sent as the bytes of its file: a delta object holds weak references, which do not pickle.
    return _delta_from_bytes(strategy.broadcast(_delta_to_bytes(delta), src=0))


def _delta_to_bytes(delta: EditDelta) -> torch.Tensor:
    # A uint8 tensor rather than bytes keeps checkpoints loadable with `weights_only=True`.
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"delta{DELTA_SUFFIX}"
        delta.save(path)
        return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def _delta_from_bytes(payload: torch.Tensor) -> EditDelta:
    from lightning_kedit.editing.delta import EditDelta

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"delta{DELTA_SUFFIX}"
        path.write_bytes(io.BytesIO(payload.numpy().tobytes()).getvalue())
        return EditDelta.load(path)
