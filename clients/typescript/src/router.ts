import { createHash } from "node:crypto";

import type { SetTrafficSplit } from "./gen/atlas/sidecar/v1/control.js";
import { SetTrafficSplit as SetTrafficSplitCodec } from "./gen/atlas/sidecar/v1/control.js";

/** The number of routing buckets: weights are in basis points. */
export const BUCKETS = 10000;

/**
 * The routing key of a request: the session id when present, else the user
 * id, else the request id. Requests with the same key always land in the same
 * bucket, so a session keeps seeing one model version.
 */
export function stickyKey(requestId: string, sessionId = "", userId = ""): string {
  return sessionId || userId || requestId;
}

/** `uint64_be(sha256(utf8(key))[0:8]) % 10000`, the same in every language's client. */
export function bucket(key: string): number {
  const digest = createHash("sha256").update(key, "utf8").digest();
  return Number(digest.readBigUInt64BE(0) % BigInt(BUCKETS));
}

/**
 * Applies a split to a bucket: walk the routes in order summing weight_bps and
 * take the first whose running sum exceeds the bucket. When the weights sum to
 * no more than the bucket, the answer is the split's stable_version, or the
 * first route when that is empty, or "" when the split has no routes.
 */
export function routeBucket(b: number, split: SetTrafficSplit): string {
  let total = 0;
  for (const r of split.routes) {
    total += r.weightBps;
    if (total > b) {
      return r.version;
    }
  }
  return fallbackVersion(split);
}

/** Whether a bucket is mirrored to the split's shadow version. */
export function mirrors(b: number, split: SetTrafficSplit): boolean {
  const bps = split.shadow?.mirrorBps ?? 0;
  return bps > 0 && b < bps;
}

/** Where one request goes. */
export interface Decision {
  /** Serves the request; its answer is shown to the user. */
  version: string;
  /**
   * True when a copy of the request should also go to `mirrorVersion`; that
   * answer is never shown (record it with role SHADOW and the same request
   * id, which is how the sidecar pairs the two).
   */
  mirror: boolean;
  mirrorVersion: string;
  /** The request's routing bucket in [0, 10000). */
  bucket: number;
  /** True when the lease ran out and the stable version answers instead of the split. */
  fallback: boolean;
}

export interface RouterOptions {
  /** Replaces Date.now (milliseconds), for tests of the lease. */
  now?: () => number;
}

/**
 * Decides which model version serves each request from the traffic split the
 * sidecar pushed last (SetTrafficSplit).
 *
 * Lease: while the sidecar is connected the split holds. After
 * `sidecarLost()`, once the split's `leaseSeconds` have passed without
 * `sidecarConnected()`, every request goes to the split's stable version and
 * nothing is mirrored, until the sidecar is back. A split with
 * `leaseSeconds` 0 never falls back.
 */
export class Router {
  /** Requests routed to the stable version because the lease ran out. */
  fallbacks = 0;
  private current: SetTrafficSplit | undefined;
  private lostAtMs: number | undefined;
  private readonly defaultVersion: string;
  private readonly now: () => number;

  /** Sends everything to `defaultVersion` until the first split arrives. */
  constructor(defaultVersion: string, options: RouterOptions = {}) {
    this.defaultVersion = defaultVersion;
    this.now = options.now ?? Date.now;
  }

  /**
   * Installs a copy of `split` unless a split of an equal or newer (non-zero)
   * revision is installed: splits are idempotent by revision. Returns whether
   * the split was installed.
   */
  apply(split: SetTrafficSplit): boolean {
    const cur = this.current;
    if (cur !== undefined && cur.revision !== 0 && split.revision <= cur.revision) {
      return false;
    }
    this.current = SetTrafficSplitCodec.fromPartial(split);
    return true;
  }

  /** Stops the lease clock: the split holds again. */
  sidecarConnected(): void {
    this.lostAtMs = undefined;
  }

  /** Starts the lease clock; a second call keeps the first time. */
  sidecarLost(): void {
    this.lostAtMs ??= this.now();
  }

  /** Whether the sidecar has been gone for longer than the installed split's lease. */
  get leaseExpired(): boolean {
    const split = this.current;
    const lost = this.lostAtMs;
    if (split === undefined || lost === undefined || split.leaseSeconds <= 0) {
      return false;
    }
    return this.now() - lost > split.leaseSeconds * 1000;
  }

  /** A copy of the installed split (undefined: none yet). */
  get split(): SetTrafficSplit | undefined {
    return this.current === undefined ? undefined : SetTrafficSplitCodec.fromPartial(this.current);
  }

  /** The revision of the installed split (0: none). */
  get revision(): number {
    return this.current?.revision ?? 0;
  }

  /** Decides where a request goes; see `stickyKey` for which id is used. */
  route(requestId: string, sessionId = "", userId = ""): Decision {
    const b = bucket(stickyKey(requestId, sessionId, userId));
    const split = this.current;
    if (split === undefined) {
      return { version: this.defaultVersion, mirror: false, mirrorVersion: "", bucket: b, fallback: false };
    }
    if (this.lostAtMs !== undefined && this.leaseExpired) {
      this.fallbacks++;
      return { version: fallbackVersion(split), mirror: false, mirrorVersion: "", bucket: b, fallback: true };
    }
    const mirror = mirrors(b, split);
    return {
      version: routeBucket(b, split),
      mirror,
      mirrorVersion: mirror ? (split.shadow?.version ?? "") : "",
      bucket: b,
      fallback: false,
    };
  }
}

/**
 * The version a split falls back to, when its weights do not cover a bucket
 * or its lease ran out: its stable_version, else its first route's version.
 */
export function fallbackVersion(split: SetTrafficSplit): string {
  return split.stableVersion || (split.routes[0]?.version ?? "");
}
