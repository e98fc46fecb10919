"""TrainingStage: runs the scheduler, snapshots datasets, drives the trainer.

The loop evaluates the scheduler's triggers every
``learning.evaluate_interval_seconds`` (inside a writer transaction, so the
decision and its record are atomic). When it fires, an update runs as its
own task: compose the batch, write the snapshot (off the event loop), run
the trainer hook (a real subprocess or HTTP call, never on the writer
thread), register the candidate. Each step is appended to the learning
history: ``dataset``, ``training_started``, ``training_succeeded`` or
``training_failed`` (with the reason), ``candidate_registered``.

A failed run clears the in-flight mark and counts a failure: the scheduler
then backs off, so a broken trainer cannot cause a trigger storm. A run cut
short by a restart is recorded as failed on the next start, not re-run; a
trainer of such a run that is still alive (recorded by pid and start time)
is killed, with its process group, before anything else can start.

The stage also answers the AdminService ``TriggerLearning`` and
``ExportSamples`` RPCs and gives the ``learning`` part of the status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import lmdb
from atlas_sidecar_client.pb import admin_pb2

from sidecar import instruments as ins
from sidecar._aio import cancel_and_wait, spawn
from sidecar.config import SidecarConfig
from sidecar.errors import SidecarError, StoreError, StoreFullError
from sidecar.learning import Decision, HoldoutSet, LearningScheduler
from sidecar.names import InvalidNameError, inside, require_name
from sidecar.scoring import (
    EXPORT_KINDS,
    FeedbackProcessor,
    Sample,
    current_weight_version,
    encode_row,
    iter_export_rows,
    iter_pairs,
    iter_samples,
    quarantined_sources,
    read_all_version_feedback,
    read_counters,
)
from sidecar.store import Store, StoreWriter, append_history, encode_u64, read_history
from sidecar.telemetry import fold_versions
from sidecar.training._composer import (
    BatchComposer,
    ComposeContext,
    ComposerChain,
    LearningBatch,
    QualityFilter,
)
from sidecar.training._dataset import Snapshot, write_snapshot
from sidecar.training._hooks import (
    CandidateSpec,
    TrainerHook,
    TrainingFailed,
    TrainingJob,
    make_hook,
)
from sidecar.training._procs import RunningTrainer, kill_group, process_start_ticks
from sidecar.training._registry import CandidateExistsError, ModelRegistry

__all__ = ["TrainingStage", "UpdateOutcome"]

log = logging.getLogger(__name__)

_EXPORT_KIND_NAMES = {
    admin_pb2.EXPORT_KIND_SFT: "sft",
    admin_pb2.EXPORT_KIND_DPO: "dpo",
    admin_pb2.EXPORT_KIND_KTO: "kto",
}
_EXPORT_CHUNK = 500
#: meta key of the trainer process now running (a RunningTrainer), if any
_RUNNING_KEY = b"training/running"


class InvalidRequestError(SidecarError):
    """A request names something that does not exist; the message names the field."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class UpdateOutcome:
    __slots__ = ("candidate", "ok", "reason", "snapshot", "update_id")

    def __init__(
        self,
        update_id: str,
        ok: bool,
        reason: str,
        snapshot: Snapshot | None = None,
        candidate: str = "",
    ) -> None:
        self.update_id = update_id
        self.ok = ok
        self.reason = reason
        self.snapshot = snapshot
        self.candidate = candidate


class TrainingStage:
    """The learning loop. ``composer`` and ``hook`` are replaceable before start.

    ``composer`` is a :class:`ComposerChain` whose first step is the default
    :class:`QualityFilter`; other stages ``append`` their steps to it.
    """

    def __init__(
        self,
        store: Store,
        writer: StoreWriter,
        config: SidecarConfig,
        *,
        scheduler: LearningScheduler,
        registry: ModelRegistry,
        scoring: FeedbackProcessor,
        hook: TrainerHook | None = None,
        composer: BatchComposer | None = None,
        holdout: HoldoutSet | None = None,
        pinned_versions: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self._store = store
        self._writer = writer
        self.config = config
        # versions that keep their own status entry past telemetry.max_versions
        self._pinned_versions = pinned_versions
        self.scheduler = scheduler
        self.registry = registry
        self.scoring = scoring
        self.hook: TrainerHook | None = hook if hook is not None else make_hook(config.training)
        self.composer: BatchComposer = composer or ComposerChain([QualityFilter()])
        # Held-out requests and prompts never leave in an export.
        self.holdout = holdout if holdout is not None else HoldoutSet(store, config.holdout)
        self.datasets_dir = Path(config.store.data_dir) / "datasets"
        self.runs_dir = Path(config.store.data_dir) / "training"
        self._loop_task: asyncio.Task[None] | None = None
        self._update_task: asyncio.Task[UpdateOutcome] | None = None
        self._started = False
        self.outcomes: list[UpdateOutcome] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        await self._writer.run(self.scoring.bind)
        await self.registry.start()
        await self._kill_leftover_trainer()
        await self._writer.run(self._recover)
        self._loop_task = spawn(self._run(), stage="learning", name="scheduler")

    async def shutdown(self) -> None:
        """Stops evaluating; a running trainer is killed and its run recorded
        as failed. Safe before start and twice."""
        task, self._loop_task = self._loop_task, None
        await cancel_and_wait(task)
        upd, self._update_task = self._update_task, None
        if upd is not None and not upd.done():
            upd.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await upd
        await self.registry.shutdown()

    async def _kill_leftover_trainer(self) -> None:
        """A trainer recorded as running when the daemon last stopped is killed
        (its whole group) if that very process still runs; a pid that now
        names another process (its start time differs) is left alone."""
        with self._store.read() as txn:
            raw = txn.get(_RUNNING_KEY, db=self._store.db("meta"))
        run = RunningTrainer.decode(bytes(raw)) if raw is not None else None
        if run is None:
            return
        if await asyncio.to_thread(kill_group, run):
            log.warning(
                "killed the trainer of an interrupted run, left running by the last daemon",
                extra={"update_id": run.update_id, "pid": run.pid},
            )

    def _recover(self, txn: lmdb.Transaction) -> None:
        txn.delete(_RUNNING_KEY, db=self._store.db("meta"))
        st = self.scheduler.state(txn)
        if st.in_flight:
            reason = "interrupted: the daemon stopped before the run finished"
            append_history(
                txn, self._store, "training_failed", update_id=st.in_flight, reason=reason
            )
            self.scheduler.finish(txn, st.in_flight, ok=False, outcome=f"failed: {reason}")

    async def _run(self) -> None:
        interval = self.config.learning.evaluate_interval_seconds
        full_logged = False
        while True:
            try:
                await self.evaluate_once()
                full_logged = False
            except asyncio.CancelledError:
                raise
            except StoreFullError as exc:
                # expected until space returns: one line per full spell
                if not full_logged:
                    log.warning("learning waits: the store is full", extra={"reason": str(exc)})
                    full_logged = True
            except Exception:
                log.exception("learning scheduler evaluation failed; will retry")
            await asyncio.sleep(interval)

    # -- deciding ---------------------------------------------------------------

    async def evaluate_once(self, *, manual_reason: str | None = None) -> Decision | None:
        now = _now_ms()
        decision = await self._writer.run(
            lambda txn: self.scheduler.evaluate(txn, now, manual_reason=manual_reason)
        )
        if decision is not None and decision.fired:
            self._update_task = spawn(
                self._run_update(decision), stage="learning", name=f"update-{decision.update_id}"
            )
        return decision

    async def wait_update(self) -> UpdateOutcome | None:
        """Waits for the running update, if any, and returns how it ended (None: none ran)."""
        task = self._update_task
        if task is None:
            return None
        return await asyncio.shield(task)

    # -- one update --------------------------------------------------------------

    async def _run_update(self, decision: Decision) -> UpdateOutcome:
        uid = decision.update_id
        started = time.monotonic()
        try:
            with ins.span(
                "learning.update",
                parent=decision.traceparent or None,
                update_id=uid,
                trigger=decision.trigger,
                base_version=decision.base_version,
            ):
                outcome = await self._update(decision)
        except asyncio.CancelledError:
            await self._finish(
                uid, ok=False, reason="cancelled: the daemon is shutting down", started=started
            )
            raise
        except TrainingFailed as exc:
            outcome = UpdateOutcome(uid, False, str(exc))
        except Exception as exc:
            log.exception("learning update failed", extra={"update_id": uid})
            outcome = UpdateOutcome(uid, False, f"{type(exc).__name__}: {exc}")
        if outcome.reason != "export only":
            await self._finish(
                uid,
                ok=outcome.ok,
                reason=outcome.reason,
                started=started,
                candidate=outcome.candidate,
            )
        self.outcomes.append(outcome)
        return outcome

    async def _finish(
        self, uid: str, *, ok: bool, reason: str, started: float, candidate: str = ""
    ) -> None:
        duration = round(time.monotonic() - started, 3)

        def record(txn: lmdb.Transaction) -> None:
            if ok:
                append_history(
                    txn,
                    self._store,
                    "training_succeeded",
                    update_id=uid,
                    version=candidate,
                    duration_s=duration,
                )
            else:
                append_history(
                    txn,
                    self._store,
                    "training_failed",
                    update_id=uid,
                    reason=reason,
                    duration_s=duration,
                )
            self.scheduler.finish(
                txn, uid, ok=ok, outcome="succeeded" if ok else f"failed: {reason}"
            )
            txn.delete(_RUNNING_KEY, db=self._store.db("meta"))

        await self._writer.run(record)

    async def _record_trainer(self, uid: str, pid: int) -> None:
        ticks = process_start_ticks(pid)
        if ticks is None:
            return  # it is gone already
        run = RunningTrainer(uid, pid, ticks)
        try:
            await self._writer.run(
                lambda txn: txn.put(_RUNNING_KEY, run.encode(), db=self._store.db("meta"))
            )
        except StoreError as exc:
            # The leash still ties the trainer to this process; only a
            # restart's clean-up of a leftover is lost. Not worth the run.
            log.warning(
                "could not record the running trainer",
                extra={"update_id": uid, "pid": pid, "reason": str(exc)},
            )

    async def build_batch(self, decision: Decision) -> tuple[LearningBatch, ComposeContext]:
        cfg = self.config.scoring
        with self._store.read() as txn:
            quarantine = quarantined_sources(
                txn,
                self._store,
                min_history=cfg.quarantine_min_history,
                min_sources=cfg.quarantine_min_sources,
                z_threshold=cfg.quarantine_z,
            )
            a, b = decision.sample_range
            carried = self._carried(txn, a)
            samples = [
                replace(s, quarantined=any(src in quarantine for src in s.sources))
                for s in (*carried, *iter_samples(txn, self._store, after_no=a, upto_no=b))
            ]
            pa, pb = decision.pair_range
            pairs = [
                replace(p, quarantined=any(src in quarantine for src in p.sources))
                for p in iter_pairs(txn, self._store, after_no=pa, upto_no=pb)
            ]
        ctx = ComposeContext(
            store=self._store,
            writer=self._writer,
            update_id=decision.update_id,
            trigger=decision.trigger,
            base_version=decision.base_version,
            now_ms=_now_ms(),
            sample_range=decision.sample_range,
            pair_range=decision.pair_range,
        )
        if carried:
            ctx.extra["carried_samples"] = len(carried)
        return LearningBatch(tuple(samples), tuple(pairs)), ctx

    def _carried(self, txn: lmdb.Transaction, after_no: int) -> list[Sample]:
        """Samples an earlier batch left pending (a composer step keeps them),
        read again; those no longer stored as they were are skipped."""
        carried_of = getattr(self.composer, "carried", None)
        if carried_of is None:
            return []
        db = self._store.db("samples")
        out: list[Sample] = []
        for no, request_id in carried_of(txn):
            if no > after_no:
                continue  # in this batch's range already
            raw = txn.get(encode_u64(no), db=db)
            if raw is None:
                continue
            sample = Sample.from_json(raw)
            # a rebuilt store (reprocess) may number samples differently
            if sample.request_id == request_id and sample.qualifies:
                out.append(sample)
        return out

    async def _update(self, decision: Decision) -> UpdateOutcome:
        uid = decision.update_id
        try:
            require_name("update_id", uid)
            inside(self.datasets_dir, uid)
            inside(self.runs_dir, uid)
        except InvalidNameError as exc:
            raise TrainingFailed(f"not writing a dataset for update {uid!r}: {exc}") from exc
        batch, ctx = await self.build_batch(decision)
        quarantined = sum(s.quarantined for s in batch.samples) + sum(
            p.quarantined for p in batch.pairs
        )
        batch = await self.composer.compose(batch, ctx)
        with self._store.read() as txn:
            weight_version = current_weight_version(txn, self._store)
        with ins.span("learning.dataset", update_id=uid) as dataset_span:
            snapshot = await asyncio.to_thread(
                write_snapshot,
                self.datasets_dir,
                uid,
                batch,
                trigger=decision.trigger,
                reason=decision.reason,
                base_version=decision.base_version,
                created_ms=ctx.now_ms,
                extra={
                    "weight_version": weight_version,
                    "sample_range": list(decision.sample_range),
                    "pair_range": list(decision.pair_range),
                    "quarantined_excluded": quarantined,
                    # what the composer steps report (selection, replay, holdout)
                    **ctx.extra,
                },
            )
            dataset_span.set_attribute("rows", snapshot.rows)
        await self._writer.run(
            lambda txn: append_history(
                txn,
                self._store,
                "dataset",
                update_id=uid,
                path=str(snapshot.path),
                trigger=decision.trigger,
                base_version=decision.base_version,
                counts=snapshot.manifest["counts"],
                sha256={k: v["sha256"] for k, v in snapshot.manifest["files"].items()},
            )
        )
        hook = self.hook
        if hook is None:
            await self._writer.run(
                lambda txn: self.scheduler.finish(txn, uid, ok=True, outcome="exported")
            )
            return UpdateOutcome(uid, True, "export only", snapshot)
        if snapshot.rows == 0:
            raise TrainingFailed("the dataset is empty (every new row was filtered out)")

        output_dir = self.runs_dir / uid

        async def started(pid: int) -> None:
            await self._record_trainer(uid, pid)

        job = TrainingJob(
            update_id=uid,
            dataset_dir=snapshot.path,
            output_dir=output_dir,
            base_version=decision.base_version,
            manifest=snapshot.manifest,
            timeout_seconds=self.config.training.timeout_seconds,
            on_started=started,
        )
        await self._writer.run(
            lambda txn: append_history(
                txn,
                self._store,
                "training_started",
                update_id=uid,
                hook=hook.name,
                dataset_dir=str(snapshot.path),
                output_dir=str(output_dir),
                base_version=decision.base_version,
            )
        )
        waiter = self.registry.wait_for_update(uid)
        try:
            with ins.span("training.run", update_id=uid, hook=hook.name):
                spec = await hook.train(job)
                # registration (and an automatic rollout) continue this trace
                version = await self._candidate(uid, spec, decision.base_version, waiter, job)
        finally:
            waiter.cancel()
        return UpdateOutcome(uid, True, "succeeded", snapshot, candidate=version)

    async def _candidate(
        self,
        uid: str,
        spec: CandidateSpec | None,
        base_version: str,
        waiter: asyncio.Future[Any],
        job: TrainingJob,
    ) -> str:
        if spec is not None:
            try:
                record, _ = await self.registry.register_candidate(
                    spec.version,
                    spec.artifact_uri,
                    dict(spec.metrics),
                    base_version=base_version,
                    update_id=uid,
                )
            except CandidateExistsError as exc:
                existing = self.registry.get(spec.version)
                if existing is not None and existing.update_id == uid:
                    return existing.version  # the trainer also called RegisterCandidate
                raise TrainingFailed(f"candidate.json: {exc}") from exc
            return record.version
        existing = self.registry.find_by_update(uid)
        if existing is not None:
            return existing.version
        if self.hook is not None and self.hook.name == "http":
            try:
                rec = await asyncio.wait_for(waiter, timeout=job.timeout_seconds)
            except TimeoutError:
                raise TrainingFailed(
                    "the trainer accepted the job but no candidate was registered for "
                    f"{uid} within {job.timeout_seconds:g} s"
                ) from None
            return str(rec.version)
        raise TrainingFailed(
            "the trainer exited 0 but wrote no candidate.json and registered no "
            f"candidate for {uid}"
        )

    # -- AdminService: TriggerLearning, ExportSamples -------------------------------

    async def trigger(
        self, request: admin_pb2.TriggerLearningRequest
    ) -> admin_pb2.TriggerLearningResponse:
        reason = request.reason.strip() or "manual trigger"
        decision = await self.evaluate_once(manual_reason=reason)
        assert decision is not None
        return admin_pb2.TriggerLearningResponse(
            fired=decision.fired, reason=decision.reason, update_id=decision.update_id
        )

    def quarantine(self) -> dict[str, float]:
        cfg = self.config.scoring
        with self._store.read() as txn:
            return quarantined_sources(
                txn,
                self._store,
                min_history=cfg.quarantine_min_history,
                min_sources=cfg.quarantine_min_sources,
                z_threshold=cfg.quarantine_z,
            )

    async def export(
        self, request: admin_pb2.ExportSamplesRequest
    ) -> AsyncIterator[admin_pb2.ExportedRow]:
        kind = _EXPORT_KIND_NAMES.get(request.kind)
        if kind is None:
            raise InvalidRequestError(
                f"kind: expected one of {', '.join(k.upper() for k in EXPORT_KINDS)}"
            )
        since_ms = request.since.ToMilliseconds() if request.HasField("since") else 0
        limit = request.limit or None
        include = request.include_quarantined
        quarantine = self.quarantine()
        after = 0
        sent = 0
        while True:
            # short read transactions: never hold a reader across a send
            with self._store.read() as txn:
                chunk = []
                for no, row in iter_export_rows(
                    txn,
                    self._store,
                    kind,
                    quarantine=quarantine,
                    since_ms=since_ms,
                    after_no=after,
                    include_quarantined=include,
                    exclude=self.holdout.excludes,
                ):
                    chunk.append(row)
                    after = no
                    if len(chunk) >= _EXPORT_CHUNK:
                        break
            for row in chunk:
                yield admin_pb2.ExportedRow(json=encode_row(row))
                sent += 1
                if limit is not None and sent >= limit:
                    return
            if len(chunk) < _EXPORT_CHUNK:
                return

    # -- status ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = _now_ms()
        lcfg = self.config.learning
        with self._store.read() as txn:
            sched = self.scheduler.status(txn, now)
            counters = read_counters(txn, self._store)
            open_requests = int(txn.stat(self._store.db("windows"))["entries"])
            decisions = list(
                read_history(
                    txn,
                    self._store,
                    kinds=frozenset({"trigger", "trigger_suppressed"}),
                    newest_first=True,
                    limit=5,
                )
            )
            updates = list(
                read_history(
                    txn,
                    self._store,
                    kinds=frozenset({"training_succeeded", "training_failed", "dataset"}),
                    newest_first=True,
                    limit=1,
                )
            )
            weight_version = current_weight_version(txn, self._store)
            stable = self.registry.stable_version_txn(txn)
            perf = read_all_version_feedback(
                txn, self._store, baseline_samples=lcfg.baseline_samples
            )
        quarantine = self.quarantine()
        return {
            **sched,
            "hook": self.hook.name if self.hook else "none",
            "stable_version": stable,
            "weight_version": weight_version,
            "samples": counters.samples,
            "sft_samples": counters.sft,
            "pairs": counters.pairs,
            "open_requests": open_requests,
            "late_feedback": counters.late_feedback,
            "orphan_feedback_dropped": counters.orphans_dropped,
            "non_primary_requests": counters.non_primary,
            "quarantined_sources": dict(sorted(quarantine.items())[:20]),
            "quarantined_count": len(quarantine),
            "last_decisions": [
                {k: d.get(k) for k in ("kind", "time_ms", "trigger", "reason", "update_id")}
                for d in decisions
            ],
            "last_update": updates[0] if updates else None,
            "versions": fold_versions(
                {v: p.as_dict() for v, p in sorted(perf.items())},
                self.config.telemetry.max_versions,
                {stable or "", *(self._pinned_versions() if self._pinned_versions else ())},
            ),
            "candidates": [
                {"version": r.version, "update_id": r.update_id, "state": r.state}
                for r in self.registry.list(limit=5)
            ],
        }
