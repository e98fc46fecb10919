/**
 * The TypeScript client of atlas-sidecar: an EventStream that reports
 * inferences and feedback without blocking the caller, and a Router that
 * applies the traffic split the sidecar pushes, with the same routing rule as
 * every other language's client. The generated messages and gRPC clients are
 * re-exported one namespace per proto file (`events`, `ingest`, `admin`,
 * `control`, `activeLearning`).
 */
export {
  type DropPolicy,
  EventStream,
  type EventStreamOptions,
  type EventStreamStats,
  newEventId,
} from "./events.js";
export {
  BUCKETS,
  bucket,
  type Decision,
  fallbackVersion,
  mirrors,
  routeBucket,
  Router,
  type RouterOptions,
  stickyKey,
} from "./router.js";
export {
  type ChannelSecurity,
  channelSecurity,
  resolveToken,
  type SecurityOptions,
  TOKEN_ENV,
  type TlsOptions,
} from "./security.js";
export * as activeLearning from "./gen/atlas/sidecar/v1/active_learning.js";
export * as admin from "./gen/atlas/sidecar/v1/admin.js";
export * as control from "./gen/atlas/sidecar/v1/control.js";
export * as events from "./gen/atlas/sidecar/v1/events.js";
export * as ingest from "./gen/atlas/sidecar/v1/ingest.js";
