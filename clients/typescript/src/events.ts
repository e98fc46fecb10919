import {
  type ChannelCredentials,
  type ClientDuplexStream,
  type ClientOptions,
  Metadata,
  type ServiceError,
  status as grpcStatus,
} from "@grpc/grpc-js";
import { randomFillSync } from "node:crypto";

import { v7 as uuidv7 } from "uuid";

import {
  Event,
  EventBatch,
  Feedback,
  IngestAck,
  Inference,
} from "./gen/atlas/sidecar/v1/events.js";
import { IngestServiceClient } from "./gen/atlas/sidecar/v1/ingest.js";
import { type ChannelSecurity, channelSecurity, TOKEN_ENV, type TlsOptions } from "./security.js";

/**
 * The sidecar's default `ingest.max_events_per_batch`: a larger batch is
 * refused whole, so batches are never cut larger than this.
 */
export const MAX_EVENTS_PER_BATCH = 10_000;

/** Which event is lost when the queue is full. */
export type DropPolicy = "drop_newest" | "drop_oldest";

export interface EventStreamOptions {
  /** Bound on events waiting to be batched (default 100000): more memory buys more tolerance of an absent sidecar. */
  maxQueue?: number;
  /** Most events per EventBatch (default 100): larger batches cost the sidecar less per event. Capped at `maxEventsPerBatch`. */
  batchSize?: number;
  /** Cap on `batchSize` (default MAX_EVENTS_PER_BATCH); keep it at or below the sidecar's `ingest.max_events_per_batch`. */
  maxEventsPerBatch?: number;
  /** How long a partial batch waits for more events (default 5 ms): longer means fuller batches, later delivery. */
  lingerMs?: number;
  /** Bound on batches sent and not yet acked (default 256); past it the queue fills and the drop policy applies. */
  maxInflightBatches?: number;
  /** Applies when the queue is full (default "drop_newest"). */
  dropPolicy?: DropPolicy;
  /** Bounds of the jittered wait between reconnects (defaults 50 ms and 2000 ms). */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /**
   * Sent on every call as `authorization: Bearer <token>`. Default
   * `process.env.ATLAS_SIDECAR_TOKEN`; empty: no token.
   */
  token?: string;
  /** TLS, mutual TLS with a client certificate (the sidecar's `server.tls`); absent: plaintext, for loopback or a Unix socket. */
  tls?: TlsOptions;
  /** Where the stream says what it has to say on its own: a refusal (UNAUTHENTICATED, PERMISSION_DENIED), once until the next ack. Default `console.error`. */
  log?: (message: string) => void;
  /** Channel credentials of your own, used instead of `tls`; the token then goes as call metadata. */
  credentials?: ChannelCredentials;
  /** gRPC channel options. */
  channelOptions?: Partial<ClientOptions>;
}

/** Counters since the stream was created. */
export interface EventStreamStats {
  /** Events handed to record*. */
  recorded: number;
  /** Lost: queue full, or still undelivered at close. */
  dropped: number;
  /** Batches sent, resends included. */
  sentBatches: number;
  /** Events the sidecar acked as durable. */
  ackedEvents: number;
  /** Stored by the sidecar. */
  accepted: number;
  /** Already stored (a resend after a lost ack). */
  duplicates: number;
  /** Refused by the sidecar (per event, or with their batch); never resent. */
  rejected: number;
  /** Batches the sidecar refused whole (INVALID_ARGUMENT); their events are in `rejected` and were dropped. */
  rejectedBatches: number;
  reconnects: number;
  lastError: string;
}

// uuid's own v7() asks crypto.getRandomValues for 16 bytes per id, about
// 10 us on Node 20: more than the rest of a record call. The ids here keep
// uuid's layout and its monotonic sequence (the same steps as its
// updateV7State) but draw random bytes from a pool filled 4 KiB at a time.
const randomPool = new Uint8Array(4096);
let randomPos = randomPool.length;
const v7State = { msecs: -Infinity, seq: 0 };

/**
 * A new UUIDv7: time ordered and strictly increasing within this process, so
 * the sidecar's dedupe index is written in key order.
 */
export function newEventId(): string {
  if (randomPos + 16 > randomPool.length) {
    randomFillSync(randomPool);
    randomPos = 0;
  }
  const random = randomPool.subarray(randomPos, randomPos + 16);
  randomPos += 16;
  const now = Date.now();
  if (now > v7State.msecs) {
    v7State.msecs = now;
    v7State.seq = ((random[6] & 0x7f) << 24) | (random[7] << 16) | (random[8] << 8) | random[9];
  } else {
    v7State.seq = (v7State.seq + 1) | 0;
    if (v7State.seq === 0) {
      v7State.msecs++;
    }
  }
  return uuidv7({ msecs: v7State.msecs, seq: v7State.seq, random });
}

/** A FIFO with O(1) push and shift. */
class Deque<T> {
  private items: (T | undefined)[] = [];
  private head = 0;

  get length(): number {
    return this.items.length - this.head;
  }

  push(item: T): void {
    this.items.push(item);
  }

  shift(): T | undefined {
    if (this.head >= this.items.length) {
      return undefined;
    }
    const item = this.items[this.head];
    this.items[this.head] = undefined;
    this.head++;
    if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return item;
  }

  clear(): void {
    this.items = [];
    this.head = 0;
  }
}

type Waiter = () => void;

/**
 * Sends events to the sidecar without ever blocking the caller.
 *
 * `recordInference` and `recordFeedback` put the event on a bounded queue and
 * return its event id (a UUIDv7) at once. Batches are cut by size and linger
 * time and streamed over `IngestService.StreamEvents`; they stay in memory
 * until the sidecar acks them as durable and are resent after a reconnect with
 * the same event ids, so the sidecar stores each event exactly once. When the
 * queue is full the drop policy applies and `stats.dropped` counts it.
 *
 * Rejections are permanent: rejected events, and batches the sidecar refuses
 * whole with INVALID_ARGUMENT, are counted and never resent; transient
 * failures (UNAVAILABLE, RESOURCE_EXHAUSTED, ...) are retried with backoff. A
 * stream is opened only when there is something to send, so one the sidecar
 * closed for being idle comes back with the next event.
 *
 * A refusal of the client itself (UNAUTHENTICATED: no or an unknown token;
 * PERMISSION_DENIED: a token without the ingest role) is logged once, keeps
 * the events queued and is retried at `backoffMaxMs`, so a token fixed in the
 * sidecar's tokens file is picked up without restarting the client.
 *
 * While connected the stream keeps the process alive: call `close()` on exit.
 */
export class EventStream {
  readonly target: string;
  readonly stats: EventStreamStats = {
    recorded: 0,
    dropped: 0,
    sentBatches: 0,
    ackedEvents: 0,
    accepted: 0,
    duplicates: 0,
    rejected: 0,
    rejectedBatches: 0,
    reconnects: 0,
    lastError: "",
  };

  private readonly maxQueue: number;
  private readonly batchSize: number;
  private readonly lingerMs: number;
  private readonly maxInflight: number;
  private readonly dropOldest: boolean;
  private readonly backoffInitialMs: number;
  private readonly backoffMaxMs: number;
  private readonly client: IngestServiceClient;
  private readonly security: ChannelSecurity;
  private readonly log: (message: string) => void;
  /** Set when a refusal was logged, cleared by an ack. */
  private refusedLogged = false;

  private readonly queue = new Deque<Event>();
  /** Batches sent or waiting to be sent, oldest first. */
  private readonly unacked: EventBatch[] = [];
  /** How many of `unacked` went out on the current call. */
  private sent = 0;
  private call: ClientDuplexStream<EventBatch, IngestAck> | undefined;
  private lingerTimer: NodeJS.Timeout | undefined;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private drainScheduled = false;
  private backoffMs: number;
  private closed = false;
  private waiters: Waiter[] = [];

  constructor(target: string, options: EventStreamOptions = {}) {
    this.target = target;
    this.maxQueue = positive("maxQueue", options.maxQueue, 100_000);
    this.batchSize = Math.min(
      positive("batchSize", options.batchSize, 100),
      positive("maxEventsPerBatch", options.maxEventsPerBatch, MAX_EVENTS_PER_BATCH),
    );
    this.lingerMs = positive("lingerMs", options.lingerMs, 5);
    this.maxInflight = positive("maxInflightBatches", options.maxInflightBatches, 256);
    const policy = options.dropPolicy ?? "drop_newest";
    if (policy !== "drop_newest" && policy !== "drop_oldest") {
      throw new RangeError(`dropPolicy must be "drop_newest" or "drop_oldest", got ${String(policy)}`);
    }
    this.dropOldest = policy === "drop_oldest";
    this.backoffInitialMs = positive("backoffInitialMs", options.backoffInitialMs, 50);
    this.backoffMaxMs = positive("backoffMaxMs", options.backoffMaxMs, 2000);
    this.backoffMs = this.backoffInitialMs;
    this.security =
      options.credentials === undefined
        ? channelSecurity({ token: options.token, tls: options.tls })
        : { ...channelSecurity({ token: options.token }), credentials: options.credentials };
    this.log = options.log ?? ((message) => console.error(message));
    this.client = new IngestServiceClient(target, this.security.credentials, {
      // The channel's own reconnect backoff (1 s growing to 120 s by default)
      // would leave a restarted sidecar unused for minutes: follow ours.
      "grpc.initial_reconnect_backoff_ms": this.backoffInitialMs,
      "grpc.max_reconnect_backoff_ms": this.backoffMaxMs,
      ...this.security.channelOptions,
      ...options.channelOptions,
    });
  }

  // -- the caller's side (hot path) --------------------------------------

  /** Queues an Inference event and returns its event id. Never blocks. */
  recordInference(inference: Partial<Inference>): string {
    return this.record({ inference: Inference.fromPartial(inference) });
  }

  /** Queues a Feedback event and returns its event id. Never blocks. */
  recordFeedback(feedback: Partial<Feedback>): string {
    return this.record({ feedback: Feedback.fromPartial(feedback) });
  }

  /** Queues a ready-made event (an id and the time are set when missing); returns its event id. */
  record(event: Partial<Event>): string {
    const ev: Event = {
      eventId: event.eventId || newEventId(),
      time: event.time ?? new Date(),
      inference: event.inference,
      feedback: event.feedback,
    };
    this.stats.recorded++;
    if (this.closed) {
      this.stats.dropped++;
      return ev.eventId;
    }
    if (this.queue.length >= this.maxQueue) {
      this.stats.dropped++;
      if (!this.dropOldest) {
        return ev.eventId;
      }
      this.queue.shift();
    }
    this.queue.push(ev);
    if (this.queue.length >= this.batchSize) {
      this.scheduleDrain();
    } else if (this.lingerTimer === undefined) {
      this.lingerTimer = setTimeout(() => {
        this.lingerTimer = undefined;
        this.drain(true);
      }, this.lingerMs);
    }
    return ev.eventId;
  }

  /** Events recorded and not yet acked or dropped. */
  get pending(): number {
    let n = this.queue.length;
    for (const b of this.unacked) {
      n += b.events.length;
    }
    return n;
  }

  // -- flushing and closing ----------------------------------------------

  /** Resolves true once every event recorded so far is acked; false on timeout or close. */
  flush(timeoutMs?: number): Promise<boolean> {
    this.drain(true);
    if (this.pending === 0) {
      return Promise.resolve(true);
    }
    if (this.closed) {
      return Promise.resolve(false);
    }
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const waiter: Waiter = () => {
        if (this.pending === 0 || this.closed) {
          if (timer !== undefined) {
            clearTimeout(timer);
          }
          this.waiters = this.waiters.filter((w) => w !== waiter);
          resolve(this.pending === 0);
        }
      };
      this.waiters.push(waiter);
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.waiters = this.waiters.filter((w) => w !== waiter);
          resolve(false);
        }, timeoutMs);
      }
    });
  }

  /**
   * Flushes (up to `timeoutMs`), then ends the stream and the channel.
   * Resolves false when some events could not be delivered; they are counted
   * in `stats.dropped`. Safe to call twice.
   */
  async close(timeoutMs = 10_000): Promise<boolean> {
    if (this.closed) {
      return true;
    }
    const ok = await this.flush(timeoutMs);
    this.closed = true;
    const lost = this.pending;
    this.stats.dropped += lost;
    this.queue.clear();
    this.unacked.length = 0;
    clearTimeout(this.lingerTimer);
    clearTimeout(this.reconnectTimer);
    this.lingerTimer = undefined;
    this.reconnectTimer = undefined;
    const call = this.call;
    this.call = undefined;
    call?.cancel();
    this.client.close();
    this.notify();
    return ok && lost === 0;
  }

  // -- batching -------------------------------------------------------------

  private scheduleDrain(): void {
    if (!this.drainScheduled) {
      this.drainScheduled = true;
      setImmediate(() => {
        this.drainScheduled = false;
        this.drain(false);
      });
    }
  }

  /** Cuts batches from the queue while the in-flight bound allows; `partial` also cuts the last short one. */
  private drain(partial: boolean): void {
    if (this.closed) {
      return;
    }
    while (this.unacked.length < this.maxInflight) {
      const n = this.queue.length;
      if (n === 0 || (n < this.batchSize && !partial)) {
        break;
      }
      const events: Event[] = [];
      while (events.length < this.batchSize && this.queue.length > 0) {
        events.push(this.queue.shift() as Event);
      }
      this.unacked.push({ events });
    }
    if (this.queue.length === 0 && this.lingerTimer !== undefined) {
      clearTimeout(this.lingerTimer);
      this.lingerTimer = undefined;
    } else if (this.queue.length > 0 && this.lingerTimer === undefined) {
      this.lingerTimer = setTimeout(() => {
        this.lingerTimer = undefined;
        this.drain(true);
      }, this.lingerMs);
    }
    this.pump();
  }

  // -- the stream -------------------------------------------------------------

  /** Sends what the current call has not sent yet, connecting first when needed. */
  private pump(): void {
    if (this.closed || this.sent >= this.unacked.length) {
      return;
    }
    if (this.call === undefined) {
      if (this.reconnectTimer === undefined) {
        this.connect();
      }
      return;
    }
    while (this.sent < this.unacked.length) {
      this.call.write(this.unacked[this.sent]);
      this.sent++;
      this.stats.sentBatches++;
    }
  }

  private connect(): void {
    // Wait for the channel to be ready instead of failing at once: while the
    // sidecar is away the call waits (and holds nothing the queue does not).
    const md: Metadata = this.security.metadata();
    md.setOptions({ waitForReady: true });
    const call = this.client.streamEvents(md);
    this.call = call;
    this.sent = 0;
    let finished = false;
    const finish = (why: string, code?: number): void => {
      if (finished) {
        return;
      }
      finished = true;
      if (this.call !== call) {
        return; // closed, or already replaced
      }
      if (code === grpcStatus.INVALID_ARGUMENT && this.sent > 0) {
        // The oldest unacked batch is the refused one (acks come in order);
        // resending it would be refused again.
        const refused = this.unacked.shift() as EventBatch;
        this.stats.rejected += refused.events.length;
        this.stats.rejectedBatches++;
        this.backoffMs = this.backoffInitialMs;
        this.notify();
      }
      this.call = undefined;
      this.sent = 0;
      this.stats.lastError = why;
      if (this.closed) {
        return;
      }
      if (code === grpcStatus.UNAUTHENTICATED || code === grpcStatus.PERMISSION_DENIED) {
        // A missing, unknown or unentitled token: say so once, keep the
        // events queued, and retry at the slowest pace until it is fixed.
        if (!this.refusedLogged) {
          this.refusedLogged = true;
          this.log(
            `atlas-sidecar: the sidecar refused this client (${why}); ${this.pending} events stay queued. ` +
              `Check the token (the token option or ${TOKEN_ENV})`,
          );
        }
        this.backoffMs = this.backoffMaxMs;
      }
      call.cancel();
      this.stats.reconnects++;
      const delay = Math.random() * this.backoffMs;
      this.backoffMs = Math.min(this.backoffMs * 2, this.backoffMaxMs);
      // Unref'd: a sidecar that is away must not keep the process alive.
      this.reconnectTimer = setTimeout(() => {
        this.reconnectTimer = undefined;
        this.drain(false);
        if (this.call === undefined && this.unacked.length > 0) {
          this.connect();
        }
      }, delay);
      this.reconnectTimer.unref();
    };
    call.on("data", (ack: IngestAck) => {
      if (this.call === call) {
        this.backoffMs = this.backoffInitialMs;
        this.refusedLogged = false;
        this.retire(ack);
      }
    });
    call.on("error", (err: ServiceError) =>
      finish(`${grpcStatus[err.code] ?? err.code}: ${err.details || err.message}`, err.code),
    );
    call.on("end", () => finish("stream ended by the sidecar"));
    this.pump();
  }

  /** Acks arrive in order, one per batch: each retires the oldest batch. */
  private retire(ack: IngestAck): void {
    const s = this.stats;
    s.accepted += ack.accepted;
    s.duplicates += ack.duplicates;
    s.rejected += ack.rejected.length + ack.rejectedUnlisted;
    const batch = this.unacked.shift();
    if (batch !== undefined) {
      s.ackedEvents += batch.events.length;
      if (this.sent > 0) {
        this.sent--;
      }
    }
    // Room in flight again: move queued events along.
    this.drain(false);
    this.notify();
  }

  private notify(): void {
    for (const w of [...this.waiters]) {
      w();
    }
  }
}

function positive(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) {
    return fallback;
  }
  if (!(value > 0)) {
    throw new RangeError(`${name} must be > 0, got ${value}`);
  }
  return value;
}
