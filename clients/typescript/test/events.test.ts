import assert from "node:assert/strict";
import { before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { Role, Signal } from "../src/gen/atlas/sidecar/v1/events.js";
import { EventStream } from "../src/index.js";
import { Daemon, freePort, INGEST_TOKEN, producer as producerEntry } from "./daemon.js";

const UUID7 = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

async function waitFor(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await sleep(5);
  }
}

// Auth is on, as in production: the stream sends an ingest token, and
// daemon.status() asks with a read token.
test("events reach the real daemon, which counts each once", async (t) => {
  const daemon = await Daemon.create();
  t.after(() => daemon.dispose());
  daemon.enableAuth(producerEntry(INGEST_TOKEN));
  await daemon.start();
  const stream = new EventStream(daemon.target, { batchSize: 50, token: INGEST_TOKEN });
  t.after(() => stream.close());

  const ids: string[] = [];
  const total = 1000;
  for (let i = 0; i < total; i++) {
    if (i % 2 === 0) {
      ids.push(
        stream.recordInference({
          requestId: `req-${i}`,
          modelVersion: "v1",
          role: Role.PRIMARY,
          prompt: "hi",
          response: "hello",
          latencyMs: 12.5,
          sessionId: `sess-${i % 7}`,
        }),
      );
    } else {
      // A rating of 0 is a rating.
      ids.push(stream.recordFeedback({ requestId: `req-${i - 1}`, signal: Signal.COPY, rating: 0 }));
    }
  }
  assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);

  ids.forEach((id, i) => {
    assert.match(id, UUID7);
    if (i > 0) {
      assert.ok(id > ids[i - 1], `ids not increasing: ${ids[i - 1]} then ${id}`);
    }
  });
  assert.equal(stream.stats.recorded, total);
  assert.equal(stream.stats.accepted, total);
  assert.equal(stream.stats.dropped, 0);
  assert.equal(stream.stats.rejected, 0);
  let st = await daemon.status();
  assert.deepEqual(st.events, { accepted: total, duplicates: 0, rejected: 0 });

  // An event the sidecar refuses is counted; the rest of its batch is stored.
  stream.recordInference({ requestId: "", modelVersion: "v1" }); // request_id is required
  stream.recordInference({ requestId: "ok", modelVersion: "v1" });
  assert.ok(await stream.flush(30_000));
  assert.equal(stream.stats.rejected, 1);
  assert.equal(stream.stats.accepted, total + 1);
  st = await daemon.status();
  assert.deepEqual(st.events, { accepted: total + 1, duplicates: 0, rejected: 1 });

  assert.equal(await stream.close(), true);
  assert.equal(await stream.close(), true, "close twice");
});

test("after the daemon is killed and restarted, unacked batches are resent and stored exactly once", async (t) => {
  const daemon = await Daemon.create();
  t.after(() => daemon.dispose());
  daemon.enableAuth(producerEntry(INGEST_TOKEN));
  await daemon.start();
  const stream = new EventStream(daemon.target, {
    token: INGEST_TOKEN,
    batchSize: 20,
    backoffInitialMs: 20,
    backoffMaxMs: 200,
  });
  t.after(() => stream.close());

  let produced = 0;
  let producing = true;
  const producer = (async () => {
    while (producing) {
      for (let i = 0; i < 20; i++) {
        stream.recordInference({ requestId: `r${produced}`, modelVersion: "v1", response: "x" });
        produced++;
      }
      await sleep(1);
    }
  })();

  for (let round = 0; round < 2; round++) {
    const target = stream.stats.ackedEvents + 200;
    await waitFor("acks before the crash", () => stream.stats.ackedEvents >= target);
    await daemon.kill();
    await sleep(50); // events keep coming while it is down
    await daemon.start();
  }
  const target = stream.stats.ackedEvents + 200;
  await waitFor("acks after the restart", () => stream.stats.ackedEvents >= target);
  producing = false;
  await producer;
  assert.ok(await stream.flush(60_000), `flush timed out: ${JSON.stringify(stream.stats)}`);

  assert.equal(stream.stats.dropped, 0);
  assert.ok(stream.stats.reconnects > 0);
  assert.equal(stream.stats.ackedEvents, produced);
  const st = await daemon.status();
  assert.equal(st.events?.accepted, produced, `each of ${produced} events stored exactly once`);
});

let downTarget = "";
before(async () => {
  downTarget = `127.0.0.1:${await freePort()}`;
});

for (const dropPolicy of ["drop_newest", "drop_oldest"] as const) {
  test(`without a sidecar the queue stays bounded (${dropPolicy})`, async () => {
    const stream = new EventStream(downTarget, { maxQueue: 100, batchSize: 10, maxInflightBatches: 2, dropPolicy });
    for (let i = 0; i < 1000; i++) {
      stream.recordFeedback({ requestId: "r", signal: Signal.ENGAGE });
    }
    // Nothing has left the caller's turn of the event loop yet: the queue holds 100.
    assert.equal(stream.stats.recorded, 1000);
    assert.equal(stream.stats.dropped, 900);
    assert.equal(stream.pending, 100);
    await sleep(50);
    assert.ok(stream.pending <= 100, "nothing is added while the sidecar is away");
    assert.equal(await stream.close(100), false, "close reports undelivered events");
    assert.equal(stream.stats.dropped, 1000);
  });
}

test("bad options name the option", () => {
  assert.throws(() => new EventStream("127.0.0.1:1", { batchSize: 0 }), /batchSize/);
  assert.throws(
    () => new EventStream("127.0.0.1:1", { dropPolicy: "drop_all" as "drop_newest" }),
    /dropPolicy/,
  );
});
