import assert from "node:assert/strict";
import { test } from "node:test";

import { EventStream } from "../src/index.js";
import { Daemon } from "./daemon.js";

test("batches are cut at the cap", async (t) => {
  const daemon = await Daemon.create();
  daemon.env = { ATLAS_SIDECAR__INGEST__MAX_EVENTS_PER_BATCH: "50" };
  t.after(() => daemon.dispose());
  await daemon.start();
  const stream = new EventStream(daemon.target, { batchSize: 1000, maxEventsPerBatch: 50 });
  t.after(() => stream.close());
  for (let i = 0; i < 120; i++) {
    stream.recordInference({ requestId: `r${i}`, modelVersion: "v1" });
  }
  assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
  assert.equal(stream.stats.accepted, 120);
  assert.equal(stream.stats.rejectedBatches, 0);
  assert.equal(Number((await daemon.status()).events?.accepted), 120);
});

test("a batch refused whole is counted and not resent", async (t) => {
  const daemon = await Daemon.create();
  daemon.env = { ATLAS_SIDECAR__INGEST__MAX_EVENTS_PER_BATCH: "5" };
  t.after(() => daemon.dispose());
  await daemon.start();
  // A client set above the daemon's cap: its 10-event batch is refused.
  const stream = new EventStream(daemon.target, { batchSize: 10, maxEventsPerBatch: 10, lingerMs: 60_000 });
  t.after(() => stream.close());
  for (let i = 0; i < 10; i++) {
    stream.recordInference({ requestId: `big${i}`, modelVersion: "v1" });
  }
  // Resending it forever would never flush.
  assert.ok(await stream.flush(15_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
  assert.equal(stream.stats.rejected, 10);
  assert.equal(stream.stats.rejectedBatches, 1);
  assert.match(stream.stats.lastError, /ingest\.max_events_per_batch/);
  for (let i = 0; i < 3; i++) {
    stream.recordInference({ requestId: `small${i}`, modelVersion: "v1" });
  }
  assert.ok(await stream.flush(15_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
  assert.equal(stream.stats.accepted, 3);
  assert.equal(Number((await daemon.status()).events?.accepted), 3);
});

test("rejections counted but not listed in an ack are counted", async (t) => {
  const daemon = await Daemon.create();
  daemon.env = { ATLAS_SIDECAR__INGEST__MAX_REJECTIONS_PER_ACK: "2" };
  t.after(() => daemon.dispose());
  await daemon.start();
  const stream = new EventStream(daemon.target);
  t.after(() => stream.close());
  for (let i = 0; i < 5; i++) {
    stream.recordInference({ requestId: "", modelVersion: "v1" }); // request_id is required
  }
  stream.recordInference({ requestId: "ok", modelVersion: "v1" });
  assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
  assert.equal(stream.stats.accepted, 1);
  assert.equal(stream.stats.rejected, 5);
  assert.equal(stream.stats.rejectedBatches, 0);
});
