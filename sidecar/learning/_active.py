"""Active learning: tell the inference server when asking the user is worth it.

``ShouldRequestFeedback`` asks when the model's uncertainty is above a
threshold, plus a small baseline random rate so confident answers get
checked too, and never more than a user's hourly budget. The seed fixed the
threshold by hand, so the ask rate drifted with the model and the traffic;
here the threshold is a streaming quantile of recent uncertainties, chosen so
that uncertainty asks plus random asks meet ``target_ask_rate``:

    P(u > threshold) = (target - random) / (1 - random)

An ask is answered when feedback for the same ``request_id`` reaches the
event log within ``answer_window_seconds``; :class:`FeedbackAnswerProcessor`
watches the log for that. Counters survive restarts (kept in ``meta``);
unanswered asks do not (an answer to an ask made before a restart is not
counted).
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import lmdb
import numpy as np
from atlas_sidecar_client.pb import active_learning_pb2, active_learning_pb2_grpc, events_pb2

from sidecar.config import ActiveLearningConfig
from sidecar.learning._vectors import UncertaintyMeasure, check_logprobs, uncertainty
from sidecar.store import Store

__all__ = [
    "ActiveLearner",
    "ActiveLearningServicer",
    "FeedbackAnswerProcessor",
    "FeedbackDecision",
]

_HOUR = 3600.0
_COUNTERS_KEY = b"active_learning/counters"
_COUNTER_NAMES = (
    "decisions",
    "asks_uncertainty",
    "asks_random",
    "budget_exhausted",
    "confident",
    "invalid",
    "answers",
    "expired",
)


@dataclass(frozen=True, slots=True)
class FeedbackDecision:
    ask: bool
    #: "uncertainty", "random", "budget_exhausted" or "confident"
    reason: str
    #: normalized uncertainty in [0, 1] (0 without log-probs)
    uncertainty: float


class _StreamingQuantile:
    """The q-quantile of the last ``window`` observations, refreshed every ``refresh``."""

    def __init__(self, q: float, window: int, refresh: int, initial: float, warmup: int) -> None:
        self._q = q
        self._buf = np.empty(window, dtype=np.float64)
        self._n = 0
        self._pos = 0
        self._refresh = refresh
        self._since = 0
        self._warmup = min(warmup, window)
        self.value = initial if q < 1.0 else math.inf

    def push(self, x: float) -> None:
        buf = self._buf
        buf[self._pos] = x
        self._pos = (self._pos + 1) % buf.shape[0]
        if self._n < buf.shape[0]:
            self._n += 1
        self._since += 1
        if self._since >= self._refresh and self._n >= self._warmup and self._q < 1.0:
            self._since = 0
            self.value = float(np.quantile(buf[: self._n], self._q))


class ActiveLearner:
    """The decision and its bookkeeping (thread-safe for answers from the writer thread).

    Args:
        config: the ``active_learning`` section.
        measure: how log-probs become uncertainty (shared with selective learning).
        clock: monotonic seconds, for budgets and answer windows.
        rng: draws the baseline random asks.
    """

    def __init__(
        self,
        config: ActiveLearningConfig,
        measure: UncertaintyMeasure = "nll",
        *,
        store: Store | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._c = config
        self._measure = measure
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        b = config.baseline_random_rate
        p_uncertain = (config.target_ask_rate - b) / (1.0 - b) if b < 1.0 else 0.0
        self._quantile = _StreamingQuantile(
            q=1.0 - p_uncertain,
            window=config.quantile_window,
            refresh=config.quantile_refresh,
            initial=config.initial_threshold,
            warmup=config.min_observations,
        )
        self._users: OrderedDict[str, deque[float]] = OrderedDict()
        self._asked: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
        self._saved: dict[str, int] = {}

    @property
    def config(self) -> ActiveLearningConfig:
        return self._c

    @property
    def threshold(self) -> float:
        return self._quantile.value

    # -- lifecycle (counters persisted in meta) ----------------------------

    async def start(self) -> None:
        if self._store is None:
            return
        with self._store.read() as txn:
            raw = txn.get(_COUNTERS_KEY, db=self._store.db("meta"))
        if raw:
            saved = json.loads(bytes(raw))
            for name in _COUNTER_NAMES:
                self.counters[name] += int(saved.get(name, 0))
            self._saved = dict(self.counters)

    async def shutdown(self) -> None:
        return None

    def save(self, txn: lmdb.Transaction, store: Store) -> None:
        """Writes the counters to ``meta`` when they changed. Writer thread only."""
        snapshot = dict(self.counters)
        if snapshot != self._saved:
            txn.put(_COUNTERS_KEY, json.dumps(snapshot).encode(), db=store.db("meta"))
            self._saved = snapshot

    # -- the decision ------------------------------------------------------

    def validate(
        self,
        request: active_learning_pb2.ShouldRequestFeedbackRequest,
        *,
        max_id_bytes: int = 256,
        max_logprobs: int = 32768,
    ) -> str | None:
        """A reason naming the bad field, or None."""
        rid = request.request_id
        if not rid:
            return "request_id: required"
        if len(rid) > max_id_bytes // 4 and len(rid.encode("utf-8")) > max_id_bytes:
            return f"request_id: longer than {max_id_bytes} bytes"
        lps = request.token_logprobs
        if len(lps) > max_logprobs:
            return f"token_logprobs: more than {max_logprobs} entries"
        if len(lps) <= 64:
            for i, x in enumerate(lps):
                if not (x <= 0.0) or x == -math.inf:
                    return f"token_logprobs[{i}]: must be a finite log-probability <= 0, got {x!r}"
            return None
        return check_logprobs(lps)

    def decide(
        self, request_id: str, user_id: str, token_logprobs: Sequence[float]
    ) -> FeedbackDecision:
        """Whether to ask for feedback on this request. Log-probs must be valid."""
        c = self.counters
        c["decisions"] += 1
        u = uncertainty(token_logprobs, self._measure)
        threshold = self._quantile.value
        if u is not None:
            self._quantile.push(u)
        uval = 0.0 if u is None else u
        if u is not None and u > threshold:
            reason = "uncertainty"
        elif self._rng.random() < self._c.baseline_random_rate:
            reason = "random"
        else:
            c["confident"] += 1
            return FeedbackDecision(False, "confident", uval)
        now = self._clock()
        if user_id and not self._take_budget(user_id, now):
            c["budget_exhausted"] += 1
            return FeedbackDecision(False, "budget_exhausted", uval)
        c["asks_" + reason] += 1
        self._remember_ask(request_id, now)
        return FeedbackDecision(True, reason, uval)

    def _take_budget(self, user_id: str, now: float) -> bool:
        budget = self._c.max_asks_per_user_per_hour
        if budget == 0:
            return True
        users = self._users
        times = users.get(user_id)
        if times is None:
            if len(users) >= self._c.max_tracked_users:
                # forgetting a user who was asked within the hour could let them
                # be asked again over budget: refuse instead
                _oldest, oldest_times = next(iter(users.items()))
                if oldest_times and now - oldest_times[-1] < _HOUR:
                    return False
                users.popitem(last=False)
            times = deque()
            users[user_id] = times
        while times and now - times[0] >= _HOUR:
            times.popleft()
        if len(times) >= budget:
            return False
        times.append(now)
        users.move_to_end(user_id)
        return True

    def _remember_ask(self, request_id: str, now: float) -> None:
        window = self._c.answer_window_seconds
        with self._lock:
            asked = self._asked
            while asked:
                _first, at = next(iter(asked.items()))
                if now - at < window and len(asked) < self._c.max_tracked_asks:
                    break
                asked.popitem(last=False)
                self.counters["expired"] += 1
            asked[request_id] = now
            asked.move_to_end(request_id)

    def record_answer(self, request_id: str) -> bool:
        """Counts an answer when ``request_id`` was asked and is still waiting."""
        with self._lock:
            at = self._asked.pop(request_id, None)
            if at is None:
                return False
            if self._clock() - at >= self._c.answer_window_seconds:
                self.counters["expired"] += 1
                return False
            self.counters["answers"] += 1
            return True

    def count_invalid(self) -> None:
        self.counters["invalid"] += 1

    def status(self) -> dict[str, Any]:
        c = dict(self.counters)
        asks = c["asks_uncertainty"] + c["asks_random"]
        return {
            **c,
            "asks": asks,
            "ask_rate": asks / c["decisions"] if c["decisions"] else 0.0,
            "answer_rate": c["answers"] / asks if asks else 0.0,
            "target_ask_rate": self._c.target_ask_rate,
            "threshold": self.threshold,
            "waiting_answers": len(self._asked),
        }


class ActiveLearningServicer(active_learning_pb2_grpc.ActiveLearningServiceServicer):
    """``ActiveLearningService``: the decision over gRPC; bad input is INVALID_ARGUMENT."""

    def __init__(
        self, learner: ActiveLearner, *, max_id_bytes: int = 256, max_logprobs: int = 32768
    ) -> None:
        self._learner = learner
        self._max_id = max_id_bytes
        self._max_lp = max_logprobs
        cfg = learner.config
        self._message = cfg.message
        self._options = list(cfg.options)

    async def ShouldRequestFeedback(
        self,
        request: active_learning_pb2.ShouldRequestFeedbackRequest,
        context: grpc.aio.ServicerContext,
    ) -> active_learning_pb2.ShouldRequestFeedbackResponse:
        learner = self._learner
        reason = learner.validate(request, max_id_bytes=self._max_id, max_logprobs=self._max_lp)
        if reason is not None:
            learner.count_invalid()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, reason)
        d = learner.decide(request.request_id, request.user_id, request.token_logprobs)
        if d.ask:
            return active_learning_pb2.ShouldRequestFeedbackResponse(
                ask=True,
                reason=d.reason,
                uncertainty=d.uncertainty,
                message=self._message,
                options=self._options,
            )
        return active_learning_pb2.ShouldRequestFeedbackResponse(
            ask=False, reason=d.reason, uncertainty=d.uncertainty
        )


class FeedbackAnswerProcessor:
    """Reads the log for feedback on asked requests; saves the counters on tick."""

    name = "active_learning_answers"

    def __init__(self, learner: ActiveLearner, store: Store) -> None:
        self._learner = learner
        self._store = store

    def process(
        self, txn: lmdb.Transaction, seq: int, ingest_ms: int, event: events_pb2.Event
    ) -> None:
        if event.WhichOneof("payload") == "feedback":
            self._learner.record_answer(event.feedback.request_id)

    def tick(self, txn: lmdb.Transaction, now_ms: int) -> None:
        self._learner.save(txn, self._store)
