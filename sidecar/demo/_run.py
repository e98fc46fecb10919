"""``atlas-sidecar demo``: the whole loop on one machine, improving a real (small) model.

Three real processes on loopback:

1. the sidecar (``atlas-sidecar serve``) with the demo trainer as its
   ``command`` hook and timings short enough for a few minutes;
2. the reference inference server (``python -m sidecar.demo.server``), built
   on the public client library only, serving the numpy policy;
3. the simulated users (``python -m sidecar.demo.population``).

The demo watches the sidecar over its admin API and the server over its
state endpoint, shows a live view, and stops once enough updates have been
promoted and the deliberately bad candidate has been rolled back. Then it
stops everything, reads the learning history from the data dir and writes
the report (``report.md``, ``report.json``, ``satisfaction.png``). The data
dir stays for ``atlas-sidecar status`` and ``atlas-sidecar export``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from atlas_sidecar_client import TOKEN_ENV, ChannelSecurity

from sidecar._private import open_private
from sidecar.demo._report import VersionSummary, build_report, read_user_stats, write_report
from sidecar.rollout import state_name
from sidecar.testing import DaemonProcess, ReadyProcess

__all__ = ["DemoSettings", "run_demo"]

_MARKER = "atlas-demo.json"
_TERMINAL = {"PROMOTED", "ROLLED_BACK", "ABORTED"}


@dataclass(frozen=True)
class DemoSettings:
    """What a demo run does. The defaults are ``make demo``'s."""

    data_dir: Path = Path("./var/demo")
    #: Questions per second from the simulated users (retries come on top).
    rate: float = 60.0
    seed: int = 11
    #: Stop once this many candidates were promoted and the sabotaged one rolled back
    #: (and the stable version is as good as ``min_final_satisfaction`` asks).
    promotions: int = 3
    #: The stable version must reach this expected satisfaction, and the initial
    #: one's plus ``min_gain``, before the demo stops; more updates run until it does.
    #: Its live satisfaction, measured over ``settle_s``, must too: the expected
    #: figure has to clear the bar by that measurement's sampling error.
    min_final_satisfaction: float = 0.8
    min_gain: float = 0.3
    #: Which training run is sabotaged on purpose (1 = the first).
    sabotage_run: int = 3
    #: Give up (and report what is missing) after this many seconds.
    deadline_s: float = 170.0
    #: After the goal is reached, keep serving this long to measure the final
    #: stable version on (nearly) all traffic.
    settle_s: float = 15.0
    #: Redraw a live view; None: only when stdout is a terminal.
    live: bool | None = None
    #: New qualifying samples that trigger an update.
    sample_count: int = 150
    #: Overrides merged into the sidecar's config, section by section.
    config_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def _known(model: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    fields = getattr(model, "model_fields", None)
    if fields is None:
        return dict(values)
    out: dict[str, Any] = {}
    for key, value in values.items():
        info = fields.get(key)
        if info is None:
            continue
        if isinstance(value, Mapping) and hasattr(info.annotation, "model_fields"):
            out[key] = _known(info.annotation, value)
        else:
            out[key] = value
    return out


def _filter_known(section: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Keeps the keys the installed sidecar knows, so the demo runs on any build."""
    from sidecar.config import SidecarConfig

    info = SidecarConfig.model_fields.get(section)
    if info is None or info.annotation is None:
        return {}
    return _known(info.annotation, values)


def sidecar_config(settings: DemoSettings, models_dir: Path) -> dict[str, Any]:
    """The sidecar's config for the demo: the demo trainer, fast timings."""
    trainer = [
        sys.executable,
        "-m",
        "sidecar.demo.trainer",
        "--dataset-dir",
        "{dataset_dir}",
        "--output-dir",
        "{output_dir}",
        "--base-version",
        "{base_version}",
        "--models-dir",
        str(models_dir.resolve()),
        "--sabotage-run",
        str(settings.sabotage_run),
    ]
    wanted: dict[str, dict[str, Any]] = {
        "store": {"commit_window_ms": 2.0},
        "training": {
            "hook": "command",
            "command": trainer,
            "base_version": "v1",
            "timeout_seconds": 60.0,
        },
        "learning": {
            "sample_count": settings.sample_count,
            "min_interval_seconds": 2.0,
            "evaluate_interval_seconds": 0.5,
            "failure_backoff_seconds": 2.0,
            # The demo shows count-triggered updates; the drop and error
            # triggers stay on with the seed's thresholds.
            "baseline_samples": 200,
            "recent_samples": 200,
        },
        # Users react within a second; three seconds of silence is "no feedback".
        "scoring": {"reward_window_seconds": 3.0},
        # Rollouts start by themselves and move in seconds, not minutes.
        "rollout": {
            "auto_start": True,
            "evaluate_interval_seconds": 0.5,
            "checkpoint_interval_seconds": 2.0,
            "unload_after_seconds": 5.0,
            "regression_pool": 200,
            "initial_stable_version": "v1",
            # Latency gates a little wider than the defaults: two cores shared by
            # three processes make millisecond timings jumpy.
            "validation": {"prompts": 40, "deadline_seconds": 20.0, "max_latency_ratio": 2.0},
            # A fine-tune is meant to change answers: agreement with the old
            # model is a weak gate here.
            "shadow": {
                "mirror_bps": 2000,
                "min_dwell_seconds": 3.0,
                "max_dwell_seconds": 30.0,
                "min_samples": 60,
                "min_agreement": 0.1,
                "max_latency_p99_ratio": 2.0,
            },
            # Promotion asks for evidence that the candidate is no worse, at
            # every stage: a few dozen rewards per stage cannot show harm, so
            # "no harm seen" would let a regression through, and a worse
            # candidate must not get past 10 %. The margin is wider than the
            # default 0.05 because the demo has seconds, not hours, of feedback:
            # 0.1 is what about 20 s at 10 % of 60 questions/s can show for a
            # candidate as good as stable (a better one shows it sooner), and it
            # still stops the regressions that matter here (0.15 and more).
            "canary": {
                "stages_percent": [10, 50, 100],
                "min_dwell_seconds": 3.0,
                "min_samples": 40,
                "max_dwell_seconds": 40.0,
                "non_inferiority_margin": 0.1,
                "non_inferiority_every_stage": True,
            },
        },
        "memory": {},
    }
    for section, values in settings.config_overrides.items():
        wanted.setdefault(section, {}).update(values)
    out: dict[str, Any] = {}
    for section, values in wanted.items():
        kept = _filter_known(section, values)
        if kept:
            out[section] = kept
    return out


@dataclass
class _Observed:
    """What the monitor has seen so far."""

    details: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    rollouts: list[dict[str, Any]] = field(default_factory=list)
    server: dict[str, Any] = field(default_factory=dict)
    max_weight_bps: dict[str, int] = field(default_factory=dict)
    feed: list[tuple[float, str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    sabotaged: set[str] = field(default_factory=set)


class _Monitor:
    """Polls the sidecar's admin API, the server's state and the users' stats."""

    def __init__(
        self, target: str, token: str, server_url: str, stats: Path, models_dir: Path
    ) -> None:
        import grpc
        from atlas_sidecar_client import open_channel
        from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

        self._pb = admin_pb2
        self._channel = open_channel(target, ChannelSecurity(token=token))
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._grpc_error = grpc.RpcError
        self.server_url = server_url
        self.stats_path = stats
        self.models_dir = models_dir
        self.obs = _Observed()
        self.started = time.time()
        self._stats_offset = 0
        self.user_lines: list[dict[str, Any]] = []

    def close(self) -> None:
        self._channel.close()

    def note(self, key: str, text: str) -> None:
        self._note(key, text)

    def _note(self, key: str, text: str) -> None:
        if key not in self.obs.seen:
            self.obs.seen.add(key)
            self.obs.feed.append((time.time() - self.started, text))

    def poll(self) -> None:
        obs = self.obs
        try:
            st = self._admin.GetStatus(self._pb.GetStatusRequest(), timeout=3)
            obs.details = json.loads(st.details_json or "{}")
            obs.status = {
                "accepted": st.events.accepted,
                "rejected": st.events.rejected,
                "servers": st.connected_servers,
            }
        except self._grpc_error:
            pass
        with contextlib.suppress(self._grpc_error, AttributeError):
            resp = self._admin.ListRollouts(self._pb.ListRolloutsRequest(limit=50), timeout=3)
            obs.rollouts = [_rollout_dict(r) for r in resp.rollouts]
        with (
            contextlib.suppress(OSError, ValueError),
            urllib.request.urlopen(self.server_url + "/v1/state", timeout=3) as page,
        ):
            obs.server = json.loads(page.read())
        self._read_stats()
        self._track()

    def _read_stats(self) -> None:
        if not self.stats_path.exists():
            return
        with open(self.stats_path) as fh:
            fh.seek(self._stats_offset)
            chunk = fh.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self._stats_offset += len(complete.encode())
        for line in complete.splitlines():
            with contextlib.suppress(ValueError):
                self.user_lines.append(json.loads(line))

    def _track(self) -> None:
        obs = self.obs
        for meta in self.models_dir.glob("v*/policy.json"):
            v = meta.parent.name
            if v in obs.seen or f"model/{v}" in obs.seen:
                continue
            with contextlib.suppress(OSError, ValueError):
                doc = json.loads(meta.read_text())
                obs.seen.add(f"model/{v}")
                if doc.get("sabotaged"):
                    obs.sabotaged.add(v)
                if doc.get("trained_on") == "dataset":
                    self._note(
                        f"trained/{v}",
                        f"trainer wrote {v} from {doc.get('base_version')}"
                        + (" (sabotaged on purpose)" if doc.get("sabotaged") else ""),
                    )
        learning = obs.details.get("learning", {})
        for d in reversed(learning.get("last_decisions", []) or []):
            if d.get("kind") == "trigger" and d.get("update_id"):
                self._note(
                    f"trigger/{d['update_id']}",
                    f"trigger {d.get('trigger')}: {d.get('reason')} -> {d['update_id']}",
                )
        for r in obs.rollouts:
            cand = r["candidate_version"]
            obs.max_weight_bps[cand] = max(
                obs.max_weight_bps.get(cand, 0), int(r["candidate_weight_bps"])
            )
            for i, t in enumerate(r["transitions"]):
                self._note(
                    f"rollout/{r['rollout_id']}/{i}",
                    f"rollout {cand}: {t['from']} -> {t['to']}"
                    + (f" (stage {t['stage']})" if t["to"] == "CANARY" else "")
                    + (f": {t['reason'][:90]}" if t["reason"] else ""),
                )
        applied = [obs.server.get("split") or {}, *(obs.server.get("splits") or [])]
        for split in applied:
            for version, bps in split.get("routes", []):
                obs.max_weight_bps[version] = max(obs.max_weight_bps.get(version, 0), int(bps))

    # -- what the demo waits for --------------------------------------------

    def promoted(self) -> list[str]:
        """Good candidates promoted so far, oldest first."""
        done = [
            r
            for r in self.obs.rollouts
            if r["state"] == "PROMOTED" and r["candidate_version"] not in self.obs.sabotaged
        ]
        return [r["candidate_version"] for r in sorted(done, key=lambda r: r["updated"])]

    def sabotage_rolled_back(self) -> bool:
        return any(
            r["state"] in ("ROLLED_BACK", "ABORTED")
            and r["candidate_version"] in self.obs.sabotaged
            for r in self.obs.rollouts
        )

    def sabotage_promoted(self) -> bool:
        return any(
            r["state"] == "PROMOTED" and r["candidate_version"] in self.obs.sabotaged
            for r in self.obs.rollouts
        )

    def recent_satisfaction(self, seconds: float = 10.0) -> dict[str, tuple[float, int]]:
        now = time.time()
        acc: dict[str, list[int]] = {}
        for line in self.user_lines:
            if float(line["t"]) < now - seconds:
                continue
            for v, (n, s) in line.get("versions", {}).items():
                a = acc.setdefault(v, [0, 0])
                a[0] += n
                a[1] += s
        return {v: (s / n, n) for v, (n, s) in acc.items() if n}


class _Quality:
    """The exact expected satisfaction of a version (``World.expected_satisfaction``)."""

    def __init__(self, models_dir: Path, settings: DemoSettings) -> None:
        self.models_dir = models_dir
        self._cache: dict[str, float] = {}
        bar = max(settings.min_final_satisfaction, self.expected("v1") + settings.min_gain)
        # The demo promises the bar for what users feel too: the share of the
        # final version's answers that satisfied them while it served (during
        # the settle time), a sample of a few hundred answers whose mean is the
        # expected satisfaction. A version just over the bar would miss it
        # live about half the time, so the expected figure must clear it by
        # that sample's error: three standard errors, counting on half the
        # settle time's questions (the next candidate may take a share). At
        # most 0.9 in all, which the demo's learner reaches in a few updates.
        n = settings.rate * settings.settle_s / 2.0
        margin = 3.0 * math.sqrt(bar * (1.0 - bar) / n) if n > 0 and bar < 1.0 else 0.0
        self.target = max(bar, min(bar + margin, 0.9))

    def expected(self, version: str) -> float:
        if version not in self._cache:
            from sidecar.demo._policy import Policy
            from sidecar.demo._world import World

            try:
                policy = Policy.load(self.models_dir / version)
            except (OSError, ValueError):
                return 0.0
            self._cache[version] = World().expected_satisfaction(policy)
        return self._cache[version]

    def good_enough(self, version: str) -> bool:
        return self.expected(version) >= self.target


def _rollout_dict(r: Any) -> dict[str, Any]:
    return {
        "rollout_id": r.rollout_id,
        "candidate_version": r.candidate_version,
        "stable_version": r.stable_version,
        "state": state_name(int(r.state)),
        "stage_index": int(r.stage_index),
        "candidate_weight_bps": int(r.candidate_weight_bps),
        "updated": r.updated_at.ToNanoseconds() / 1e9,
        "transitions": [
            {
                "from": state_name(int(t.from_state)),
                "to": state_name(int(t.to_state)),
                "stage": int(t.stage_index),
                "reason": t.reason,
            }
            for t in r.transitions
        ],
    }


class _View:
    """The live terminal view (redrawn in place on a terminal, a line per 5 s otherwise)."""

    def __init__(self, live: bool, dashboard: str, promotions: int) -> None:
        self.live = live
        self.dashboard = dashboard
        self.promotions = promotions
        self._last_plain = 0.0
        self._last_feed = 0

    def render(self, mon: _Monitor, elapsed: float) -> None:
        obs = mon.obs
        learning = obs.details.get("learning", {})
        sat = mon.recent_satisfaction()
        active = [r for r in obs.rollouts if r["state"] not in _TERMINAL]
        if active:
            r = active[0]
            rollout = (
                f"{r['candidate_version']} {r['state']}"
                + (f" stage {r['stage_index']}" if r["state"] == "CANARY" else "")
                + f" ({r['candidate_weight_bps'] / 100:g}% of traffic) vs stable {r['stable_version']}"
            )
        else:
            rollout = "none active"
        split = obs.server.get("split") or {}
        routes = " | ".join(f"{v} {bps / 100:g}%" for v, bps in split.get("routes", []))
        shadow = split.get("shadow") or ["", 0]
        if shadow[0] and shadow[1]:
            routes += f"   shadow {shadow[0]} {shadow[1] / 100:g}%"
        sat_text = "  ".join(
            f"{v} {s:.2f} (n={n})" for v, (s, n) in sorted(sat.items(), key=lambda kv: kv[0])
        )
        promoted = mon.promoted()
        if self.live:
            lines = [
                f"atlas-sidecar demo   {elapsed:5.0f} s   dashboard: {self.dashboard}",
                "",
                f"events      {obs.status.get('accepted', 0):,} accepted, "
                f"{obs.status.get('rejected', 0)} rejected; samples "
                f"{learning.get('samples', 0):,} (sft {learning.get('sft_samples', 0):,}, "
                f"pairs {learning.get('pairs', 0):,}), pending {learning.get('pending_samples', 0):,}",
                f"learning    stable {learning.get('stable_version', '?')}; last update "
                f"{learning.get('last_update_id') or '-'} ({learning.get('last_outcome') or '-'})"
                + (f"; training {learning['in_flight']}" if learning.get("in_flight") else ""),
                f"rollout     {rollout}",
                f"traffic     {routes or '-'}",
                f"satisfied   {sat_text or '-'}   (last 10 s)",
                f"progress    promoted {len(promoted)}/{self.promotions} "
                f"({', '.join(promoted) or '-'}); sabotaged candidate rolled back: "
                f"{'yes' if mon.sabotage_rolled_back() else 'not yet'}",
                "",
                "recent steps:",
                *[f"  {t:6.1f}s  {text}" for t, text in obs.feed[-12:]],
            ]
            sys.stdout.write("\x1b[H\x1b[J" + "\n".join(lines) + "\n")
            sys.stdout.flush()
            return
        for t, text in obs.feed[self._last_feed :]:
            print(f"  {t:6.1f}s  {text}", flush=True)
        self._last_feed = len(obs.feed)
        if elapsed - self._last_plain >= 10:
            self._last_plain = elapsed
            print(
                f"[{elapsed:5.0f}s] events {obs.status.get('accepted', 0):,}  "
                f"stable {learning.get('stable_version', '?')}  rollout {rollout}  "
                f"satisfied {sat_text or '-'}",
                flush=True,
            )


def _prepare(root: Path) -> None:
    if root.exists() and any(root.iterdir()):
        if not (root / _MARKER).exists():
            raise SystemExit(
                f"atlas-sidecar demo: {root} exists and is not a demo data dir; "
                "choose another --data-dir"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / _MARKER).write_text(json.dumps({"created": time.time()}))


def _read_history(data_dir: Path) -> list[dict[str, Any]]:
    from sidecar.config import StoreConfig
    from sidecar.store import Store, read_history

    store = Store(StoreConfig(data_dir=data_dir))
    store.open()
    try:
        with store.read() as txn:
            return list(read_history(txn, store))
    finally:
        store.close()


def _versions(models_dir: Path, mon: _Monitor) -> dict[str, VersionSummary]:
    from sidecar.demo._policy import Policy
    from sidecar.demo._world import World

    world = World()
    out: dict[str, VersionSummary] = {}
    outcomes = {r["candidate_version"]: r["state"] for r in reversed(mon.obs.rollouts)}
    for meta in sorted(models_dir.glob("v*/policy.json")):
        v = meta.parent.name
        try:
            policy = Policy.load(meta.parent)
        except (OSError, ValueError):
            continue
        s = VersionSummary(v, base_version=str(policy.meta.get("base_version", "")))
        s.sabotaged = bool(policy.meta.get("sabotaged"))
        s.expected_satisfaction = round(world.expected_satisfaction(policy), 4)
        s.outcome = "initial" if v == "v1" else outcomes.get(v, "not rolled out").lower()
        s.max_traffic_pct = mon.obs.max_weight_bps.get(v, 0) / 100.0
        out[v] = s
    return out


def run_demo(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    settings: DemoSettings | None = None,
    out: IO[str] | None = None,
) -> int:
    """Runs the demo; returns 0 when the loop closed as promised, 1 otherwise."""
    settings = settings or DemoSettings()
    if data_dir is not None:
        settings = DemoSettings(**{**settings.__dict__, "data_dir": Path(data_dir)})
    root = settings.data_dir.resolve()
    _prepare(root)
    models_dir = root / "models"
    from sidecar.demo._world import World

    World().initial_policy("v1").save(models_dir / "v1")
    config_path = root / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(sidecar_config(settings, models_dir), sort_keys=False))
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    live = settings.live if settings.live is not None else sys.stdout.isatty()
    print(f"atlas-sidecar demo: data in {root}", flush=True)
    # Auth on, as in production: the server gets a token for ingest and its
    # control stream, the monitor (and whoever opens the dashboard) a read one.
    daemon = DaemonProcess(
        root / "sidecar", config=config_path, env=env, log_path=root / "sidecar.log", auth=True
    )
    child_env = {**env, TOKEN_ENV: daemon.tokens["inference"]}
    children: list[ReadyProcess] = []
    started = time.time()
    mon: _Monitor | None = None
    ok = False
    verdict = ""
    final_stable = "v1"
    settle_from = started
    try:
        daemon.start()
        dashboard = f"{daemon.http_url}/dashboard"
        read_token = root / "dashboard-token"
        with open_private(read_token, "w") as f:
            f.write(daemon.tokens["read"] + "\n")
        print(f"  sidecar  gRPC {daemon.target}   dashboard {dashboard}", flush=True)
        print(f"           (sign in with the read token in {read_token})", flush=True)
        server = ReadyProcess(
            "server",
            [
                sys.executable,
                "-m",
                "sidecar.demo.server",
                "--sidecar",
                daemon.target,
                "--models-dir",
                str(models_dir),
                "--initial-version",
                "v1",
                "--seed",
                str(settings.seed),
            ],
            root / "server.log",
            child_env,
        )
        children.append(server)
        port = server.start()["port"]
        server_url = f"http://127.0.0.1:{port}"
        print(f"  server   {server_url}  (reference inference server)", flush=True)
        stats = root / "users.jsonl"
        users = ReadyProcess(
            "users",
            [
                sys.executable,
                "-m",
                "sidecar.demo.population",
                "--server",
                server_url,
                "--stats",
                str(stats),
                "--rate",
                str(settings.rate),
                "--seed",
                str(settings.seed),
            ],
            root / "users.log",
            child_env,
        )
        children.append(users)
        users.start()
        print(f"  users    {settings.rate:g} questions/s, seed {settings.seed}", flush=True)
        mon = _Monitor(daemon.target, daemon.tokens["read"], server_url, stats, models_dir)
        mon.started = started
        view = _View(live, dashboard, settings.promotions)
        quality = _Quality(models_dir, settings)
        settle_until = 0.0
        while True:
            time.sleep(1.0)
            mon.poll()
            elapsed = time.time() - started
            view.render(mon, elapsed)
            if settle_until:
                if time.time() >= settle_until:
                    break
                continue
            if mon.sabotage_promoted():
                verdict = "the sabotaged candidate was promoted"
                break
            caught = mon.sabotage_rolled_back() or settings.sabotage_run <= 0
            good_enough = bool(mon.promoted()) and quality.good_enough(mon.promoted()[-1])
            if len(mon.promoted()) >= settings.promotions and caught and good_enough:
                ok = True
                verdict = f"{len(mon.promoted())} updates promoted" + (
                    " and the sabotaged candidate rolled back automatically"
                    if settings.sabotage_run > 0
                    else ""
                )
                final_stable = mon.promoted()[-1]
                settle_from = time.time()
                settle_until = settle_from + settings.settle_s
                mon.note(
                    "settle",
                    f"goal reached; measuring the stable version for {settings.settle_s:g} s",
                )
                continue
            if elapsed > settings.deadline_s:
                last = mon.promoted()[-1] if mon.promoted() else "v1"
                verdict = (
                    f"deadline of {settings.deadline_s:g} s reached with "
                    f"{len(mon.promoted())}/{settings.promotions} promotions, sabotaged "
                    f"candidate rolled back: {mon.sabotage_rolled_back()}, stable {last} "
                    f"expected satisfaction {quality.expected(last):.2f} "
                    f"(wanted {quality.target:.2f})"
                )
                break
            for child in children:
                if child.proc is None or child.proc.poll() is not None:
                    verdict = f"the {child.name} process exited early; see {child.log_path}"
                    break
            if verdict:
                break
        if not ok:
            final_stable = mon.promoted()[-1] if mon.promoted() else "v1"
            settle_from = max(started, time.time() - 20.0)
    except KeyboardInterrupt:
        verdict = "interrupted"
    finally:
        for child in reversed(children):
            child.stop()
        if mon is not None:
            mon._read_stats()
            mon.close()
        rc = daemon.stop()
        if rc != 0 and not verdict:
            verdict = f"the sidecar exited with {rc}"
    finished = time.time()
    history = _read_history(root / "sidecar")
    assert mon is not None or not ok
    versions = _versions(models_dir, mon) if mon is not None else {}
    report = build_report(
        started=started,
        finished=finished,
        history=history,
        stats=read_user_stats(root / "users.jsonl"),
        versions=versions,
        initial_version="v1",
        final_stable=final_stable,
        final_since=settle_from,
        ok=ok,
        verdict=verdict,
    )
    md, _, png = write_report(report, root)
    _print_summary(report, root, md, png)
    return 0 if ok else 1


def _print_summary(report: Any, root: Path, md: Path, png: Path | None) -> None:
    print()
    print(
        f"{'DONE' if report.ok else 'INCOMPLETE'}: {report.verdict} in "
        f"{report.finished - report.started:.0f} s"
    )
    print()
    print(
        f"{'version':<8} {'from':<6} {'outcome':<22} {'expected':>8} {'live':>6} {'answers':>8} "
        f"{'max split':>9}"
    )
    for v, s in sorted(report.versions.items(), key=lambda kv: (len(kv[0]), kv[0])):
        outcome = s.outcome + (" (sabotaged)" if s.sabotaged else "")
        exp = "-" if s.expected_satisfaction is None else f"{s.expected_satisfaction:.2f}"
        live = "-" if s.live_satisfaction is None else f"{s.live_satisfaction:.2f}"
        print(
            f"{v:<8} {s.base_version or '-':<6} {outcome:<22} {exp:>8} {live:>6} "
            f"{s.answers:>8} {s.max_traffic_pct:>8.1f}%"
        )
    print()
    print(f"report  {md}")
    print(f"chart   {png}" if png else "chart   skipped (pip install 'atlas-sidecar[demo]' for it)")
    print(f"data    {root / 'sidecar'}")
    print("look around:")
    print(f"  atlas-sidecar serve --data-dir {root / 'sidecar'} &   then: atlas-sidecar status")
    print(f"  atlas-sidecar export --data-dir {root / 'sidecar'} --kind dpo --out pairs.jsonl")
