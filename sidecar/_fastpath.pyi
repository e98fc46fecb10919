"""Types of the compiled ingest path (sidecar/_fastpath.c)."""

from collections.abc import Sequence

#: (event_id, event bytes) per accepted event, in batch order, with
#: (b"", event bytes) placeholders for slow events.
Items = list[tuple[bytes, bytes]]
#: (index, reason) per rejected event.
Rejected = list[tuple[int, str]]
#: (position in items, index in the batch) per event left to the caller.
Slow = list[tuple[int, int]]

class BatchDecoder:
    def __init__(
        self,
        *,
        max_id_bytes: int,
        max_text_bytes: int,
        max_attributes: int,
        max_attribute_key_bytes: int,
        max_attribute_value_bytes: int,
        max_logprobs: int,
        roles: Sequence[int],
        signals: Sequence[int],
    ) -> None: ...
    def decode(self, data: bytes, /) -> tuple[Items, Rejected, Slow, int] | None:
        """Raises ValueError naming the byte offset when the framing is broken."""

def append_rows(
    items: Sequence[tuple[bytes, bytes]], first_seq: int, now_ms: int, /
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """The writer's dedupe rows and log rows for ``items`` (see _writer.py)."""

def count_events(data: bytes, limit: int, /) -> int:
    """The events of a serialized EventBatch, counted up to ``limit + 1``."""
