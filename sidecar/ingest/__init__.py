"""IngestService: validate, dedupe, hand batches to the writer, ack when durable."""

from sidecar.ingest._decode import (
    DECODER_ENV,
    NOT_AN_EVENT,
    BatchDecodeError,
    BatchDecoder,
    DecodedBatch,
    compiled_available,
    python_decoder_reason,
    split_batch,
)
from sidecar.ingest._service import BatchInfo, BatchObserver, BatchStart, IngestServicer
from sidecar.ingest._validate import EventValidator

__all__ = [
    "DECODER_ENV",
    "NOT_AN_EVENT",
    "BatchDecodeError",
    "BatchDecoder",
    "BatchInfo",
    "BatchObserver",
    "BatchStart",
    "DecodedBatch",
    "EventValidator",
    "IngestServicer",
    "compiled_available",
    "python_decoder_reason",
    "split_batch",
]
