"""``POST /v1/edits``: facts in, one MEMIT batch out, committed to the history and served by every worker.

:class:`EditAPI` is a LitServe ``LitAPI`` with one worker process, which holds its own copy of the model and
follows the history like the generation workers. Submissions that arrive while it computes wait in LitServe's
queue and are taken together as the next batch: their facts are solved as **one** MEMIT edit. For that batch
the worker

1. brings its model to the committed version (its active edits are the edit's base);
2. computes the delta (the model is unchanged meanwhile), has the damage guard measure it
   (:class:`~lightning_kedit.editing.damage_guard.DamageGuard`: probe perplexity and the facts' neighbourhood,
   with the delta applied temporarily) and refuses it with 422 past the guard's limits unless every submission
   says ``"force": true``; then applies it and measures efficacy on each submission's facts;
3. commits it (:meth:`HistoryStore.commit_edit <.store.HistoryStore.commit_edit>`: delta file, then manifest).
   If a revert landed meanwhile, the delta no longer fits: it is reverted and computed again on the new
   weights (up to three times, then 409).

A request body in an unusable layout, or with a subject absent from its prompt, is refused with 422 by
FastAPI before it reaches the queue (:class:`EditSubmission`). When a merged batch fails as a whole, each of its
submissions is tried alone, so that one bad submission does not sink the others.

Example:
    >>> api = EditAPI("smollm2", "history", ServeKeys(None, "w"))  # doctest: +SKIP
"""

# No ``from __future__ import annotations``: LitServe reads decode_request's annotation as a type.
import logging
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Header, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from lightning_kedit.editing.damage_guard import DamageGuard, EditRejectedError
from lightning_kedit.errors import KeditError
from lightning_kedit.requests import EditRequest, parse_request_records

from .keys import ServeKeys
from .store import HistoryStore, StaleEditError

__all__ = ["EditAPI", "EditSubmission"]

log = logging.getLogger(__name__)

#: How often an edit is computed again when reverts keep landing while it is computed.
_ATTEMPTS = 3


class EditSubmission(BaseModel):
    """``{"requests": [...], "force": false}``: requests in any layout ``kedit edit`` reads, checked on arrival.

    ``force`` commits the edit even when the damage guard rejects it.
    """

    requests: list[dict[str, Any]] = Field(min_length=1)
    force: bool = False

    @model_validator(mode="after")
    def _parse(self) -> "EditSubmission":
        try:
            parse_request_records(self.requests, "request body")
        except KeditError as err:
            raise ValueError(str(err)) from err
        return self

    def edit_requests(self) -> list[EditRequest]:
        """The parsed requests."""
        return parse_request_records(self.requests, "request body")


@dataclass(frozen=True)
class _Submission:
    requests: list[EditRequest]
    force: bool


class EditAPI(ls.LitAPI):
    """Computes and commits edits; one worker process.

    Args:
        model: the model spec.
        history: the history folder.
        keys: the server's keys (editing needs the write key).
        method: ``"memit"`` (default) or ``"rome"``.
        statistics: a key statistics file, or None for the cached statistics of the bundled corpus.
        hparams: changes to the method's per-model hyper-parameters (``EditHyperParams`` fields).
        traffic_statistics: add the generation workers' traffic statistics to the base statistics.
        threads: torch threads of the worker (None: torch's default).
        max_batch_size: the most submissions solved as one edit.
        batch_timeout: seconds the worker waits for more submissions once one has arrived.
        max_ppl_rise: the damage guard's largest relative perplexity rise on its probe (0.10 = +10%).
        max_neighborhood_drop: the damage guard's largest fall of the neighbourhood probability.
    """

    def __init__(self, model: str, history: str | os.PathLike[str], keys: ServeKeys, *, method: str = "memit",
                 statistics: str | None = None, hparams: dict[str, Any] | None = None,
                 traffic_statistics: bool = False, threads: int | None = None, max_batch_size: int = 16,
                 batch_timeout: float = 0.05, max_ppl_rise: float = 0.10,
                 max_neighborhood_drop: float = 0.10) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/edits")
        if method not in ("memit", "rome"):
            raise KeditError(f"--method {method!r}: a served model is edited with memit or rome")
        self.model_spec = model
        self.history = str(history)
        self._keys = keys
        self.method = method
        self.statistics_file = statistics
        self.hparam_changes = dict(hparams or {})
        self.guard = DamageGuard(max_perplexity_rise=max_ppl_rise, max_neighborhood_drop=max_neighborhood_drop)
        self.traffic_statistics = traffic_statistics
        self.threads = threads

    def authorize(self, authorization: Annotated[str | None, Header()] = None) -> None:
        """FastAPI dependency: the write key."""
        code = self._keys.status(authorization, write=True)
        if code is not None:
            raise HTTPException(code, "editing needs the write key as 'Authorization: Bearer KEY'")

    def setup(self, device: str) -> None:
        """Load the model and its key statistics (on the unedited weights), then follow the history."""
        from lightning_kedit.editing.edit_inputs import resolve_statistics
        from lightning_kedit.editing.hparams import EditHyperParams
        from lightning_kedit.models.fingerprint import model_fingerprint
        from lightning_kedit.models.loading import load_model

        from .follower import WeightsFollower

        if self.threads:
            torch.set_num_threads(self.threads)
        self.model, self.tokenizer = load_model(self.model_spec, device=device)
        self.hparams = EditHyperParams.for_model(self.model, self.method).with_overrides(self.hparam_changes)
        self.fingerprint = model_fingerprint(self.model, self.tokenizer, list(self.hparams.layers))
        self.store = HistoryStore(self.history)
        committed = self.store.read().fingerprint
        if committed is not None and committed != self.fingerprint:
            raise KeditError(f"--history {self.history} holds edits of another model; give a new folder for "
                             f"--model {self.model_spec}")
        self.base_statistics = resolve_statistics(self.model, self.tokenizer, self.hparams.layers,
                                                  self.statistics_file)
        self.store.mark_computing(None)  # left by a server killed during an edit
        self.follower = WeightsFollower(self.model, self.store)
        self.follower.sync()

    def decode_request(self, request: EditSubmission, **kwargs: Any) -> _Submission:
        """The submission's requests."""
        return _Submission(request.edit_requests(), request.force)

    def batch(self, inputs: list[_Submission]) -> list[_Submission]:
        """Submissions stay separate until :meth:`predict` merges them."""
        return inputs

    def unbatch(self, output: list[Any]) -> list[Any]:
        """One result per submission."""
        return output

    def predict(self, batch: list[_Submission], **kwargs: Any) -> list[dict[str, Any]]:
        """Solve the submissions as one edit; when that fails, each alone."""
        try:
            return self._edit(batch)
        except KeditError as err:
            if len(batch) == 1:
                return [_failure(err)]
        results = []
        for submission in batch:
            try:
                results.extend(self._edit([submission]))
            except KeditError as err:
                results.append(_failure(err))
        return results

    def encode_response(self, output: dict[str, Any], **kwargs: Any) -> Any:
        """The edit's record, or the error with its HTTP status."""
        if "status" in output:
            body = {key: value for key, value in output.items() if key != "status"}
            return JSONResponse(body, status_code=output["status"])
        return output

    # ------------------------------------------------------------------ the edit
    def _statistics(self) -> Any:
        if not self.traffic_statistics:
            return self.base_statistics
        from .traffic import merged_statistics

        return merged_statistics(self.base_statistics, self.store.traffic_dir)

    def _edit(self, batch: list[_Submission]) -> list[dict[str, Any]]:
        requests = _merged(batch)
        try:
            return self._edit_attempts(batch, requests)
        finally:
            self.store.mark_computing(None)

    def _edit_attempts(self, batch: list[_Submission], requests: list[EditRequest]) -> list[dict[str, Any]]:
        from lightning_kedit.editing.editor import compute_edit
        from lightning_kedit.evaluation.request_evaluation import evaluate_requests

        for _ in range(_ATTEMPTS):
            start = time.perf_counter()
            self.follower.sync()
            base_active = list(self.follower.active)
            self.store.mark_computing({"facts": len(requests), "submissions": len(batch), "since": _now(),
                                       "base_version": self.follower.version, "pid": os.getpid()})
            timings: dict[str, float] = {}
            delta = compute_edit(self.model, self.tokenizer, requests, method=self.method, hparams=self.hparams,
                                 statistics=self._statistics(), timings=timings)
            report = self.guard.measure(self.model, self.tokenizer, delta, requests)  # the model is unchanged
            timings["guard"] = report.seconds
            if not report.passed and not all(submission.force for submission in batch):
                raise EditRejectedError(report)
            delta.apply(self.model)
            try:
                scores = [evaluate_requests(self.model, self.tokenizer, submission.requests) for submission in batch]
                record = {"requests": [_record(r) for r in requests], "n": len(requests),
                          "method": self.method, "submissions": len(batch),
                          "efficacy": _mean([s["efficacy"] for s in scores], [len(b.requests) for b in batch]),
                          "guard": report.to_dict(),
                          "seconds": round(time.perf_counter() - start, 3), "created": _now()}
                edit_id, version = self.store.commit_edit(delta, base_active, record, self.fingerprint)
            except StaleEditError:
                delta.revert(self.model)
                continue
            except BaseException:
                delta.revert(self.model)
                raise
            self.follower.adopt(edit_id, delta, version)
            log.info("kedit serve: edit %s of %d fact(s) committed as version %d", edit_id, len(requests), version)
            return [{"id": edit_id, "version": version, "efficacy": s["efficacy"],
                     "efficacy_prob": s["efficacy_prob"], "paraphrase": s["paraphrase"],
                     "neighborhood": s["neighborhood"], "n": len(submission.requests), "batch_n": len(requests),
                     "submissions": len(batch), "layers": delta.layers, "method": self.method,
                     "seconds": record["seconds"], "timings": {k: round(v, 3) for k, v in timings.items()},
                     "guard": record["guard"]}
                    for s, submission in zip(scores, batch, strict=True)]
        detail = (f"the history moved on {_ATTEMPTS} times while the edit was computed (reverts landing), or the "
                  "editing worker cannot reach the committed version (the server log says why); submit it again")
        return [{"status": 409, "detail": detail} for _ in batch]


def _merged(batch: list[_Submission]) -> list[EditRequest]:
    """All submissions' requests; case ids that repeat across submissions get the submission's index."""
    import dataclasses

    seen: set[str] = set()
    merged = []
    for index, submission in enumerate(batch):
        for request in submission.requests:
            if request.case_id in seen:
                request = dataclasses.replace(request, case_id=f"{index}.{request.case_id}")
            seen.add(request.case_id)
            merged.append(request)
    return merged


def _record(request: EditRequest) -> dict[str, Any]:
    return {"case_id": request.case_id, "prompt": request.prompt, "subject": request.subject,
            "target_new": request.target_new, "target_true": request.target_true}


def _mean(values: list[float | None], weights: list[int]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else None


def _failure(err: KeditError) -> dict[str, Any]:
    if isinstance(err, EditRejectedError):  # the guard's figures, and the way to force the edit
        return {"status": 422, "detail": f"{err}; or resubmit with \"force\": true",
                "guard": err.report.to_dict()}
    return {"status": 422, "detail": str(err)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
