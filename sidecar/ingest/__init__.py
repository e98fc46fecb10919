"""IngestService: validate, dedupe, hand batches to the writer, ack when durable."""

from sidecar.ingest._decode import (
    NOT_AN_EVENT,
    BatchDecodeError,
    BatchDecoder,
    BatchTooLargeError,
    DecodedBatch,
    count_events,
    split_batch,
)
from sidecar.ingest._service import BatchInfo, BatchObserver, BatchStart, IngestServicer
from sidecar.ingest._validate import EventValidator

__all__ = [
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
]
