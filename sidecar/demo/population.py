"""The simulated user population as a process: asks the reference server, reacts, reports.

``python -m sidecar.demo.population --server http://127.0.0.1:PORT --stats FILE``

Users ask at ``--rate`` questions per second (retries come on top), read the
answer, and send their feedback to the server's ``/v1/feedback`` (as an
application backend would). Every second a line is appended to ``--stats``::

    {"t": 1764147600.0, "versions": {"v1": [answers, satisfied]}, "asked": n,
     "feedback": n, "errors": n}

``satisfied`` is the users' hidden judgement, which only the simulation knows:
the demo's measure of how good each version really is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from atlas_sidecar_client import Signal

from sidecar._aio import spawn
from sidecar.demo._users import Ask, UserPopulation
from sidecar.demo._world import World

__all__ = ["PopulationRunner", "main"]


class PopulationRunner:
    """Drives a ``UserPopulation`` against a server at a steady rate."""

    def __init__(
        self,
        server: str,
        stats_path: str | Path,
        *,
        rate: float = 60.0,
        seed: int = 11,
        concurrency: int = 32,
        max_retries: int = 2,
    ) -> None:
        self.server = server.rstrip("/")
        self.stats_path = Path(stats_path)
        self.rate = rate
        self.population = UserPopulation(World(), seed=seed)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self._window: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self._asked = 0
        self._feedback = 0
        self._errors = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _post(self, session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Any:
        async with session.post(self.server + path, json=body) as resp:
            resp.raise_for_status()
            return await resp.json()

    async def _one(self, session: aiohttp.ClientSession, ask: Ask) -> None:
        retry_of = ""
        for _ in range(self.max_retries + 1):
            body = {
                "prompt": ask.prompt.text,
                "user_id": ask.user_id,
                "session_id": ask.session_id,
            }
            if retry_of:
                body["retry_of"] = retry_of
            answer = await self._post(session, "/v1/answer", body)
            reaction = self.population.react(ask, answer["answer"])
            counts = self._window[answer["version"]]
            counts[0] += 1
            counts[1] += int(reaction.satisfied)
            fb: dict[str, Any] = {
                "request_id": answer["request_id"],
                "user_id": ask.user_id,
                "session_id": ask.session_id,
            }
            if reaction.signal is not None:
                fb["signal"] = Signal.Name(reaction.signal)  # type: ignore[arg-type]
            if reaction.rating is not None:
                fb["rating"] = reaction.rating
            if reaction.dwell_ms:
                fb["dwell_ms"] = reaction.dwell_ms
            if reaction.correction:
                fb["correction"] = reaction.correction
            if len(fb) > 3:
                await self._post(session, "/v1/feedback", fb)
                self._feedback += 1
            if not reaction.retry:
                return
            retry_of = answer["request_id"]

    async def _guarded(
        self, session: aiohttp.ClientSession, ask: Ask, slots: asyncio.Semaphore
    ) -> None:
        try:
            await self._one(session, ask)
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
            self._errors += 1
        finally:
            slots.release()

    def _flush_stats(self) -> None:
        line = {
            "t": round(time.time(), 3),
            "versions": {v: list(c) for v, c in self._window.items()},
            "asked": self._asked,
            "feedback": self._feedback,
            "errors": self._errors,
        }
        self._window.clear()
        with open(self.stats_path, "a") as fh:
            fh.write(json.dumps(line) + "\n")

    async def run(self, duration: float = 0.0) -> None:
        """Asks until ``stop()`` (or ``duration`` seconds, when > 0)."""
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        started = time.monotonic()
        next_stats = started + 1.0
        interval = 1.0 / self.rate
        next_ask = started
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            while not self._stop.is_set():
                now = time.monotonic()
                if duration and now - started >= duration:
                    break
                if now >= next_stats:
                    self._flush_stats()
                    next_stats += 1.0
                if now < next_ask:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), min(next_ask, next_stats) - now)
                    continue
                next_ask = max(next_ask + interval, now - 1.0)
                await slots.acquire()
                self._asked += 1
                task = spawn(
                    self._guarded(session, self.population.ask(), slots),
                    stage="demo-population",
                    name="ask",
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        self._flush_stats()


async def _main(args: argparse.Namespace) -> int:
    runner = PopulationRunner(
        args.server, args.stats, rate=args.rate, seed=args.seed, concurrency=args.concurrency
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.stop)
    print(json.dumps({"event": "ready"}), flush=True)
    await runner.run(args.duration)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sidecar.demo.population", description="The demo's simulated users."
    )
    p.add_argument("--server", required=True, help="the reference server's URL")
    p.add_argument("--stats", required=True, help="JSONL file the per-second stats go to")
    p.add_argument("--rate", type=float, default=60.0, help="questions per second (default 60)")
    p.add_argument("--seed", type=int, default=11, help="seed of the population (default 11)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0: until SIGTERM)")
    args = p.parse_args(argv)
    import uvloop

    return int(uvloop.run(_main(args)))


if __name__ == "__main__":
    sys.exit(main())
