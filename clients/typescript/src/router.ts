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
  if (split.stableVersion) {
    return split.stableVersion;
  }
  return split.routes.length > 0 ? split.routes[0].version : "";
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
   * answer is never shown (record it with role SHADOW).
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
 * A split with `leaseSeconds > 0` holds only while the sidecar is heard from:
 * every `apply` and `renew` extends the lease; once it has run out the router
 * sends all traffic to the stable version and mirrors nothing, until the
 * sidecar is back.
 */
export class Router {
  private split: SetTrafficSplit | undefined;
  private heardMs = 0;
  private fallbackVersion: string;
  private readonly now: () => number;

  /** Sends everything to `defaultVersion` until the first split arrives. */
  constructor(defaultVersion: string, options: RouterOptions = {}) {
    this.fallbackVersion = defaultVersion;
    this.now = options.now ?? Date.now;
  }

  /**
   * Installs a split (copied) and renews the lease. A split whose revision is
   * older than the installed one is ignored and `apply` returns false; the
   * same revision again only renews the lease.
   */
  apply(split: SetTrafficSplit): boolean {
    const next = SetTrafficSplitCodec.fromPartial(split);
    if (this.split !== undefined && next.revision < this.split.revision) {
      return false;
    }
    this.split = next;
    this.heardMs = this.now();
    const stable = stableOf(next);
    if (stable) {
      this.fallbackVersion = stable;
    }
    return true;
  }

  /** Records that the sidecar was heard from, extending the current split's lease. */
  renew(): void {
    this.heardMs = this.now();
  }

  /** The revision of the installed split (0: none). */
  get revision(): number {
    return this.split?.revision ?? 0;
  }

  /** The version served when the lease runs out. */
  get stableVersion(): string {
    return this.fallbackVersion;
  }

  /** Decides where a request goes; see `stickyKey` for which id is used. */
  route(requestId: string, sessionId = "", userId = ""): Decision {
    const b = bucket(stickyKey(requestId, sessionId, userId));
    const split = this.split;
    const decision: Decision = {
      version: this.fallbackVersion,
      mirror: false,
      mirrorVersion: "",
      bucket: b,
      fallback: false,
    };
    if (split === undefined) {
      return decision;
    }
    if (split.leaseSeconds > 0 && this.now() - this.heardMs > split.leaseSeconds * 1000) {
      decision.fallback = true;
      return decision;
    }
    decision.version = routeBucket(b, split);
    if (mirrors(b, split)) {
      decision.mirror = true;
      decision.mirrorVersion = split.shadow?.version ?? "";
    }
    return decision;
  }
}

/** A split's fallback: its stable_version, else its first weighted route, else its first route. */
function stableOf(split: SetTrafficSplit): string {
  if (split.stableVersion) {
    return split.stableVersion;
  }
  const weighted = split.routes.find((r) => r.weightBps > 0);
  return weighted?.version ?? split.routes[0]?.version ?? "";
}
