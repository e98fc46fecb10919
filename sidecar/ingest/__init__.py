"""IngestService: validate, dedupe, hand batches to the writer, ack when durable."""

from sidecar.ingest._decode import (
    NOT_AN_EVENT,
    BatchDecodeError,
    BatchDecoder,
    DecodedBatch,
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
    "DecodedBatch",
    "EventValidator",
    "IngestServicer",
    "split_batch",
]
