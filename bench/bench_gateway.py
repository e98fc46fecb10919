"""The gateway's added latency and its rate, against the same upstream called directly.

Real processes: an instant OpenAI-style upstream (bench/_instant_openai.py),
the daemon, and ``atlas-sidecar gateway`` in front of the upstream. Rounds of
requests alternate direct / through the gateway, so drift on a shared machine
hits both alike; latencies are per request, at 1 and at 64 concurrent
clients (paced at an offered load under the gateway's ceiling), unstreamed
and streamed (16 chunks). Added latency = gateway p50 (p99) minus direct p50
(p99) in the same run. Then the rate through one gateway with 64 clients back
to back, and its CPU per request. Targets: p50 +1 ms and p99 +5 ms at 64
clients; at least 2,000 requests/s through one gateway.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import uvloop

from sidecar.testing import DaemonProcess, ReadyProcess, free_port

ROUNDS = 4
PER_ROUND = {1: 300, 64: 3000}
#: Requests/s offered by the 64 paced clients: under half the gateway's ceiling here.
OFFERED = 800.0
BODY = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}


async def _one(http: aiohttp.ClientSession, url: str, stream: bool, out: list[float]) -> None:
    body = {**BODY, "stream": stream}
    started = time.perf_counter()
    async with http.post(url, json=body) as r:
        await r.read()
        assert r.status == 200, r.status
    out.append((time.perf_counter() - started) * 1000)


async def _round(
    url: str, clients: int, n: int, stream: bool, rate: float | None = None
) -> tuple[list[float], float]:
    """``n`` requests from ``clients`` connections; paced at ``rate`` requests/s in
    total when given (latency under load), back to back otherwise (saturation)."""
    lat: list[float] = []
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as http:
        queue = iter(range(n))
        started = time.perf_counter()

        async def worker() -> None:
            for k in queue:
                if rate is not None:
                    delay = started + k / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await _one(http, url, stream, lat)

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return lat, n / elapsed


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 100 else max(values)


def _cpu(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


async def _bench(direct: str, gateway: str, gw_pid: int) -> int:
    path = "/v1/chat/completions"
    # Latency: one client back to back, and 64 concurrent clients paced at an
    # offered load well under the gateway's ceiling (at saturation, latency is
    # only queueing: 64 / throughput, whatever the proxy adds).
    for clients, rate in ((1, None), (64, OFFERED)):
        for stream in (False, True):
            got: dict[str, list[float]] = {"direct": [], "gateway": []}
            for _ in range(ROUNDS):
                for name, base in (("direct", direct), ("gateway", gateway)):
                    lat, _ = await _round(base + path, clients, PER_ROUND[clients], stream, rate)
                    got[name] += lat
            d50, g50 = statistics.median(got["direct"]), statistics.median(got["gateway"])
            d99, g99 = _pct(got["direct"], 99), _pct(got["gateway"], 99)
            kind = "streamed" if stream else "unstreamed"
            load = f"at {rate:,.0f} req/s" if rate else "back to back"
            print(
                f"{clients:>2} clients {load}, {kind:>10}: direct p50 {d50:.2f} p99 {d99:.2f} ms; "
                f"gateway p50 {g50:.2f} p99 {g99:.2f} ms; added p50 {g50 - d50:+.2f} ms, "
                f"p99 {g99 - d99:+.2f} ms"
            )
    # Throughput: 64 clients back to back, and the gateway's CPU per request.
    for stream in (False, True):
        rates, cpus = [], []
        for _ in range(ROUNDS):
            cpu0 = _cpu(gw_pid)
            lat, rate_now = await _round(gateway + path, 64, PER_ROUND[64], stream)
            cpus.append((_cpu(gw_pid) - cpu0) / len(lat))
            rates.append(rate_now)
        kind = "streamed" if stream else "unstreamed"
        print(
            f"through one gateway, 64 clients back to back, {kind}: {max(rates):,.0f} requests/s "
            f"(best of {ROUNDS}); its CPU per request {min(cpus) * 1e3:.3f} ms (threads "
            f"included), a ceiling of {1 / min(cpus):,.0f} requests/s per core"
        )
    return 0


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        upstream = ReadyProcess(
            "upstream",
            [sys.executable, str(Path(__file__).with_name("_instant_openai.py"))],
            root / "upstream.log",
        )
        port = upstream.start()["port"]
        daemon = DaemonProcess(root / "data", http_port=0).start()
        gw_port = free_port()
        gateway = ReadyProcess(
            "gateway",
            [
                sys.executable,
                "-m",
                "sidecar.cli",
                "gateway",
                "--upstream",
                f"http://127.0.0.1:{port}",
                "--listen",
                f"127.0.0.1:{gw_port}",
                "--sidecar",
                daemon.target,
                "--log-level",
                "WARNING",
            ],
            root / "gateway.log",
        )
        gateway.start()
        try:
            assert gateway.proc is not None
            return uvloop.run(
                _bench(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{gw_port}", gateway.proc.pid)
            )
        finally:
            gateway.stop()
            daemon.stop()
            upstream.stop()
            print(
                json.dumps({"gateway_log_tail": (root / "gateway.log").read_text()[-300:]})
                if gateway.proc and gateway.proc.returncode not in (0, None, -15)
                else "",
                end="",
            )


if __name__ == "__main__":
    sys.exit(main())
