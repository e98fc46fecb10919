"""``atlas-sidecar export`` and ``atlas-sidecar reprocess``.

export:    atlas-sidecar export --kind sft|dpo|kto --out FILE [--since TIME]
           [--target ADDR | --data-dir DIR] [--include-quarantined]
reprocess: atlas-sidecar reprocess --data-dir DIR [--config FILE] [--allow-partial] [--quiet]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import IO, Any

from sidecar._client_args import add_client_args, client_channel
from sidecar._private import open_private
from sidecar.errors import ConfigError, SidecarError

__all__ = [
    "PROGRESS_SECONDS",
    "parse_since",
    "progress_line",
    "reprocess",
    "setup_export",
    "setup_reprocess",
]


def parse_since(text: str) -> int:
    """ISO 8601 (``2025-01-02T03:04:05Z``) or seconds since the epoch -> ms.

    Raises:
        ValueError: naming the accepted forms.
    """
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since: {text!r} is neither ISO 8601 (2025-01-02T03:04:05Z) nor epoch seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def setup_export(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Write curated samples as JSONL in the shapes TRL's trainers read: sft "
        "(prompt, completion), dpo (prompt, chosen, rejected), kto (prompt, completion, label)."
    )
    p.add_argument("--kind", required=True, choices=("sft", "dpo", "kto"))
    p.add_argument("--out", required=True, metavar="FILE", help="output file ('-' for stdout)")
    p.add_argument("--since", metavar="TIME", help="ISO 8601 time or epoch seconds")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows (0: all)")
    p.add_argument(
        "--include-quarantined",
        action="store_true",
        help="list rows of quarantined sources too, marked quarantined: true",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--target", default="127.0.0.1:50051", metavar="ADDR", help="gRPC address of the daemon"
    )
    src.add_argument(
        "--data-dir", metavar="DIR", help="read a stopped daemon's data dir instead of gRPC"
    )
    p.add_argument("--config", metavar="FILE", help="config file (with --data-dir)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    add_client_args(p, target=False)


@contextlib.contextmanager
def _open_out(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
        return
    with open_private(path, "w", encoding="utf-8") as f:
        yield f


def run_export(args: argparse.Namespace) -> int:
    try:
        since_ms = parse_since(args.since) if args.since else 0
    except ValueError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        rows = _export_offline(args, since_ms) if args.data_dir else _export_grpc(args, since_ms)
    except SidecarError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 1
    with _open_out(args.out) as f:
        for line in rows:
            f.write(line + "\n")
    if args.out != "-":
        print(f"wrote {len(rows)} {args.kind} rows to {args.out}", file=sys.stderr)
    return 0


def _export_grpc(args: argparse.Namespace, since_ms: int) -> list[str]:
    import grpc
    from atlas_sidecar_client.pb import admin_pb2, admin_pb2_grpc

    kind = {
        "sft": admin_pb2.EXPORT_KIND_SFT,
        "dpo": admin_pb2.EXPORT_KIND_DPO,
        "kto": admin_pb2.EXPORT_KIND_KTO,
    }[args.kind]
    req = admin_pb2.ExportSamplesRequest(
        kind=kind, limit=args.limit, include_quarantined=args.include_quarantined
    )
    if since_ms:
        req.since.FromMilliseconds(since_ms)
    with client_channel(args) as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        try:
            return [row.json for row in stub.ExportSamples(req, timeout=args.timeout)]
        except grpc.RpcError as exc:
            raise SidecarError(
                f"export from {args.target} failed: {exc.code().name}: {exc.details()}"
            ) from exc


def _load(args: argparse.Namespace) -> Any:
    from sidecar.config import load_config

    overrides = {"store": {"data_dir": args.data_dir}} if args.data_dir else None
    return load_config(getattr(args, "config", None), overrides=overrides)


def _export_offline(args: argparse.Namespace, since_ms: int) -> list[str]:
    from sidecar.learning import HoldoutSet
    from sidecar.scoring import encode_row, iter_export_rows, quarantined_sources
    from sidecar.store import Store

    config = _load(args)
    store = Store(config.store)
    store.open()
    try:
        sc = config.scoring
        out: list[str] = []
        with store.read() as txn:
            quarantine = quarantined_sources(
                txn,
                store,
                min_history=sc.quarantine_min_history,
                min_sources=sc.quarantine_min_sources,
                z_threshold=sc.quarantine_z,
            )
            for _no, row in iter_export_rows(
                txn,
                store,
                args.kind,
                quarantine=quarantine,
                since_ms=since_ms,
                include_quarantined=args.include_quarantined,
                exclude=HoldoutSet(store, config.holdout).excludes,
            ):
                out.append(encode_row(row))
                if args.limit and len(out) >= args.limit:
                    break
        return out
    finally:
        store.close()


# -- reprocess -----------------------------------------------------------------


#: Seconds between two progress reports of ``reprocess``.
PROGRESS_SECONDS = 2.0

#: ``progress(done, total, elapsed_seconds)``: events processed of the log's total.
Progress = Callable[[int, int, float], None]


def setup_reprocess(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Recompute every score, sample and preference pair from the event log with the "
        "configured weight table (a changed table becomes a new weight version). "
        "The daemon must be stopped."
    )
    p.add_argument("--data-dir", required=True, metavar="DIR")
    p.add_argument("--config", metavar="FILE", help="YAML config file (the scoring weights)")
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="go on although retention already trimmed the front of the log "
        "(scores of trimmed events are lost)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines on stderr (the JSON summary still goes to stdout)",
    )
    p.epilog = (
        "Progress (events done of the log's total, rate, time left) goes to stderr every "
        f"{PROGRESS_SECONDS:g} s and once at the end; the summary is one JSON object on stdout."
    )


_VIEW_DBS = ("requests", "samples", "pairs", "windows", "prompts", "closed")
_META_PREFIXES = (b"scoring/counters", b"scoring/perf/", b"scoring/src/", b"cursor/scoring")


async def reprocess(
    config: Any,
    *,
    allow_partial: bool = False,
    progress: Progress | None = None,
    progress_seconds: float = PROGRESS_SECONDS,
) -> dict[str, Any]:
    """Rebuilds the scoring views from the log; returns a summary.

    ``progress`` is called every ``progress_seconds`` while the log is read,
    and once when it has been read to the end.

    Raises:
        DataDirLockedError: a daemon holds the data dir.
        SidecarError: the log was trimmed and ``allow_partial`` is False.
    """
    import lmdb

    from sidecar.learning import (
        HoldoutAtCuration,
        HoldoutSet,
        LearningScheduler,
        curation_options,
    )
    from sidecar.scoring import FeedbackProcessor, read_counters
    from sidecar.store import ProcessorRunner, Store, StoreWriter, append_history
    from sidecar.training._registry import ModelRegistry

    store = Store(config.store)
    store.open()
    writer = StoreWriter(store, config.store)
    try:
        with store.read() as txn, txn.cursor(db=store.db("events")) as cur:
            first = int.from_bytes(cur.key(), "big") if cur.first() else 0
            last = int.from_bytes(cur.key(), "big") if cur.last() else 0
        total = last - first + 1 if first else 0
        if first > 1 and not allow_partial:
            raise SidecarError(
                f"the log starts at seq {first}: retention trimmed older events, whose "
                "samples would be lost; pass --allow-partial to go on"
            )
        await writer.start()
        registry = ModelRegistry(store, writer)
        lcfg = config.learning
        proc = FeedbackProcessor(
            store,
            config.scoring,
            baseline_samples=lcfg.baseline_samples,
            recent_samples=lcfg.recent_samples,
            on_primary_version=registry.observe_primary_version,
            **curation_options(config),
        )
        # Holdout decisions are kept (decided once); samples first curated
        # now get theirs, as in the daemon.
        proc.sample_document_listeners.append(
            HoldoutAtCuration.for_config(HoldoutSet(store, config.holdout), config).on_document
        )

        def wipe(txn: lmdb.Transaction) -> None:
            for name in _VIEW_DBS:
                txn.drop(store.db(name), delete=False)
            meta = store.db("meta")
            doomed: list[bytes] = []
            with txn.cursor(db=meta) as cur:
                for prefix in _META_PREFIXES:
                    if cur.set_range(prefix):
                        for key in cur.iternext(values=False):
                            if not bytes(key).startswith(prefix):
                                break
                            doomed.append(bytes(key))
            for key in doomed:
                txn.delete(key, db=meta)
            proc.bind(txn)

        await writer.run(wipe)
        runner = ProcessorRunner(store, writer, [proc], batch_events=5000)
        stats = runner.stats[proc.name]
        started = time.monotonic()
        next_report = started + progress_seconds
        while await runner.run_once() or not await runner.caught_up():
            if progress is not None and time.monotonic() >= next_report:
                progress(stats.processed + stats.dead_lettered, total, time.monotonic() - started)
                next_report = time.monotonic() + progress_seconds
        if progress is not None:
            progress(stats.processed + stats.dead_lettered, total, time.monotonic() - started)
        await runner.tick_all()
        scheduler = LearningScheduler(store, lcfg)

        def settle(txn: lmdb.Transaction) -> dict[str, Any]:
            scheduler.mark_all_seen(txn)
            c = read_counters(txn, store)
            summary = {
                "weight_version": proc.weight_version,
                "events": runner.stats[proc.name].processed,
                "samples": c.samples,
                "sft_samples": c.sft,
                "pairs": c.pairs,
                "open_requests": int(txn.stat(store.db("windows"))["entries"]),
                "dead_lettered": runner.stats[proc.name].dead_lettered,
            }
            append_history(txn, store, "scores_reprocessed", **summary)
            return summary

        summary = await writer.run(settle)
        summary["seconds"] = round(time.monotonic() - started, 3)
        return summary
    finally:
        await writer.shutdown()
        store.close()


def run_reprocess(args: argparse.Namespace) -> int:
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(
            reprocess(
                config,
                allow_partial=args.allow_partial,
                progress=None if args.quiet else _print_progress,
            )
        )
    except SidecarError as exc:
        print(f"atlas-sidecar: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


def progress_line(done: int, total: int, elapsed: float) -> str:
    """``reprocess: 120,000 of 1,000,000 events (12%), 9,100 events/s, about 1 min 37 s left``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    line = f"reprocess: {done:,} of {total:,} events"
    if total:
        line += f" ({100 * done // total}%)"
    line += f", {rate:,.0f} events/s"
    if done >= total:
        return line + f", done in {_duration(elapsed)}"
    if rate > 0:
        line += f", about {_duration((total - done) / rate)} left"
    return line


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


def _print_progress(done: int, total: int, elapsed: float) -> None:
    print(progress_line(done, total, elapsed), file=sys.stderr, flush=True)


def register(commands: dict[str, Any]) -> None:
    commands["export"] = (setup_export, run_export)
    commands["reprocess"] = (setup_reprocess, run_reprocess)
    from sidecar.training._train_cli import register as register_trainer

    register_trainer(commands)
