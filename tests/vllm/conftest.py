"""Real vLLM (CPU build) fixtures: the cached model and PEFT adapters.

`make test-vllm` installs them once (about 6 GB) and runs this folder; each
test module starts its own ``vllm serve`` once (a minute or so on two cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.testing import vllm_cpu_adapters


@pytest.fixture(scope="session")
def adapters() -> dict[str, Path]:
    return vllm_cpu_adapters()


def sse_text(raw: bytes) -> str:
    """The content of a streamed chat answer (OpenAI SSE chunks)."""
    import json

    out = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                out.append((choice.get("delta") or {}).get("content") or "")
    return "".join(out)
