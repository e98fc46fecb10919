"""The demo's closing report: every step of the loop, satisfaction over time, a chart.

Inputs are what the demo leaves on disk: the learning history the sidecar
stored (read from its data dir once it has stopped), the users' per-second
satisfaction (``users.jsonl``), the model artifacts and the splits the
server applied. Outputs: ``report.md`` (the tables), ``report.json`` (the
same, for tests and tools) and ``satisfaction.png``.

The chart uses matplotlib (Agg backend, no display needed): it is the
standard, well-kept way to write a PNG plot from Python; when it is not
installed the chart is skipped and the report says so.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DemoReport", "VersionSummary", "build_report", "read_user_stats", "write_report"]

#: History kinds that are steps of the loop (trigger_suppressed is counted apart).
STEP_KINDS = (
    "trigger",
    "dataset",
    "training_started",
    "training_succeeded",
    "training_failed",
    "candidate_registered",
    "rollout_started",
    "rollout_transition",
    "promoted",
    "rollback",
    "rolled_back",
    "aborted",
)


@dataclass
class VersionSummary:
    version: str
    base_version: str = ""
    outcome: str = ""
    sabotaged: bool = False
    #: Exact chance of a satisfied user over every prompt (the world knows).
    expected_satisfaction: float | None = None
    #: What users reported while this version answered them.
    answers: int = 0
    satisfied: int = 0
    #: Largest share of traffic the server was told to give this version, in %.
    max_traffic_pct: float = 0.0
    #: Largest share of answers it actually gave in any 5 s window, in %.
    max_served_pct: float = 0.0

    @property
    def live_satisfaction(self) -> float | None:
        return self.satisfied / self.answers if self.answers else None


@dataclass
class DemoReport:
    started: float
    finished: float
    ok: bool
    verdict: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    suppressed: int = 0
    versions: dict[str, VersionSummary] = field(default_factory=dict)
    #: (t, version or "all", satisfaction, answers) per window.
    series: list[tuple[float, str, float, int]] = field(default_factory=list)
    initial_version: str = ""
    final_stable: str = ""
    final_stable_live: float | None = None
    chart: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verdict": self.verdict,
            "started": self.started,
            "finished": self.finished,
            "duration_s": round(self.finished - self.started, 1),
            "initial_version": self.initial_version,
            "final_stable": self.final_stable,
            "final_stable_live_satisfaction": self.final_stable_live,
            "steps": self.steps,
            "suppressed_triggers": self.suppressed,
            "versions": {
                v: {**s.__dict__, "live_satisfaction": s.live_satisfaction}
                for v, s in self.versions.items()
            },
            "series": [list(p) for p in self.series],
            "chart": self.chart,
        }


def read_user_stats(path: Path) -> list[dict[str, Any]]:
    """The population's per-second lines (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def windows(
    stats: Sequence[Mapping[str, Any]], seconds: float = 5.0
) -> list[tuple[float, dict[str, list[int]]]]:
    """Groups per-second lines into windows: (window end time, version -> [answers, satisfied])."""
    out: list[tuple[float, dict[str, list[int]]]] = []
    if not stats:
        return out
    start = float(stats[0]["t"])
    current: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    edge = start + seconds
    for line in stats:
        t = float(line["t"])
        while t > edge:
            out.append((edge, dict(current)))
            current = defaultdict(lambda: [0, 0])
            edge += seconds
        for v, (n, s) in line.get("versions", {}).items():
            current[v][0] += int(n)
            current[v][1] += int(s)
    out.append((edge, dict(current)))
    return out


def _describe(doc: Mapping[str, Any]) -> str:
    kind = doc.get("kind", "")
    parts = []
    for key in ("trigger", "update_id", "base_version"):
        if doc.get(key):
            parts.append(f"{key}={doc[key]}")
    src = doc.get("from", doc.get("from_state"))
    dst = doc.get("to", doc.get("to_state"))
    if src is not None or dst is not None:
        parts.append(f"{src or '-'} -> {dst or '-'}")
        if dst == "CANARY" and isinstance(doc.get("stage_index"), int):
            parts.append(f"(stage {doc['stage_index']})")
    if kind == "rollout_transition":
        for key in ("weight_bps", "candidate_weight_bps"):
            if isinstance(doc.get(key), int | float):
                parts.append(f"candidate at {doc[key] / 100:g}% of traffic")
                break
    if kind == "dataset" and isinstance(doc.get("counts"), Mapping):
        c = doc["counts"]
        parts.append(f"sft {c.get('sft', 0)} pairs {c.get('dpo', 0)} kto {c.get('kto', 0)}")
    if isinstance(doc.get("candidate_score"), int | float) and isinstance(
        doc.get("stable_score"), int | float
    ):
        parts.append(
            f"feedback score {doc['candidate_score']:.3f} vs stable {doc['stable_score']:.3f}"
        )
    if doc.get("reason"):
        parts.append(str(doc["reason"])[:140])
    return " ".join(parts)


def build_report(
    *,
    started: float,
    finished: float,
    history: Iterable[Mapping[str, Any]],
    stats: Sequence[Mapping[str, Any]],
    versions: Mapping[str, VersionSummary],
    initial_version: str,
    final_stable: str,
    final_since: float | None = None,
    ok: bool,
    verdict: str,
) -> DemoReport:
    """Assembles the report. The final stable version's live satisfaction counts
    its answers from ``final_since`` (default: the last 20 s) to the end."""
    report = DemoReport(started, finished, ok, verdict, initial_version=initial_version)
    report.versions = dict(versions)
    report.final_stable = final_stable
    for doc in history:
        kind = str(doc.get("kind", ""))
        if kind == "trigger_suppressed":
            report.suppressed += 1
            continue
        t = float(doc.get("time_ms", 0)) / 1000.0
        report.steps.append(
            {
                "t": round(t - started, 2),
                "kind": kind,
                "version": doc.get("version")
                or doc.get("candidate")
                or doc.get("candidate_version")
                or "",
                "detail": _describe(doc),
            }
        )
    report.steps.sort(key=lambda s: s["t"])
    for end, by_version in windows(stats):
        total = [sum(c[0] for c in by_version.values()), sum(c[1] for c in by_version.values())]
        if total[0]:
            report.series.append((round(end - started, 2), "all", total[1] / total[0], total[0]))
        for v, (n, s) in sorted(by_version.items()):
            if n:
                report.series.append((round(end - started, 2), v, s / n, n))
            summary = report.versions.setdefault(v, VersionSummary(v))
            if total[0] >= 20:
                summary.max_served_pct = max(summary.max_served_pct, 100.0 * n / total[0])
    for line in stats:
        for v, (n, s) in line.get("versions", {}).items():
            summary = report.versions.setdefault(v, VersionSummary(v))
            summary.answers += int(n)
            summary.satisfied += int(s)
    since = finished - 20.0 if final_since is None else final_since
    tail = [line for line in stats if float(line["t"]) > since]
    n = sum(int(line.get("versions", {}).get(final_stable, [0, 0])[0]) for line in tail)
    s = sum(int(line.get("versions", {}).get(final_stable, [0, 0])[1]) for line in tail)
    report.final_stable_live = s / n if n else None
    return report


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def render_tables(report: DemoReport) -> str:
    lines = [
        "# atlas-sidecar demo report",
        "",
        f"Result: **{'OK' if report.ok else 'INCOMPLETE'}**: {report.verdict}",
        f"Duration: {report.finished - report.started:.0f} s. Initial version "
        f"{report.initial_version}, final stable version {report.final_stable} "
        f"(live satisfaction once it served all users: {_fmt(report.final_stable_live)}).",
        "",
        "## Versions",
        "",
        "| version | from | outcome | expected satisfaction | live satisfaction | answers "
        "| max traffic (split) | max served (5 s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, s in sorted(report.versions.items(), key=lambda kv: _version_key(kv[0])):
        outcome = s.outcome + (" (sabotaged)" if s.sabotaged else "")
        lines.append(
            f"| {v} | {s.base_version or '-'} | {outcome or '-'} | "
            f"{_fmt(s.expected_satisfaction)} | {_fmt(s.live_satisfaction)} | {s.answers} | "
            f"{s.max_traffic_pct:.1f}% | {s.max_served_pct:.1f}% |"
        )
    lines += [
        "",
        "## Every step",
        "",
        f"({report.suppressed} trigger evaluations were suppressed, for example while a "
        "rollout was active; they are in the sidecar's history.)",
        "",
        "| t (s) | step | version | detail |",
        "|---|---|---|---|",
    ]
    for step in report.steps:
        detail = str(step["detail"]).replace("|", "/")
        lines.append(f"| {step['t']:.1f} | {step['kind']} | {step['version']} | {detail} |")
    if report.chart:
        lines += ["", f"![satisfaction over time]({Path(report.chart).name})", ""]
    return "\n".join(lines) + "\n"


def _version_key(v: str) -> tuple[int, str]:
    return (int(v[1:]), v) if v[1:].isdigit() else (1 << 30, v)


def write_chart(report: DemoReport, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=100)
    by_version: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for t, v, sat, n in report.series:
        if v == "all" or n >= 5:
            by_version[v].append((t, sat))
    for v in sorted((v for v in by_version if v != "all"), key=_version_key):
        pts = by_version[v]
        s = report.versions.get(v)
        label = f"{v}" + (" (sabotaged)" if s and s.sabotaged else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", lw=1, alpha=0.8, label=label)
    if by_version.get("all"):
        pts = by_version["all"]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", lw=2.5, label="all users")
    seen: set[str] = set()
    for step in report.steps:
        kind = step["kind"]
        style = {
            "promoted": ("tab:green", "-", "promoted"),
            "rollback": ("tab:red", "-", "rolled back"),
            "rolled_back": ("tab:red", "-", "rolled back"),
            "trigger": ("tab:gray", ":", "learning triggered"),
            "candidate_registered": ("tab:blue", "--", "candidate"),
        }.get(kind)
        if style is None:
            continue
        color, ls, name = style
        ax.axvline(step["t"], color=color, ls=ls, lw=1.2, label=None if name in seen else name)
        seen.add(name)
        if kind in ("promoted", "rollback", "rolled_back"):
            ax.annotate(
                f"{name} {step['version']}",
                (step["t"], 0.02),
                rotation=90,
                fontsize=8,
                color=color,
                xytext=(3, 0),
                textcoords="offset points",
                va="bottom",
            )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("satisfied users (5 s windows)")
    ax.set_title("atlas-sidecar demo: user satisfaction per model version")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(report: DemoReport, folder: Path) -> tuple[Path, Path, Path | None]:
    """Writes report.md, report.json and satisfaction.png; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    png: Path | None = folder / "satisfaction.png"
    assert png is not None
    if write_chart(report, png):
        report.chart = str(png)
    else:
        png = None
    md = folder / "report.md"
    md.write_text(render_tables(report))
    js = folder / "report.json"
    js.write_text(json.dumps(report.as_dict(), indent=1, default=str))
    return md, js, png
