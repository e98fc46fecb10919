"""Typed configuration: defaults < YAML file < ``ATLAS_SIDECAR__*`` env < flags.

Every tunable number is a key here with the default and a note on what it
trades off. The configuration is read once, at start-up; a bad key or value
stops the daemon before it binds a port, with a message naming the key
(``store.commit_window_ms: ...``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.errors import ConfigError

__all__ = [
    "DEFAULT_SIGNAL_WEIGHTS",
    "ENV_PREFIX",
    "ActiveLearningConfig",
    "AdapterConfig",
    "AdminConfig",
    "AuthConfig",
    "ControlConfig",
    "GatewayConfig",
    "HoldoutConfig",
    "IngestConfig",
    "LearningConfig",
    "MemoryConfig",
    "RolloutConfig",
    "ScoringConfig",
    "SelectiveConfig",
    "ServerConfig",
    "SidecarConfig",
    "StoreConfig",
    "TelemetryConfig",
    "TlsConfig",
    "TrainingConfig",
    "load_config",
]

ENV_PREFIX = "ATLAS_SIDECAR__"


#: The seed's signal weights; thumbs and edits added for the contract's signals.
DEFAULT_SIGNAL_WEIGHTS: Mapping[str, float] = {
    "COPY": 0.8,
    "SHARE": 0.9,
    "RETRY": -0.3,
    "DISMISS": -0.5,
    "ENGAGE": 0.6,
    "THUMBS_UP": 1.0,
    "THUMBS_DOWN": -1.0,
    "EDIT": -0.2,
}


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TlsConfig(_Section):
    # PEM certificate chain and key: TLS on every TCP gRPC and HTTP listener
    # (Unix sockets stay plain; the file mode guards them). Empty: no TLS.
    cert_file: Path | None = None
    key_file: Path | None = None
    # PEM CA bundle: clients must present a certificate it signed (mutual
    # TLS). Empty: any client may connect and tokens decide.
    client_ca_file: Path | None = None
    # Seconds between checks for renewed files (size, mtime, inode); a new
    # pair is used from the next handshake. A CA taken out of client_ca_file
    # stays trusted on the HTTP listener until restart.
    reload_check_seconds: float = Field(default=5.0, gt=0)

    @field_validator("cert_file", "key_file", "client_ca_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file are set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file needs cert_file and key_file (mutual TLS is TLS)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class ServerConfig(_Section):
    # gRPC listen addresses: host:port for TCP, unix:/path for a socket.
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:50051"])
    # Group that may connect to a unix: listen socket (mode 0660). Empty: the
    # daemon's own group. Name the inference server's group to let it in
    # without letting in every user of the host or pod.
    unix_socket_group: str = ""
    # HTTP address for /metrics, /api and /dashboard; empty disables it.
    http_listen: str = "127.0.0.1:9464"
    # Largest gRPC message accepted; larger ones get RESOURCE_EXHAUSTED.
    # Bigger batches amortize per-message cost but hold more memory per stream.
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Producer calls in progress at once: StreamEvents, RecordEvents,
    # ControlService.Connect and ShouldRequestFeedback all take a slot (admin
    # and health calls do not); more get RESOURCE_EXHAUSTED. Higher admits
    # more producers; each open stream can hold max_inflight_batches batches.
    max_concurrent_streams: int = Field(default=64, ge=1)
    # Of those slots, how many one peer may hold (its address without the
    # port; a Unix socket's peer string as grpc reports it; with auth on, the
    # caller's token, since pod clients share loopback). Lower keeps one
    # runaway producer from starving the others; higher lets a single
    # multi-worker server open more streams. Above max_concurrent_streams it
    # adds no limit of its own.
    max_streams_per_peer: int = Field(default=32, ge=1)
    # Seconds SIGTERM/SIGINT waits for in-flight batches to commit and ack.
    grace_seconds: float = Field(default=10.0, gt=0)
    # A listener serving only /metrics, open to anyone who reaches it, so
    # Prometheus scrapes without a token and without reaching /api. Empty:
    # /metrics is served on http_listen only, where it needs the read role.
    metrics_listen: str = ""
    # gRPC server reflection (grpcurl, Postman). Off: it lists every method to
    # whoever asks. With auth on it needs the read role unless auth.open lists it.
    reflection: bool = False
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @field_validator("http_listen", "metrics_listen")
    @classmethod
    def _check_http(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{value!r} is not host:port")
        return value

    @field_validator("listen", mode="before")
    @classmethod
    def _split_listen(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one listen address is required")
        for addr in value:
            if addr.startswith("unix:"):
                continue
            host, sep, port = addr.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(f"{addr!r} is not host:port or unix:/path")
        return value


OpenService = Literal["health", "reflection"]


def _default_open() -> list[OpenService]:
    return ["health"]


class AuthConfig(_Section):
    # YAML file of {name, sha256, roles[, server_ids]} entries (docs/security.md);
    # reread on SIGHUP and when it changes. Empty: no authentication, and the
    # daemon then listens only on loopback or unix: sockets.
    tokens_file: Path | None = None
    # gRPC services reachable without a token: "health" (Kubernetes probes
    # send no metadata) and "reflection" (when server.reflection is on).
    open: list[OpenService] = Field(default_factory=_default_open)
    # Serve a non-loopback listener with no tokens file: everyone who reaches
    # the port may do everything. Logged as a warning at every start.
    allow_unauthenticated: bool = False
    # Seconds between checks of the tokens file for a change. Short: a
    # rotation takes effect sooner; long: fewer stat calls (they are cheap).
    reload_interval_seconds: float = Field(default=2.0, gt=0, le=3600)
    # How long a dashboard sign-in lasts; rotating the token or restarting the
    # daemon ends it sooner.
    session_seconds: float = Field(default=8 * 3600.0, ge=60)

    @field_validator("tokens_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class StoreConfig(_Section):
    # Where the LMDB environment, datasets and logs live.
    data_dir: Path = Path("./var/atlas-sidecar")
    # Initial LMDB map size. The file is sparse, so large costs nothing; the
    # map doubles on demand up to map_size_max_bytes.
    map_size_bytes: int = Field(default=1 << 30, ge=1 << 20)
    # Ceiling for map growth. Reaching it answers RESOURCE_EXHAUSTED.
    map_size_max_bytes: int = Field(default=1 << 40, ge=1 << 20)
    # Group commit: the writer takes every queued batch up to this many events
    # into one fsync'd transaction. Larger means fewer fsyncs, longer commits.
    commit_max_events: int = Field(default=8192, ge=1)
    # How long the writer waits for more batches before committing. Zero
    # commits at once (lowest latency); a little more saves fsyncs under load.
    commit_window_ms: float = Field(default=0.5, ge=0, le=1000)
    # fsync each commit. Off survives a process crash but not an OS crash.
    sync: bool = True
    # Events older than this are trimmed from the log (0: keep forever).
    retention_seconds: float = Field(default=7 * 86400, ge=0)
    # Upper bound on events kept in the log (0: no bound).
    retention_max_events: int = Field(default=50_000_000, ge=0)
    # How long an event_id is remembered for dedupe. It cannot exceed the
    # log's retention: an id is forgotten when its event is trimmed.
    dedupe_window_seconds: float = Field(default=86400, ge=0)
    # How often retention runs, and how many events it deletes per transaction
    # (bigger is faster but holds the writer longer).
    retention_interval_seconds: float = Field(default=60, gt=0)
    retention_batch: int = Field(default=10_000, ge=100)
    # How often the daemon unmaps the store pages it has read (0: never).
    # Readers touch the whole log once; unmapped, those pages stay in the OS
    # page cache but leave the daemon's RSS, which then stays flat as the log
    # grows. Shorter keeps RSS lower; each release costs the hot pages a
    # minor fault to map again.
    release_mapped_pages_seconds: float = Field(default=1.0, ge=0)
    # Free disk below which a failed write counts as a full disk (ingest
    # answers RESOURCE_EXHAUSTED and reports NOT_SERVING), and how much must
    # be free again before ingest reports SERVING. Higher flaps less between
    # full and not full; lower gives the last space to the store.
    min_free_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # While the store is full, how often it checks whether space returned.
    full_recheck_seconds: float = Field(default=2.0, gt=0, le=3600)


class IngestConfig(_Section):
    # Limits per event; an event over one is rejected with the field named.
    max_id_bytes: int = Field(default=256, ge=8)
    max_text_bytes: int = Field(default=256 * 1024, ge=16)
    max_attributes: int = Field(default=64, ge=0)
    max_attribute_key_bytes: int = Field(default=128, ge=1)
    max_attribute_value_bytes: int = Field(default=4096, ge=1)
    max_logprobs: int = Field(default=32768, ge=0)
    # Batches of one stream being committed at once. More hides commit latency
    # behind reading; fewer bounds memory per stream.
    max_inflight_batches: int = Field(default=64, ge=1)
    # Events in one EventBatch; a larger batch answers INVALID_ARGUMENT before
    # it is decoded. It bounds the memory and CPU one message can cost (a
    # 4 MiB message of empty events is two million of them); the clients cut
    # their batches at the same number. Higher amortizes more per message.
    max_events_per_batch: int = Field(default=10_000, ge=1, le=1_000_000)
    # Rejections listed (index and reason) in one ack; the rest are counted in
    # IngestAck.rejected_unlisted. Higher tells the producer more about a bad
    # batch and makes its ack bigger (about 100 bytes per listed rejection).
    max_rejections_per_ack: int = Field(default=1000, ge=0)
    # A StreamEvents call that sends nothing for this long (with no batch
    # waiting for its ack) is closed with UNAVAILABLE; the clients open a new
    # one when they next have events. Shorter frees the slots of producers
    # that went quiet sooner; longer saves reconnects for sparse producers.
    stream_idle_seconds: float = Field(default=300.0, gt=0, le=86400)


class TelemetryConfig(_Section):
    # Spans, metrics and the per-version traffic view. Off saves a few
    # percent of ingest CPU and leaves operators blind; /metrics then 404s.
    # Exporters follow the standard OTEL_* variables (OTLP only when
    # OTEL_EXPORTER_OTLP_ENDPOINT is set).
    enabled: bool = True
    # Put prompt, response and correction text into log records. Off by
    # default: logs leave the pod and user text must not.
    log_text: bool = False
    # Resolution of "performance over time" in the report. Smaller draws a
    # finer chart and stores more points (one small record per bucket).
    report_bucket_seconds: float = Field(default=60.0, ge=1.0)
    # Buckets kept for the report; older ones are dropped (1440 x 60 s = 1 day).
    report_buckets_kept: int = Field(default=1440, ge=10)
    # Updates averaged into "recent improvement". Fewer reacts faster and is noisier.
    recent_updates: int = Field(default=3, ge=1)
    # Window of "learning velocity" (improvement per day) and its delta.
    # Longer is smoother and slower to show a change.
    velocity_window_days: float = Field(default=7.0, gt=0)
    # Requests remembered to attribute feedback to a model version. More
    # memory (about 100 bytes each) versus feedback counted as version "unknown".
    request_versions_kept: int = Field(default=100_000, ge=1000)
    # Most of one core the traffic view (per-version metrics, the report's
    # time series) may use while it is behind the log. Lower protects ingest
    # during bursts; the view then lags longer before it catches up.
    view_cpu_share: float = Field(default=0.03, gt=0, le=1)
    # Events the view may fall behind before it skips ahead (counted in
    # atlas_telemetry_view_skipped_events_total) instead of holding the log's
    # retention back.
    view_max_lag_events: int = Field(default=2_000_000, ge=10_000)
    # How often the dashboard polls /api/report and /api/rollout.
    dashboard_refresh_seconds: float = Field(default=5.0, ge=1.0)
    # Model versions given their own metric series, status and report entry;
    # the rest are folded into "other" (the stable version and those a
    # rollout routes to always keep their own). More shows more versions
    # apart; each costs a few series in /metrics and an entry in status.
    max_versions: int = Field(default=64, ge=1, le=10_000)


# -- learning: scoring, scheduler, training ----------------------------------


class ScoringConfig(_Section):
    # Implicit signal weights (seed defaults; THUMBS_UP/DOWN and EDIT added for
    # the contract's signals). Changing any weight creates a new weight
    # version; `atlas-sidecar reprocess` recomputes old scores with it.
    signal_weights: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_SIGNAL_WEIGHTS))
    # Share of the explicit rating vs the implicit signals when both exist.
    explicit_weight: float = Field(default=0.5, ge=0)
    implicit_weight: float = Field(default=0.5, ge=0)
    # Reward of a request with no feedback in its window. Sits between the
    # negative and positive rewards so that silence never looks like praise
    # or like a complaint.
    default_reward: float = Field(default=0.5, ge=0, le=1)
    # How long after an answer feedback still counts (and how long feedback
    # that came first waits for its answer). Longer catches slow users but
    # delays training data and holds more open requests in the store.
    reward_window_seconds: float = Field(default=600.0, gt=0)
    # How long (log time) a closed request is remembered after its window
    # closed: a retry naming it forms a retry pair, late feedback on it is
    # counted as late and a resent answer as a duplicate. After that its
    # record (about 60 bytes) is dropped, so the requests database holds
    # about this many seconds of traffic: longer remembers older requests,
    # shorter keeps the store smaller. Feedback on a forgotten request is
    # dropped as an orphan; an answer resent under its id is scored again.
    closed_request_retention_seconds: float = Field(default=86400.0, gt=0)
    # Dwell time at or above this counts as an ENGAGE signal (0 disables).
    dwell_engage_ms: int = Field(default=10_000, ge=0)
    # Reward at or above which a sample is trained on as SFT (and labelled
    # desirable for KTO). Higher means cleaner but fewer samples.
    quality_threshold: float = Field(default=0.7, ge=0, le=1)
    # Smallest reward difference that makes two answers to the same prompt a
    # preference pair. Lower gives more pairs, noisier ones.
    pair_margin: float = Field(default=0.2, gt=0, le=1)
    # How many earlier answers to the same prompt a new one is compared with,
    # and how many score pairs it may form. More gives more pairs from
    # popular prompts, at the cost of processing time and near-duplicates.
    pair_lookback: int = Field(default=16, ge=0)
    pairs_per_sample: int = Field(default=2, ge=0)
    # Quarantine: a feedback source (user or session) whose mean rating is a
    # robust-z outlier is not trained on. Needs this many ratings from the
    # source and this many sources before judging anyone.
    quarantine_min_history: int = Field(default=5, ge=1)
    quarantine_min_sources: int = Field(default=5, ge=3)
    # |robust z| above which a source is quarantined (3.5 is the usual cut
    # for the median/MAD z-score). Lower quarantines more honest outliers.
    quarantine_z: float = Field(default=3.5, gt=0)

    @field_validator("signal_weights")
    @classmethod
    def _check_signals(cls, value: dict[str, float]) -> dict[str, float]:
        known = {"COPY", "SHARE", "RETRY", "DISMISS", "ENGAGE", "THUMBS_UP", "THUMBS_DOWN", "EDIT"}
        for name, weight in value.items():
            if name not in known:
                raise ValueError(f"unknown signal {name!r} (known: {', '.join(sorted(known))})")
            if not -1.0 <= weight <= 1.0:
                raise ValueError(f"weight of {name} must be in [-1, 1], got {weight}")
        return value


class LearningConfig(_Section):
    # sample_count trigger: new qualifying samples (SFT samples and pairs)
    # since the last update. Lower learns sooner from less evidence.
    sample_count: int = Field(default=100, ge=1)
    # time_interval trigger: seconds since the last update, provided at least
    # time_min_samples new qualifying samples exist.
    time_interval_seconds: float = Field(default=3600.0, gt=0)
    time_min_samples: int = Field(default=10, ge=1)
    # performance_drop trigger: the stable model's recent mean reward fell
    # this much below its baseline (the mean of its first baseline_samples
    # rewarded answers). Needs baseline_samples + recent_samples answers.
    performance_drop: float = Field(default=0.1, gt=0, le=1)
    baseline_samples: int = Field(default=100, ge=1)
    recent_samples: int = Field(default=100, ge=1)
    # error_threshold trigger: the stable model's recent error rate (over
    # about recent_samples requests) reached this, after min_requests.
    error_threshold: float = Field(default=0.05, gt=0, le=1)
    min_requests: int = Field(default=50, ge=1)
    # Rate limit: minimum seconds between updates and most updates per day.
    min_interval_seconds: float = Field(default=300.0, ge=0)
    max_updates_per_day: int = Field(default=24, ge=1)
    # After a failed training run the next update waits at least this long,
    # doubling per consecutive failure (capped at a day). Shorter retries a
    # flaky trainer sooner; longer spares a broken one.
    failure_backoff_seconds: float = Field(default=60.0, ge=0)
    # How often the scheduler evaluates its triggers.
    evaluate_interval_seconds: float = Field(default=1.0, gt=0)
    # The learning history (triggers, datasets, training runs, candidates,
    # rollout transitions) is trimmed like the event log: entries older than
    # this (0: keep forever) or beyond the count (0: no bound) go, oldest
    # first, at store.retention_interval_seconds. The report counts updates
    # from what is kept: longer keeps more of the past in it, and every
    # report reads all of it.
    history_retention_seconds: float = Field(default=90 * 86400, ge=0)
    history_max_entries: int = Field(default=20_000, ge=0)


class TrainingConfig(_Section):
    # Trainer hook: "none" (export only), "command" (run argv) or "http"
    # (POST the manifest).
    hook: str = "none"
    # argv template for hook=command; {dataset_dir}, {output_dir},
    # {base_version} and {update_id} are substituted per argument.
    command: list[str] = Field(default_factory=list)
    # URL for hook=http, and how many times a failed POST is retried.
    http_url: str = ""
    http_retries: int = Field(default=3, ge=0)
    # Most bytes of the trainer endpoint's answer read (a candidate is a few
    # hundred); a longer answer fails the run. Bounds what a broken or hostile
    # endpoint can make the daemon hold.
    http_max_response_bytes: int = Field(default=1 << 20, ge=1024)
    # A training run longer than this is killed and recorded as failed.
    timeout_seconds: float = Field(default=3600.0, gt=0)
    # The version traffic starts on; empty: the first model_version seen in
    # PRIMARY traffic becomes the stable version.
    base_version: str = ""

    @field_validator("hook")
    @classmethod
    def _check_hook(cls, value: str) -> str:
        if value not in ("none", "command", "http"):
            raise ValueError(f"must be one of none, command, http; got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_hook_args(self) -> TrainingConfig:
        if self.hook == "command" and not self.command:
            raise ValueError("command: hook=command needs an argv template")
        if self.hook == "http" and not self.http_url.startswith(("http://", "https://")):
            raise ValueError("http_url: hook=http needs an http(s):// URL")
        return self


# -- selective learning, memory, holdout, active learning ---------------------


class SelectiveConfig(_Section):
    # Weights of each feature in a sample's value (normalized by their sum).
    # Raising one makes the learning batch favour samples strong in it.
    uncertainty_weight: float = Field(default=0.3, ge=0)
    novelty_weight: float = Field(default=0.25, ge=0)
    error_weight: float = Field(default=0.2, ge=0)
    expertise_weight: float = Field(default=0.1, ge=0)
    priority_weight: float = Field(default=0.15, ge=0)
    # Samples below this value are not trained on. Higher trains on fewer,
    # more informative samples; lower uses more of the data.
    value_threshold: float = Field(default=0.3, ge=0, le=1)
    # Most new samples per learning batch, highest value first (0: no cap).
    # Bounds training time per update; the rest waits for the next update.
    max_batch_samples: int = Field(default=1000, ge=0)
    # Good samples cut from a full batch wait for later updates, where they
    # are valued again and ranked with the samples that arrived since: at
    # most this many, highest value first; the rest are dropped (0: none
    # wait). More keeps more good data when traffic outruns updates; every
    # update re-values all waiting samples, so more also costs more per update.
    max_pending_samples: int = Field(default=10_000, ge=0)
    # A cut sample waits only while it is younger than this, in log time
    # (its reward window's end against the newest sample offered to the
    # batch); 0: no age bound. Longer keeps good data longer; shorter keeps
    # what is learned close to what the model does now.
    max_pending_age_seconds: float = Field(default=7 * 86_400.0, ge=0)
    # How token log-probs become uncertainty: "nll" (1 - geometric mean token
    # probability) or "entropy" (mean binary entropy of the chosen tokens).
    uncertainty: Literal["nll", "entropy"] = "nll"
    # Uncertainty assumed for a sample without log-probs (neither favoured
    # nor penalized at 0.5).
    default_uncertainty: float = Field(default=0.5, ge=0, le=1)
    # Hashed character n-gram vectors for novelty and memory diversity:
    # more dimensions mean fewer hash collisions and more memory per sample.
    vector_dim: int = Field(default=1024, ge=8, le=65536)
    ngram_sizes: list[int] = Field(default_factory=lambda: [3, 4], min_length=1)
    # Attribute holding the score the model was expected to get; without it
    # the expectation is the task's running mean reward (an EWMA with this
    # weight on the newest sample: higher follows drift faster, noisier).
    expected_score_attribute: str = "expected_score"
    expected_score_alpha: float = Field(default=0.05, gt=0, le=1)
    # User expertise: a number in [0, 1] or a level named in expertise_levels;
    # missing or unknown counts as default_expertise.
    expertise_attribute: str = "user_expertise"
    expertise_levels: dict[str, float] = Field(
        default_factory=lambda: {"novice": 0.2, "intermediate": 0.5, "expert": 1.0}
    )
    default_expertise: float = Field(default=0.5, ge=0, le=1)
    # Task priority: a number in [0, 1] or a level named in priority_levels;
    # task_priorities sets it per task_id when the attribute is missing.
    priority_attribute: str = "priority"
    priority_levels: dict[str, float] = Field(
        default_factory=lambda: {"low": 0.2, "normal": 0.5, "high": 0.8, "critical": 1.0}
    )
    task_priorities: dict[str, float] = Field(default_factory=dict)
    default_priority: float = Field(default=0.5, ge=0, le=1)

    @field_validator("ngram_sizes")
    @classmethod
    def _check_ngrams(cls, value: list[int]) -> list[int]:
        if any(n < 1 or n > 16 for n in value):
            raise ValueError("every n-gram size must be between 1 and 16")
        return value

    @field_validator("expertise_levels", "priority_levels", "task_priorities")
    @classmethod
    def _check_levels(cls, value: dict[str, float]) -> dict[str, float]:
        for key, level in value.items():
            if not 0.0 <= level <= 1.0:
                raise ValueError(f"{key!r}: must be in [0, 1], got {level}")
        return value


class MemoryConfig(_Section):
    # Samples remembered per task. More keeps more of the past for replay and
    # regression checks; selection cost grows with it (quadratically).
    capacity_per_task: int = Field(default=1000, ge=1, le=100_000)
    # Share of replayed rows in each learning batch. Higher protects old
    # tasks against forgetting; lower learns the new data faster.
    replay_ratio: float = Field(default=0.5, ge=0, lt=1)
    # Attribute naming a sample's task; samples without it share default_task.
    task_attribute: str = "task_id"
    default_task: str = "default"
    # How much a sample's importance (its value) stretches its distance in the
    # diversity selection: 0 keeps the most diverse set regardless of value,
    # near 1 strongly favours valuable samples.
    importance_weight: float = Field(default=0.5, ge=0, lt=1)


class HoldoutConfig(_Section):
    # Share of good samples per task set aside, never trained on, for
    # validation. More gives a sharper regression check, less training data.
    fraction: float = Field(default=0.1, ge=0, lt=1)
    # Holdout samples kept per task (0: no cap). Past the cap every new
    # sample goes to training.
    max_per_task: int = Field(default=1000, ge=0)
    # Share of regression prompts drawn from the holdout (the rest from
    # memory): unseen data checks generalization, memory checks forgetting.
    regression_holdout_share: float = Field(default=0.5, ge=0, le=1)


class ActiveLearningConfig(_Section):
    # Share of requests the sidecar tells the server to ask feedback for.
    # More feedback vs more interruptions for users.
    target_ask_rate: float = Field(default=0.1, gt=0, le=1)
    # Asked at random whatever the uncertainty, so confident answers are
    # checked too (part of the target rate, not on top of it).
    baseline_random_rate: float = Field(default=0.02, ge=0, le=1)
    # Most asks per user per hour; 0 disables the budget. Anonymous requests
    # (no user_id) have no budget.
    max_asks_per_user_per_hour: int = Field(default=5, ge=0)
    # Streaming quantile: the threshold is that quantile of the last
    # quantile_window uncertainties, recomputed every quantile_refresh calls.
    # A longer window is steadier, a shorter one follows drift sooner.
    quantile_window: int = Field(default=4096, ge=16)
    quantile_refresh: int = Field(default=64, ge=1)
    # Threshold used until min_observations uncertainties have been seen.
    initial_threshold: float = Field(default=0.5, ge=0, le=1)
    min_observations: int = Field(default=64, ge=1)
    # How long an ask waits for its answer (feedback on the same request_id),
    # and how many unanswered asks and known users are tracked at once.
    answer_window_seconds: float = Field(default=86400, gt=0)
    max_tracked_asks: int = Field(default=200_000, ge=1)
    max_tracked_users: int = Field(default=100_000, ge=1)
    # What the server shows the user, and the answers it offers.
    message: str = "How would you rate this response?"
    options: list[str] = Field(default_factory=lambda: ["Helpful", "Not helpful", "Needs fixing"])

    @model_validator(mode="after")
    def _check_rates(self) -> ActiveLearningConfig:
        if self.baseline_random_rate > self.target_ask_rate:
            raise ValueError("baseline_random_rate must not exceed target_ask_rate")
        return self


# -- rollout (sidecar/rollout) ------------------------------------------------


class ValidationConfig(_Section):
    # Probe the candidate and the stable model on regression prompts before any
    # user sees the candidate. Off skips straight to shadow or canary.
    enabled: bool = True
    # Regression prompts per probe. More catches rarer regressions, costs
    # inference time on both models.
    prompts: int = Field(default=50, ge=1, le=10_000)
    # Seconds to wait for every probe answer; missing answers by then make the
    # validation inconclusive (see rollout.on_inconclusive).
    deadline_seconds: float = Field(default=300.0, gt=0)
    # Non-degradation rule. The candidate's error rate may exceed the stable
    # one's by at most this much (absolute). Stricter blocks more candidates.
    max_error_rate_increase: float = Field(default=0.0, ge=0, le=1)
    # The candidate's mean similarity to the reference answers must be at least
    # this fraction of the stable model's. The references are mostly the stable
    # model's own well-rated answers, so this check flatters the stable model:
    # a better candidate that answers differently scores lower (measured in the
    # demo: better candidates 0.78-0.89, a sabotaged one 0.62). It is a gate
    # against gross breakage; live feedback in shadow and canary judges quality.
    # 1.0 demands no loss at all and blocks most improvements.
    min_similarity_ratio: float = Field(default=0.7, ge=0, le=1)
    # Candidate median probe latency / stable median latency must stay below this.
    max_latency_ratio: float = Field(default=1.5, gt=0)
    # Comparator scoring answers against the regression set's references.
    comparator: Literal["exact", "token_jaccard", "char_ngram_cosine"] = "char_ngram_cosine"


class ShadowConfig(_Section):
    # Mirror live traffic to the candidate (answers never shown) before canary.
    enabled: bool = True
    # Share of live requests mirrored, in basis points. More gathers evidence
    # faster, costs candidate inference on that share.
    mirror_bps: int = Field(default=1000, ge=1, le=10_000)
    # Shortest time in shadow, and the deadline after which too little evidence
    # makes it inconclusive.
    min_dwell_seconds: float = Field(default=300.0, ge=0)
    max_dwell_seconds: float = Field(default=1800.0, gt=0)
    # Compared request pairs needed before shadow can pass.
    min_samples: int = Field(default=200, ge=1)
    comparator: Literal["exact", "token_jaccard", "char_ngram_cosine"] = "token_jaccard"
    # Mean agreement with the stable answers needed to pass. Higher insists the
    # candidate changes little; a fine-tune that should change answers needs less.
    min_agreement: float = Field(default=0.3, ge=0, le=1)
    # Candidate p99 latency / stable p99 latency on the same requests.
    max_latency_p99_ratio: float = Field(default=1.5, gt=0)


class CanaryConfig(_Section):
    # Candidate's share of traffic per stage, in percent, ascending. Reaching
    # 100 is the promotion (there is no stable traffic left to compare with).
    stages_percent: list[float] = Field(default_factory=lambda: [1.0, 5.0, 10.0, 25.0, 50.0, 100.0])
    # Each stage lasts at least this long and until min_samples candidate
    # requests were seen. Longer and larger means more evidence, slower rollouts.
    min_dwell_seconds: float = Field(default=300.0, ge=0)
    min_samples: int = Field(default=200, ge=1)
    # A stage still short of evidence after this long is inconclusive.
    max_dwell_seconds: float = Field(default=3600.0, gt=0)
    # False-alarm bound of each guardrail over the whole rollout (Ville): the
    # chance a candidate as good as stable is rolled back by that guardrail.
    # Smaller means fewer false rollbacks and slower detection.
    alpha: float = Field(default=0.01, gt=0, lt=0.5)
    # Error-rate guardrail: roll back when the candidate's error rate exceeds
    # this multiple of the stable one's (1.0: any increase, given evidence).
    error_rate_ratio: float = Field(default=1.0, gt=0)
    # Latency guardrail: requests slower than the stable model's quantile
    # (0.99: its p99) must not be more frequent, by this ratio, on the candidate.
    latency_quantile: float = Field(default=0.99, gt=0.5, lt=1)
    latency_exceedance_ratio: float = Field(default=1.5, gt=0)
    # Feedback guardrail: roll back when the candidate's mean reward is below
    # the stable one's by more than this margin (rewards in [0, 1]).
    feedback_margin: float = Field(default=0.02, ge=0, lt=1)
    # Promotion needs evidence of non-inferiority, not only no evidence of
    # harm: before the last comparing stage advances to 100 %, an anytime-valid
    # lower confidence bound (level 1 - alpha) on the candidate's mean reward
    # minus the stable one's must be above -non_inferiority_margin. Smaller
    # demands more feedback (a candidate as good as stable needs roughly
    # 8 * var / margin^2 paired rewards); 0 disables the proof (promotion on
    # "no harm seen", which lets a clearly worse candidate with little
    # feedback through). Inconclusive at the stage deadline: rollout.on_inconclusive.
    # Also accepted under its former name, feedback_noninferiority_margin.
    non_inferiority_margin: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        validation_alias=AliasChoices("non_inferiority_margin", "feedback_noninferiority_margin"),
    )
    # Ask for the same proof before leaving every stage, not only the last
    # comparing one: a worse candidate then never gets past its first stage
    # (it holds there until a guardrail proves harm or the deadline passes),
    # at the price of good candidates waiting for enough feedback at small shares.
    non_inferiority_every_stage: bool = False
    # Stable scores averaged into each paired comparison; more lowers noise.
    pair_block: int = Field(default=8, ge=1, le=256)

    @field_validator("stages_percent")
    @classmethod
    def _check_stages(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("at least one stage is required")
        if any(not 0 < v <= 100 for v in value):
            raise ValueError("every stage must be in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("stages must be strictly ascending")
        return value


class BlueGreenConfig(_Section):
    # After the switch the old version stays loaded this long for an instant
    # rollback; longer holds memory on the inference server.
    retention_seconds: float = Field(default=3600.0, ge=0)
    # Probe answers with an error that the candidate may give before switching.
    max_probe_error_rate: float = Field(default=0.0, ge=0, le=1)
    # Seconds to wait for the load and the probe before the switch is abandoned.
    deadline_seconds: float = Field(default=600.0, gt=0)


class RolloutConfig(_Section):
    # Start a rollout when a candidate is registered. Off: operators start them.
    auto_start: bool = False
    # Default strategy when a request does not say.
    strategy: Literal["canary", "blue_green"] = "canary"
    # What an inconclusive stage does at its deadline: return traffic to the
    # stable model (safe) or hold the split and wait for an operator.
    on_inconclusive: Literal["rollback", "pause"] = "rollback"
    # How often the engine evaluates the active rollout. Shorter reacts faster
    # and writes more checkpoints.
    evaluate_interval_seconds: float = Field(default=1.0, gt=0)
    # How often the analysis state is checkpointed between transitions. On a
    # restart, observations since the checkpoint are re-read from the log.
    checkpoint_interval_seconds: float = Field(default=10.0, gt=0)
    # Stable version when neither the control plane nor a promotion set one.
    initial_stable_version: str = ""
    # Lease carried by every traffic split (see control.proto).
    lease_seconds: int = Field(default=30, ge=0)
    # After a promotion or rollback the replaced version stays loaded this long.
    unload_after_seconds: float = Field(default=600.0, ge=0)
    # Recent good PRIMARY answers kept as the default regression set.
    regression_pool: int = Field(default=500, ge=1)
    # A PRIMARY answer joins the regression pool when its reward reaches this.
    regression_min_reward: float = Field(default=0.75, ge=0, le=1)
    # Feedback on a rollout's request counts for the arm that served it when
    # it arrives within this long (log time) of the request, across restarts.
    # Longer counts slow feedback too; shorter keeps fewer requests in memory
    # and in the store.
    feedback_window_seconds: float = Field(default=3600.0, gt=0)
    # Most recent rollout requests whose serving arm is remembered (memory
    # and store, about 100 bytes each); feedback on older ones is not
    # counted. Raise it with the request rate times the feedback delay.
    feedback_join_capacity: int = Field(default=100_000, ge=1)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    blue_green: BlueGreenConfig = Field(default_factory=BlueGreenConfig)


# -- control channel (sidecar/control) -----------------------------------------


class AdapterConfig(_Section):
    # Drive a model server that cannot run the client library: "vllm" (its
    # runtime LoRA API), "triton" (the Triton / KServe v2 repository gRPC API,
    # also served by MLServer), or "none" (servers connect themselves).
    kind: Literal["none", "vllm", "triton"] = "none"
    # vllm: base URL such as http://127.0.0.1:8000; triton: gRPC host:port.
    url: str = ""
    # The replica id the adapter reports in its Hello.
    server_id: str = "adapter"
    # Triton repository to load from ("" = any).
    repository_name: str = ""
    # Seconds one admin call (load, unload, list) may take. Big models load
    # slowly; a short limit fails them, a long one notices a hung server late.
    timeout_seconds: float = Field(default=120.0, gt=0)
    # How often the adapter re-reads what the server has loaded; a change it
    # did not make (the server restarted) reconnects with a fresh Hello so the
    # sidecar reconciles it. Short notices sooner; long polls the server less.
    resync_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _check_url(self) -> AdapterConfig:
        if self.kind != "none" and not self.url:
            raise ValueError(f"url is required when kind is {self.kind!r}")
        return self


class ControlConfig(_Section):
    # Seconds a new ControlService.Connect stream may take to send its Hello
    # before it is closed. Short frees a stuck stream sooner; long tolerates a
    # slow server start.
    hello_timeout_seconds: float = Field(default=10.0, gt=0)
    # A directive the server answered with ok=false is sent again after this
    # many seconds, doubling per failure up to retry_max_seconds. Short
    # retries recover fast from a transient failure; long ones spare a server
    # that keeps failing.
    retry_initial_seconds: float = Field(default=1.0, gt=0)
    retry_max_seconds: float = Field(default=60.0, gt=0)
    # Replica records (one per server_id that said Hello) kept in the store
    # and in status. When a new server_id connects at the cap, the record
    # seen longest ago among the disconnected ones is forgotten; when every
    # record is connected, the Hello is refused (RESOURCE_EXHAUSTED). More
    # keeps the history of short-lived pods longer; fewer bounds memory and
    # /api/status against clients inventing server ids.
    max_replicas: int = Field(default=64, ge=1)
    # Seconds after which a disconnected replica's record is forgotten (0:
    # only the max_replicas cap forgets). A forgotten replica that comes back
    # is reconciled from its Hello like a new one; only its counters are lost.
    replica_expiry_seconds: float = Field(default=7 * 24 * 3600.0, ge=0)
    # Loaded versions one Hello may report; a Hello with more is refused
    # (INVALID_ARGUMENT). Raise it for servers that keep many adapters
    # loaded; each version costs up to 128 bytes per replica in memory,
    # store and status.
    max_loaded_versions: int = Field(default=64, ge=1)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)


GatewayBackend = Literal["openai", "vllm", "sglang", "lorax", "llama-router", "llama-lora"]


class GatewayConfig(_Section):
    """``atlas-sidecar gateway``: an OpenAI-compatible proxy in front of a model server."""

    # The model server's base URL (no /v1), e.g. http://127.0.0.1:8000.
    upstream: str = ""
    # Where the gateway serves the OpenAI API and /v1/feedback.
    listen: str = "127.0.0.1:8080"
    # The sidecar daemon's gRPC address (events, the control stream).
    sidecar: str = "127.0.0.1:50051"
    # What the upstream is: how a version is put in the request body and how
    # versions are loaded. openai: model = version, nothing loaded; vllm,
    # lorax, llama-router: model = version; sglang: model = base:version;
    # llama-lora: llama-server single mode, an explicit lora list.
    backend: GatewayBackend = "openai"
    # The replica id the gateway says Hello with (one per gateway process).
    server_id: str = "gateway"
    # A file holding the gateway's token for the sidecar (a mounted Secret);
    # "": ATLAS_SIDECAR_TOKEN, else none.
    token_file: Path | None = None
    # PEM CA of the sidecar's TLS certificate; "": plaintext (loopback).
    sidecar_ca_file: Path | None = None
    # sglang: the base model name (requests say base:adapter); llama-lora:
    # unused. The version that needs no adapter is called this too.
    base_model: str = ""
    # The API key the upstream wants for its admin routes (vLLM --api-key).
    upstream_api_key: str = ""
    # Versions the upstream serves at start, when it cannot be asked
    # (llama-lora: the --lora adapters in order, their names; openai: the models).
    versions: list[str] = Field(default_factory=list)
    # llama-router: the presets INI the gateway appends a section to per new
    # version (the file llama-server was started with --models-preset).
    presets_file: Path | None = None
    # A header whose value keeps a caller on one version when it sends no
    # x-session-id and no body "user" ("" = none).
    sticky_header: str = ""
    # Largest request body accepted (bytes); more answers 413.
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # Seconds the upstream may take to send its response headers.
    response_timeout_seconds: float = Field(default=300.0, gt=0)
    # Seconds a streamed answer may go without a chunk before it is cut (502
    # for the client if nothing was sent yet). Longer tolerates slow
    # prefill; shorter frees a stalled stream sooner.
    chunk_idle_seconds: float = Field(default=60.0, gt=0)
    # Token log-probabilities in the recorded answer: "requested" (when the
    # caller asked), "always" (asks the upstream for them: slower answers,
    # better uncertainty for active learning), "never".
    logprobs: Literal["requested", "always", "never"] = "requested"
    # Shadow answers at once (after the primary answered). Past it a mirror
    # is dropped and counted, never queued: the live traffic comes first.
    max_concurrent_mirrors: int = Field(default=2, ge=0)
    # The same session sending the same prompt again within this many
    # seconds is a retry: the new request gets retry_of, the old one a RETRY
    # feedback. 0 turns it off.
    retry_window_seconds: float = Field(default=120.0, ge=0)
    # Sessions remembered for retry detection (oldest forgotten first).
    retry_tracked_sessions: int = Field(default=100_000, ge=1)
    # Origins allowed to POST /v1/feedback from a browser (CORS). [] = none.
    feedback_cors_origins: list[str] = Field(default_factory=list)

    @field_validator("token_file", "sidecar_ca_file", "presets_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value


class AdminConfig(_Section):
    # Longest free text AdminService accepts; a longer one answers
    # INVALID_ARGUMENT naming the field. Reasons (StartRollout, Promote,
    # Abort, Rollback, TriggerLearning) are stored with every transition and
    # history entry: longer lets an operator say more, and costs store and
    # report size.
    max_reason_bytes: int = Field(default=1024, ge=16)
    # A candidate's artifact_uri, sent to every server in LoadModel.
    max_artifact_uri_bytes: int = Field(default=4096, ge=64)
    # Metrics per candidate, and the length of each metric's name.
    max_metrics: int = Field(default=64, ge=0)
    max_metric_name_bytes: int = Field(default=128, ge=8)


class SidecarConfig(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    scoring: ScoringConfig = Field(default_factory=ScoringConfig)
    learning: LearningConfig = Field(default_factory=LearningConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    selective: SelectiveConfig = Field(default_factory=SelectiveConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig)
    active_learning: ActiveLearningConfig = Field(default_factory=ActiveLearningConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if len(path) < 2:
            raise ConfigError(f"{name}: expected {ENV_PREFIX}SECTION__KEY")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _format_error(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        lines.append(f"{key}: {err['msg']}")
    return f"invalid configuration ({origin}):\n  " + "\n  ".join(lines)


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> SidecarConfig:
    """Builds the configuration: defaults < file < environment < overrides.

    Raises:
        ConfigError: the file cannot be read or parsed, or a key is unknown or
            invalid; the message names every bad key.
    """
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        origin = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    env = _env_overrides(os.environ if environ is None else environ)
    if env:
        origin += " + environment"
    data = _deep_merge(data, env)
    if overrides:
        data = _deep_merge(data, overrides)
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, origin)) from exc
