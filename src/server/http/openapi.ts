/**
 * The OpenAPI 3.1 document of the routes in a RouteTable, generated from their zod schemas with
 * `z.toJSONSchema` (OpenAPI 3.1 schemas are JSON Schema 2020-12). Schemas named with `.meta({id})`
 * become components; nothing is written by hand but the route's words.
 */
import { z } from "zod";
import type { RouteDoc } from "./route.ts";

type Json = Record<string, unknown>;

export interface OpenApiInfo {
  readonly title: string;
  readonly version: string;
  readonly description: string;
}

export function openApiDocument(routes: readonly RouteDoc[], info: OpenApiInfo): Json {
  const components: Record<string, Json> = {};
  const schemaOf = (schema: z.ZodType, io: "input" | "output") => liftDefs(convert(schema, io), components, io);
  const paths: Record<string, Json> = {};
  for (const route of routes) {
    const parameters: Json[] = [
      ...objectParameters(route.params, "path", schemaOf),
      ...objectParameters(route.query, "query", schemaOf),
      ...(route.headers ?? []).map((h) => ({ name: h.name, in: "header", required: false, description: h.description, schema: { type: "string" } })),
    ];
    const responses: Json = {};
    for (const [status, r] of Object.entries(route.responses)) {
      responses[status] = {
        description: r.description,
        ...(r.schema === undefined && r.contentType === undefined
          ? {}
          : { content: { [r.contentType ?? "application/json"]: r.schema === undefined ? {} : { schema: schemaOf(r.schema, "output") } } }),
      };
    }
    const operation: Json = {
      operationId: route.operationId,
      summary: route.summary,
      ...(route.description === undefined ? {} : { description: route.description }),
      tags: route.tags,
      ...(parameters.length > 0 ? { parameters } : {}),
      ...(route.body === undefined ? {} : { requestBody: { required: true, content: bodyContent(route.body, route.bodyTypes, schemaOf) } }),
      responses,
      ...(route.public === true ? { security: [] } : {}),
    };
    const path = route.url.replace(/:(\w+)/g, "{$1}");
    paths[path] = { ...paths[path], [route.method.toLowerCase()]: operation };
  }
  return {
    openapi: "3.1.0",
    info,
    paths,
    components: {
      schemas: components,
      securitySchemes: { bearer: { type: "http", scheme: "bearer", description: "Required when the server has an API key." } },
    },
    security: [{ bearer: [] }],
  };
}

function bodyContent(body: z.ZodType, types: readonly string[] | undefined, schemaOf: (s: z.ZodType, io: "input") => Json): Json {
  const schema = schemaOf(body, "input");
  return Object.fromEntries((types ?? ["application/json"]).map((type) => [type, { schema }]));
}

function convert(schema: z.ZodType, io: "input" | "output"): Json {
  const { $schema: _, ...json } = z.toJSONSchema(schema, { target: "draft-2020-12", io, unrepresentable: "any" }) as Json;
  return json;
}

/**
 * Moves `$defs` into the document's components and points the references there. Should one id have
 * different input and output forms (a default makes a field optional on input), the form met second
 * is kept apart, suffixed "Input" or "Output".
 */
function liftDefs(json: Json, components: Record<string, Json>, io: "input" | "output"): Json {
  const defs = (json.$defs ?? {}) as Record<string, Json>;
  delete json.$defs;
  const names = new Map<string, string>();
  for (const [id, def] of Object.entries(defs)) {
    const existing = components[id];
    const same = existing === undefined || sameJson(existing, rewriteRefs(def, (ref) => ref));
    names.set(id, same ? id : `${id}${io === "input" ? "Input" : "Output"}`);
  }
  const name = (ref: string) => names.get(ref) ?? ref;
  for (const [id, def] of Object.entries(defs)) components[name(id)] ??= rewriteRefs(def, name) as Json;
  return rewriteRefs(json, name) as Json;
}

/** Points `#/$defs/X` references at `#/components/schemas/<name(X)>`. */
function rewriteRefs(value: unknown, name: (id: string) => string): unknown {
  if (Array.isArray(value)) return value.map((v) => rewriteRefs(v, name));
  if (value === null || typeof value !== "object") return value;
  const out: Json = {};
  for (const [k, v] of Object.entries(value)) {
    const isDefRef = k === "$ref" && typeof v === "string" && v.startsWith("#/$defs/");
    out[k] = isDefRef ? `#/components/schemas/${name((v as string).slice("#/$defs/".length))}` : rewriteRefs(v, name);
  }
  return out;
}

function sameJson(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

function objectParameters(schema: z.ZodType | undefined, where: "path" | "query", schemaOf: (s: z.ZodType, io: "input") => Json): Json[] {
  if (schema === undefined) return [];
  const json = schemaOf(schema, "input");
  const required = new Set((json.required ?? []) as string[]);
  return Object.entries((json.properties ?? {}) as Record<string, Json>).map(([name, s]) => ({
    name,
    in: where,
    required: where === "path" || required.has(name),
    schema: s,
  }));
}
