"""An instant OpenAI-style upstream for the gateway bench: fixed answers, no model.

``python bench/_instant_openai.py`` prints ``{"event": "ready", "port": N}``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvloop
from aiohttp import web

_WHOLE = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok " * 16},
                "finish_reason": "stop",
            }
        ],
    }
).encode()
_CHUNKS = [
    b"data: "
    + json.dumps({"choices": [{"index": 0, "delta": {"content": "ok "}}]}).encode()
    + b"\n\n"
    for _ in range(16)
] + [b"data: [DONE]\n\n"]


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if not body.get("stream"):
        return web.Response(body=_WHOLE, content_type="application/json")
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for chunk in _CHUNKS:
        await out.write(chunk)
    await out.write_eof()
    return out


async def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(json.dumps({"event": "ready", "port": runner.addresses[0][1]}), flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    sys.exit(uvloop.run(main()))
