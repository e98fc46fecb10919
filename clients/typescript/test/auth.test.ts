import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { status as grpcStatus, type ServiceError } from "@grpc/grpc-js";

import { channelSecurity, EventStream, resolveToken, type SecurityOptions, TOKEN_ENV } from "../src/index.js";
import { Daemon, INGEST_TOKEN, producer, READ_TOKEN } from "./daemon.js";

async function waitFor(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting for ${what}`);
    }
    await sleep(10);
  }
}

/** Runs `fn` with ATLAS_SIDECAR_TOKEN set to `value` (undefined: unset), then puts it back. */
async function withTokenEnv<T>(value: string | undefined, fn: () => Promise<T>): Promise<T> {
  const before = process.env[TOKEN_ENV];
  if (value === undefined) {
    delete process.env[TOKEN_ENV];
  } else {
    process.env[TOKEN_ENV] = value;
  }
  try {
    return await fn();
  } finally {
    if (before === undefined) {
      delete process.env[TOKEN_ENV];
    } else {
      process.env[TOKEN_ENV] = before;
    }
  }
}

const REFUSED = "the sidecar refused this client";

function record(stream: EventStream, n: number, prefix: string): void {
  for (let i = 0; i < n; i++) {
    stream.recordInference({ requestId: `${prefix}-${i}`, modelVersion: "v1", response: "x" });
  }
}

async function statusError(daemon: Daemon, security: SecurityOptions): Promise<number | undefined> {
  try {
    await daemon.statusWith(security);
    return undefined;
  } catch (err) {
    return (err as ServiceError).code;
  }
}

const refusals = [
  { name: "no token", token: undefined, listed: [], code: "UNAUTHENTICATED" },
  { name: "an unknown token", token: "atls_not-listed-yet", listed: [], code: "UNAUTHENTICATED" },
  {
    name: "a token without the ingest role",
    token: "atls_reader-only",
    listed: [producer("atls_reader-only", ["read"])],
    code: "PERMISSION_DENIED",
  },
] as const;

for (const tc of refusals) {
  test(`refused with ${tc.name}: logged once, events kept, delivered once the token is listed`, async (t) => {
    const daemon = await Daemon.create();
    t.after(() => daemon.dispose());
    daemon.enableAuth(...tc.listed);
    await daemon.start();
    const logs: string[] = [];
    const stream = await withTokenEnv(undefined, async () =>
      new EventStream(daemon.target, {
        token: tc.token,
        batchSize: 5,
        backoffInitialMs: 10,
        backoffMaxMs: 100,
        log: (m) => logs.push(m),
      }),
    );
    t.after(() => stream.close(100));

    record(stream, 12, "r");
    // Refused again and again: the events stay queued, the log has it once.
    await waitFor("three refusals", () => stream.stats.reconnects >= 3);
    assert.match(stream.stats.lastError, new RegExp(`^${tc.code}: `));
    assert.equal(stream.pending, 12);
    assert.equal(stream.stats.ackedEvents, 0);
    assert.equal(stream.stats.dropped, 0);
    assert.equal(stream.stats.rejected, 0);
    assert.equal(logs.filter((m) => m.includes(REFUSED)).length, 1, logs.join("\n"));
    assert.match(logs[0], new RegExp(tc.code));
    assert.equal((await daemon.status()).events?.accepted ?? 0, 0);

    if (tc.token === undefined) {
      // Nothing to list: the events are still undelivered at close.
      assert.equal(await stream.close(100), false);
      assert.equal(stream.stats.dropped, 12);
      return;
    }
    // The fix: the token listed with the ingest role. The same stream
    // delivers what it kept.
    daemon.writeTokens(producer(tc.token));
    assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
    assert.equal(stream.stats.accepted, 12);
    assert.equal(stream.stats.dropped, 0);
    assert.equal((await daemon.status()).events?.accepted, 12);
    assert.equal(logs.filter((m) => m.includes(REFUSED)).length, 1, "still logged once");
  });
}

test("after an ack, a new refusal is logged again", async (t) => {
  const daemon = await Daemon.create();
  t.after(() => daemon.dispose());
  daemon.env = { ATLAS_SIDECAR__INGEST__STREAM_IDLE_SECONDS: "0.3" };
  daemon.enableAuth();
  await daemon.start();
  const logs: string[] = [];
  const stream = new EventStream(daemon.target, {
    token: INGEST_TOKEN,
    backoffInitialMs: 10,
    backoffMaxMs: 100,
    log: (m) => logs.push(m),
  });
  t.after(() => stream.close(100));
  const logged = (): number => logs.filter((m) => m.includes(REFUSED)).length;

  record(stream, 3, "a");
  await waitFor("a refusal", () => logged() === 1);
  daemon.writeTokens(producer(INGEST_TOKEN));
  assert.ok(await stream.flush(30_000));

  daemon.writeTokens(); // the token is revoked
  // The stream was let in before; wait for the sidecar to end it as idle.
  await waitFor("the idle stream to end", () => stream.stats.lastError.startsWith("UNAVAILABLE"));
  record(stream, 2, "b");
  await waitFor("the second refusal to be logged", () => logged() === 2);
  assert.equal(stream.stats.accepted, 3);
  assert.equal(stream.pending, 2);
  daemon.writeTokens(producer(INGEST_TOKEN));
  assert.ok(await stream.flush(30_000));
  assert.equal((await daemon.status()).events?.accepted, 5);
});

test("the token comes from ATLAS_SIDECAR_TOKEN; channelSecurity serves any stub", async (t) => {
  const daemon = await Daemon.create();
  t.after(() => daemon.dispose());
  daemon.enableAuth(producer(INGEST_TOKEN));
  await daemon.start();

  await withTokenEnv(INGEST_TOKEN, async () => {
    const stream = new EventStream(daemon.target);
    t.after(() => stream.close(100));
    record(stream, 7, "env");
    assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
    assert.equal((await daemon.status()).events?.accepted, 7);
    // The environment's ingest token has no read role.
    assert.equal(await statusError(daemon, {}), grpcStatus.PERMISSION_DENIED);
  });
  assert.equal(await statusError(daemon, { token: READ_TOKEN }), undefined);
  await withTokenEnv(undefined, async () => {
    assert.equal(await statusError(daemon, {}), grpcStatus.UNAUTHENTICATED);
  });
});

test("security options", async () => {
  await withTokenEnv("  from-env\n", async () => {
    assert.equal(resolveToken(), "from-env");
    assert.equal(resolveToken("given"), "given");
    assert.equal(resolveToken(""), undefined, "an empty token means none");
    assert.equal(channelSecurity().metadata().get("authorization")[0], "Bearer from-env");
  });
  await withTokenEnv(undefined, async () => {
    assert.deepEqual(channelSecurity().metadata().get("authorization"), []);
  });
  assert.throws(() => channelSecurity({ tls: { cert: "x" } }), /together/);
  assert.throws(() => channelSecurity({ tls: { caFile: "/does/not/exist" } }), /caFile/);
  assert.throws(() => new EventStream("127.0.0.1:1", { tls: { keyFile: "/does/not/exist" } }), /keyFile/);
});

test("TLS: the CA's client connects and delivers, others fail the handshake", async (t) => {
  const daemon = await Daemon.create();
  t.after(() => daemon.dispose());
  const f = daemon.enableTls(false);
  daemon.enableAuth(producer(INGEST_TOKEN));
  await daemon.start();

  const stream = new EventStream(daemon.target, { token: INGEST_TOKEN, tls: { caFile: f.ca } });
  t.after(() => stream.close(100));
  record(stream, 9, "tls");
  assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
  assert.equal((await daemon.status()).events?.accepted, 9);
  // The CA by content, and localhost (also on the certificate) as the name.
  assert.equal(
    await statusError(daemon, { token: READ_TOKEN, tls: { ca: readFileSync(f.ca), serverName: "localhost" } }),
    undefined,
  );

  for (const [name, tls] of [
    ["plaintext", undefined],
    ["another CA", { caFile: f.otherCa }],
    ["the wrong name", { caFile: f.ca, serverName: "sidecar.example" }],
  ] as const) {
    assert.equal(await statusError(daemon, { token: READ_TOKEN, tls }), grpcStatus.UNAVAILABLE, name);
  }
});

test("mutual TLS: a client certificate the CA signed is let in, none is not", async (t) => {
  const daemon = await Daemon.create();
  t.after(() => daemon.dispose());
  const f = daemon.enableTls(true);
  daemon.enableAuth(producer(INGEST_TOKEN));
  await daemon.start();

  const stream = new EventStream(daemon.target, {
    token: INGEST_TOKEN,
    tls: { caFile: f.ca, certFile: f.clientCert, keyFile: f.clientKey },
  });
  t.after(() => stream.close(100));
  record(stream, 4, "mtls");
  assert.ok(await stream.flush(30_000), `flush timed out: ${JSON.stringify(stream.stats)}`);
  assert.equal((await daemon.status()).events?.accepted, 4);

  assert.equal(await statusError(daemon, { token: READ_TOKEN, tls: { caFile: f.ca } }), grpcStatus.UNAVAILABLE);
});
