"""JSON decoding for the OpenAI capture: orjson when installed (the gateway has it), else json."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSONDecodeError", "loads"]

try:
    import orjson

    JSONDecodeError: type[ValueError] = orjson.JSONDecodeError

    def loads(data: bytes | str) -> Any:
        return orjson.loads(data)

except ImportError:  # pragma: no cover - depends on the environment
    JSONDecodeError = json.JSONDecodeError

    def loads(data: bytes | str) -> Any:
        return json.loads(data)
