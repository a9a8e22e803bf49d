/** The checked-in JSON Schema (which the Python engine's tests validate against) matches the zod schemas. */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { protocolJsonText, SCHEMA_PATH } from "../src/protocol/export-schema.ts";

test("src/protocol/engine.schema.json equals the export of protocol/engine.ts (run npm run schema after changing it)", () => {
  assert.equal(readFileSync(SCHEMA_PATH, "utf8"), protocolJsonText());
});
