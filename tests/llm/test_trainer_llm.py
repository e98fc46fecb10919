"""A real training run: daemon snapshot -> ``atlas-sidecar train`` (TRL) -> llama-server.

An in-process daemon with the ``command`` hook pointing at the trainer in its venv
takes answers and corrections that all say one checkable thing (users rewrite every
answer to start with "Summary:"), exports the snapshot and runs the trainer on the
real SmolLM2-135M. The GGUF adapter it writes is loaded by llama-server (router mode)
through the gateway's llama-router adapter and must make answers to prompts it never
saw start with "Summary" far more often than the base model does. Then the trainer's
failures (no pairs, a run stopped by SIGTERM, a damaged snapshot) must be recorded by
the daemon as failed runs with the trainer's reason, and leave no candidate behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from atlas_sidecar_client import EventStream
from atlas_sidecar_client.pb import events_pb2

from sidecar.app import SidecarApp
from sidecar.config import GatewayConfig
from sidecar.control._plane import DesiredState, RouteSpec
from sidecar.gateway import Gateway
from sidecar.store import read_history
from sidecar.testing import LlamaServerProcess, free_port
from tests._helpers import MANUAL_LEARNING, wait_until
from tests.conftest import make_config, target_of

TOPICS = [
    "the moon", "volcanoes", "honey bees", "the printing press", "glaciers", "tea",
    "the violin", "lightning", "coral reefs", "bicycles", "the Roman Empire", "penguins",
    "chess", "rainbows", "the heart", "deserts", "electric cars", "bread", "owls",
    "the internet", "earthquakes", "jazz", "maple trees", "the Nile", "comets",
    "photosynthesis", "sharks", "origami", "the telescope", "coffee", "tornadoes",
    "dolphins", "pyramids", "snowflakes", "the piano", "rice", "wolves", "clouds",
    "the alphabet", "magnets",
]  # fmt: skip
#: Never in the training data: what the adapter must generalise to.
UNSEEN = [
    "rivers", "the sun", "elephants", "paper", "trains", "mushrooms",
    "the ocean", "castles", "butterflies", "music", "mountains", "cheese",
]  # fmt: skip
STEPS = 12


def answer(topic: str) -> str:
    return f"{topic[0].upper()}{topic[1:]} is a fascinating subject with a long history."


async def send_traffic(app: SidecarApp, *, corrections: bool) -> None:
    """One answer per topic; with ``corrections`` each user rewrites it to start with
    "Summary:" (an edit pair), and every third topic also gets a "Summary:" answer
    rated 1.0 (an SFT row). Without, the answers are only rated."""
    stream = EventStream(target_of(app))
    try:
        for i, topic in enumerate(TOPICS):
            rid = f"r{i}"
            prompt = f"Tell me about {topic}."
            stream.record_inference(rid, "base", prompt=prompt, response=answer(topic))
            if corrections:
                stream.record_feedback(
                    rid, signal=events_pb2.EDIT, correction=f"Summary: {answer(topic)}"
                )
            else:
                stream.record_feedback(rid, rating=0.9 if i % 2 else 0.1)
            if corrections and i % 3 == 0:
                good = f"g{i}"
                stream.record_inference(
                    good, "base", prompt=f"Describe {topic}.", response=f"Summary: {answer(topic)}"
                )
                stream.record_feedback(good, rating=1.0)
        assert await stream.aflush(30)
    finally:
        await stream.aclose()


def trainer_command(trainer_bin: Path, models: Path, *extra: str) -> list[str]:
    settings = models.parent / "trainer.yaml"
    # A higher rate than the default: a few steps must move a 135M model visibly.
    settings.write_text(f"models_dir: {models}\nlearning_rate: 0.002\nsteps: {STEPS}\n")
    return [
        str(trainer_bin),
        "train",
        "--data",
        "{dataset_dir}",
        "--out",
        "{output_dir}",
        "--base",
        "{base_version}",
        "--config",
        str(settings),
        *extra,
    ]


def config(tmp_path: Path, command: list[str]) -> Any:
    return make_config(
        tmp_path / "data",
        **MANUAL_LEARNING,
        training={
            "hook": "command",
            "command": command,
            "base_version": "base",
            "timeout_seconds": 900,
        },
        control={"retry_initial_seconds": 0.05, "retry_max_seconds": 0.2},
    )


def history(app: SidecarApp, kind: str) -> list[dict[str, Any]]:
    with app.store.read() as txn:
        return list(read_history(txn, app.store, kinds=frozenset({kind})))


async def run_update(app: SidecarApp, *, timeout: float = 600) -> dict[str, Any]:
    """Triggers one update and waits until the daemon has recorded how it ended."""
    await wait_until(lambda: app.training.status()["pending_samples"] > 0, what="samples")
    decision = await app.training.evaluate_once(manual_reason="test")
    assert decision is not None and decision.fired, decision
    await wait_until(
        lambda: any(
            h.get("update_id") == decision.update_id
            for kind in ("training_succeeded", "training_failed")
            for h in history(app, kind)
        ),
        timeout=timeout,
        what=f"the end of {decision.update_id}",
    )
    outcome = await app.training.wait_update()
    assert outcome is not None
    return {"update_id": decision.update_id, "ok": outcome.ok, "reason": outcome.reason}


async def share_starting_with(gw: Gateway, prefix: str) -> tuple[float, list[str]]:
    url = f"http://127.0.0.1:{gw.port}/v1/chat/completions"
    answers = []
    async with aiohttp.ClientSession() as http:
        for topic in UNSEEN:
            body = {
                "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                "max_tokens": 6,
                "temperature": 0,
            }
            async with http.post(url, json=body) as r:
                assert r.status == 200, await r.text()
                answers.append((await r.json())["choices"][0]["message"]["content"])
    return sum(a.strip().startswith(prefix) for a in answers) / len(answers), answers


async def test_a_daemon_snapshot_trains_an_adapter_llama_server_serves_in_its_direction(
    tmp_path: Path,
    trainer_bin: Path,
    models_dir: Path,
    llama_binary: Path,
    base_model: Path,
) -> None:
    app = SidecarApp(config(tmp_path, trainer_command(trainer_bin, models_dir)))
    server = LlamaServerProcess.router(
        tmp_path / "llama", {"base": None}, base=base_model, binary=llama_binary, models_max=3
    )
    gw: Gateway | None = None
    await app.start()
    try:
        await send_traffic(app, corrections=True)
        result = await run_update(app)
        log = Path(app.config.store.data_dir) / "training" / result["update_id"] / "trainer.log"
        assert result["ok"], f"{result['reason']}\n{log.read_text()[-3000:]}"
        trainer_log = log.read_text()
        assert f"step {STEPS}/{STEPS} loss" in trainer_log and "left" in trainer_log
        (record,) = app.registry.list()
        assert record.base_version == "base"
        m = record.metrics
        assert m["method_dpo"] == 1.0 and m["steps"] == STEPS
        assert m["train_pairs"] >= 8 and m["holdout_pairs"] >= 2
        # On held-out pairs the trained policy prefers the "Summary:" answer more than
        # the base does (DPO's implicit reward; before training it is 0 by construction).
        assert m["reward_margin"] > 0 and m["reward_accuracy"] >= 0.5
        assert "forgetting" in m and "train_loss" in m
        artifact = Path(record.artifact_uri.removeprefix("file://"))
        assert artifact.suffix == ".gguf" and _size(artifact) > 0
        print("candidate metrics:", json.dumps(m, sort_keys=True))

        with server:
            server.load("base")
            gw = Gateway(
                GatewayConfig(
                    upstream=server.url,
                    backend="llama-router",
                    presets_file=server.presets_path,
                    base_model="base",
                    listen=f"127.0.0.1:{free_port()}",
                    sidecar=target_of(app),
                    server_id="llama-0",
                    chunk_idle_seconds=60,
                )
            )
            await gw.start()
            await wait_until(lambda: app.control.connected_servers() == 1, what="Hello")

            async def route_all(version: str, loaded: frozenset[str]) -> None:
                d = DesiredState(
                    revision=app.control.next_revision(),
                    loaded=loaded,
                    routes=(RouteSpec(version, 10_000),),
                    stable_version="base",
                    artifacts={record.version: record.artifact_uri},
                )
                await app.control.apply(d)
                await wait_until(lambda: gw.router.revision >= d.revision, timeout=120)

            await route_all("base", frozenset({"base"}))
            before, base_answers = await share_starting_with(gw, "Summary")
            await route_all(record.version, frozenset({"base", record.version}))
            await wait_until(
                lambda: server.models().get(record.version) == "loaded",
                timeout=120,
                what="the trained adapter loaded",
            )
            after, trained_answers = await share_starting_with(gw, "Summary")
            print(f"'Summary' share on unseen prompts: base {before:.2f}, trained {after:.2f}")
            print("base:", base_answers)
            print("trained:", trained_answers)
            # Tolerance: 12 greedy answers; the base starts none with "Summary" and the
            # trained adapter must do so for at least half of them (measured: see
            # docs/training.md), at least 0.5 above the base.
            assert after >= 0.5 and after - before >= 0.5, (base_answers, trained_answers)

        # The next update starts from the trained version: its adapter is continued
        # (and is DPO's reference: the margin starts at 0), not merged.
        out = tmp_path / "next"
        proc = await asyncio.create_subprocess_exec(
            str(trainer_bin),
            *(
                "train",
                "--data",
                str(Path(app.config.store.data_dir) / "datasets" / result["update_id"]),
            ),
            *("--out", str(out), "--base", record.version, "--models-dir", str(models_dir)),
            *("--steps", "2"),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        text = (await proc.communicate())[0].decode()
        assert proc.returncode == 0, text[-3000:]
        assert "step 1/2 loss" in text and "margins 0.000" in text
        doc = json.loads(_read(out / "candidate.json"))
        meta = json.loads(_read(models_dir / doc["version"] / "version.json"))
        assert meta["parent"] == record.version and meta["root"] == "base"
        assert doc["artifact_uri"].endswith(f"/{doc['version']}/adapter.gguf")
    finally:
        if gw is not None:
            await gw.stop()
        await app.shutdown()


def trainer_pid(output_dir: Path) -> int | None:
    """The trainer process (not its leash) whose argv names ``output_dir``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"_leash.py") for a in argv):
            continue
        if b"train" in argv and str(output_dir).encode() in argv:
            return int(proc.name)
    return None


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no pairs", "exited with code 3: trainer: too little data for DPO: 0 preference pairs"),
        ("stopped", "exited with code 143: trainer: stopped by SIGTERM; no candidate written"),
        (
            "damaged",
            "exited with code 2: trainer: bad dataset: preferences.jsonl: sha256 does not "
            "match manifest.json",
        ),
    ],
)
async def test_the_trainers_failures_are_recorded_with_its_reason(
    tmp_path: Path, trainer_bin: Path, models_dir: Path, case: str, reason: str
) -> None:
    command = trainer_command(trainer_bin, models_dir, "--method", "dpo")
    if case == "damaged":
        # The snapshot is changed after the daemon wrote it, before the trainer reads it.
        command = [
            "/bin/sh",
            "-c",
            'printf "\\n" >> "$1/preferences.jsonl" && shift && exec "$@"',
            "sh",
            "{dataset_dir}",
            *command,
        ]
    app = SidecarApp(config(tmp_path, command))
    await app.start()
    try:
        await send_traffic(app, corrections=case != "no pairs")
        if case == "stopped":
            await wait_until(lambda: app.training.status()["pending_samples"] > 0)
            decision = await app.training.evaluate_once(manual_reason="test")
            assert decision is not None and decision.fired
            out = Path(app.config.store.data_dir) / "training" / decision.update_id
            await wait_until(
                lambda: "step 1/" in _read(out / "trainer.log"),
                timeout=300,
                what="the first training step",
            )
            pid = trainer_pid(out)
            assert pid is not None
            os.kill(pid, signal.SIGTERM)
            outcome = await asyncio.wait_for(app.training.wait_update(), 120)
            assert outcome is not None
            result = {"update_id": decision.update_id, "ok": outcome.ok, "reason": outcome.reason}
        else:
            result = await run_update(app)
        print(f"{case}: {result['reason']}")
        assert not result["ok"]
        assert reason in result["reason"], result["reason"]
        (failed,) = history(app, "training_failed")
        assert failed["update_id"] == result["update_id"] and reason in failed["reason"]
        out = Path(app.config.store.data_dir) / "training" / result["update_id"]
        assert not (out / "candidate.json").exists()
        assert app.registry.list() == []
        assert _names(models_dir) == ["base"]  # no version folder half-made
    finally:
        await app.shutdown()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _size(path: Path) -> int:
    return path.stat().st_size


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())
