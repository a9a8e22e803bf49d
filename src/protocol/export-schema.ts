/**
 * Exports the engine protocol's zod schemas as JSON Schema. The export is checked in at
 * src/protocol/engine.schema.json; the engine's Python tests validate messages against it, and a
 * TypeScript test fails when the checked-in copy drifts from the schemas.
 * Run `npm run schema` after changing engine.ts.
 */
import { writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { z } from "zod";
import { EngineMessage, EngineRequest, PROTOCOL_VERSION, ResultFor } from "./engine.ts";

export const SCHEMA_PATH = fileURLToPath(new URL("../../../src/protocol/engine.schema.json", import.meta.url));

/** The protocol as one JSON document: requests, messages, and the result of each request type. */
export function protocolJsonSchema(): Record<string, unknown> {
  const json = (s: z.ZodType) => z.toJSONSchema(s, { target: "draft-2020-12", io: "input" });
  return {
    title: "kino engine protocol",
    protocol: PROTOCOL_VERSION,
    request: json(EngineRequest),
    message: json(EngineMessage),
    results: Object.fromEntries(Object.entries(ResultFor).map(([k, s]) => [k, json(s)])),
  };
}

export function protocolJsonText(): string {
  return JSON.stringify(protocolJsonSchema(), null, 2) + "\n";
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  writeFileSync(SCHEMA_PATH, protocolJsonText());
  console.log(`wrote ${SCHEMA_PATH}`);
}
