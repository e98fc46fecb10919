import assert from "node:assert/strict";
import { test } from "node:test";

import { validate, version } from "uuid";

import { newEventId } from "../src/index.js";

test("event ids are valid UUIDv7s, strictly increasing within the process", () => {
  let prev = newEventId();
  const seen = new Set<string>([prev]);
  // Many more ids than milliseconds pass: the sequence orders them within one.
  for (let i = 0; i < 50_000; i++) {
    const id = newEventId();
    assert.ok(id > prev, `${prev} then ${id}`);
    seen.add(id);
    prev = id;
  }
  assert.equal(seen.size, 50_001);
  assert.ok(validate(prev));
  assert.equal(version(prev), 7);
  const ms = parseInt(prev.slice(0, 8) + prev.slice(9, 13), 16);
  assert.ok(Math.abs(ms - Date.now()) < 60_000, "the id carries the current time");
});
