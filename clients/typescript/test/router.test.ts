import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { SetTrafficSplit } from "../src/gen/atlas/sidecar/v1/control.js";
import { bucket, Router, stickyKey } from "../src/index.js";

interface RoutingVector {
  request_id: string;
  session_id: string;
  user_id: string;
  key: string;
  bucket: number;
  split: unknown;
  expected_version: string;
  mirror: boolean;
}

const vectorsPath = new URL("../../../testdata/routing_vectors.json", import.meta.url);
const vectors = (JSON.parse(readFileSync(vectorsPath, "utf8")) as { vectors: RoutingVector[] }).vectors;

test("the shared routing vectors", () => {
  assert.ok(vectors.length >= 200, `expected at least 200 vectors, got ${vectors.length}`);
  vectors.forEach((v, i) => {
    const split = SetTrafficSplit.fromJSON(v.split);
    assert.equal(stickyKey(v.request_id, v.session_id, v.user_id), v.key, `vector ${i}: key`);
    assert.equal(bucket(v.key), v.bucket, `vector ${i}: bucket`);
    const router = new Router("unused");
    assert.ok(router.apply(split), `vector ${i}: split refused`);
    const d = router.route(v.request_id, v.session_id, v.user_id);
    assert.equal(d.version, v.expected_version, `vector ${i}: version`);
    assert.equal(d.mirror, v.mirror, `vector ${i}: mirror`);
    assert.equal(d.bucket, v.bucket, `vector ${i}: decision bucket`);
    if (d.mirror) {
      assert.equal(d.mirrorVersion, split.shadow?.version, `vector ${i}: mirror version`);
    }
  });
});

function canarySplit(revision: number, leaseSeconds: number): SetTrafficSplit {
  return SetTrafficSplit.fromPartial({
    revision,
    routes: [{ version: "v2", weightBps: 10000 }], // everything to the candidate
    shadow: { version: "v3", mirrorBps: 10000 },
    leaseSeconds,
    stableVersion: "v1",
  });
}

test("the lease runs out: traffic falls back to the stable version", () => {
  let now = 1_700_000_000_000;
  const router = new Router("v0", { now: () => now });
  let d = router.route("req");
  assert.equal(d.version, "v0");
  assert.equal(d.fallback, false);
  router.apply(canarySplit(1, 30));
  now += 3600_000;
  d = router.route("req");
  assert.equal(d.version, "v2", "while connected the split holds, however long");
  assert.equal(d.mirror, true);
  assert.equal(d.mirrorVersion, "v3");
  router.sidecarLost();
  now += 20_000;
  router.sidecarLost(); // a second call keeps the first time
  now += 10_000;
  assert.equal(router.route("req").version, "v2", "the split holds until the lease's end");
  assert.equal(router.leaseExpired, false);
  now += 1000;
  d = router.route("req");
  assert.equal(d.version, "v1");
  assert.equal(d.fallback, true);
  assert.equal(d.mirror, false, "nothing is mirrored on fallback");
  assert.equal(router.leaseExpired, true);
  assert.equal(router.fallbacks, 1);
  router.sidecarConnected();
  d = router.route("req");
  assert.equal(d.version, "v2");
  assert.equal(d.fallback, false);
});

test("a split without a lease never falls back", () => {
  let now = 0;
  const router = new Router("v0", { now: () => now });
  router.apply(canarySplit(1, 0));
  router.sidecarLost();
  now += 1000 * 3600 * 1000;
  assert.equal(router.route("req").version, "v2");
});

test("without a stable version the fallback is the first route", () => {
  let now = 0;
  const router = new Router("v0", { now: () => now });
  router.apply(
    SetTrafficSplit.fromPartial({
      revision: 1,
      routes: [
        { version: "v4", weightBps: 0 },
        { version: "v5", weightBps: 10000 },
      ],
      leaseSeconds: 5,
    }),
  );
  router.sidecarLost();
  now += 6000;
  const d = router.route("req");
  assert.equal(d.version, "v4");
  assert.equal(d.fallback, true);
});

test("an older or equal revision is ignored, and the split is copied", () => {
  const router = new Router("v0");
  const split = canarySplit(5, 0);
  assert.ok(router.apply(split));
  split.routes[0].version = "mutated";
  for (const revision of [4, 5]) {
    const other = SetTrafficSplit.fromPartial({ revision, routes: [{ version: "old", weightBps: 10000 }] });
    assert.equal(router.apply(other), false, `revision ${revision} applied over 5`);
  }
  assert.equal(router.revision, 5);
  assert.equal(router.route("req").version, "v2");
  assert.ok(router.apply(canarySplit(6, 0)));
  assert.equal(router.revision, 6);
});
