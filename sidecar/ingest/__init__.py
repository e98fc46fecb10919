"""IngestService: validate, dedupe, hand batches to the writer, ack when durable."""

from sidecar.ingest._service import BatchObserver, BatchStart, IngestServicer
from sidecar.ingest._validate import EventValidator

__all__ = ["BatchObserver", "BatchStart", "EventValidator", "IngestServicer"]
