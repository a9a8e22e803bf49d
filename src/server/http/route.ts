/**
 * Routes declared once, with zod schemas: `RouteTable.add` registers a route with fastify (parsing
 * its params, query and body with the schemas, errors naming the field) and keeps its description
 * for the OpenAPI document (openapi.ts). A route cannot be served without being documented, or the
 * other way round.
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from "fastify";
import type { z } from "zod";
import { parseInput } from "./validate.ts";

declare module "fastify" {
  interface FastifyContextConfig {
    /** Answers without the API key (the OpenAPI document). */
    public?: boolean;
  }
}

export interface RouteResponse {
  readonly description: string;
  readonly schema?: z.ZodType;
  /** @default "application/json" */
  readonly contentType?: string;
}

/** A request header the route reads, for the documentation. */
export interface RouteHeader {
  readonly name: string;
  readonly description: string;
}

export interface RouteDoc {
  readonly method: "GET" | "POST" | "DELETE";
  /** fastify's syntax: /api/jobs/:id */
  readonly url: string;
  readonly operationId: string;
  readonly summary: string;
  readonly description?: string;
  readonly tags: readonly string[];
  readonly params?: z.ZodType;
  readonly query?: z.ZodType;
  readonly body?: z.ZodType;
  /** The body's media types, for the documentation. @default ["application/json"] */
  readonly bodyTypes?: readonly string[];
  readonly headers?: readonly RouteHeader[];
  /** By status code. */
  readonly responses: Readonly<Record<number, RouteResponse>>;
  /** Whether the route answers without the API key. @default false */
  readonly public?: boolean;
}

export interface RouteInput<P extends z.ZodType, Q extends z.ZodType, B extends z.ZodType> {
  readonly params: z.output<P>;
  readonly query: z.output<Q>;
  readonly body: z.output<B>;
}

export interface RouteSpec<P extends z.ZodType, Q extends z.ZodType, B extends z.ZodType> extends RouteDoc {
  readonly params?: P;
  readonly query?: Q;
  readonly body?: B;
  /** Its return value is sent as JSON (unless it used `reply` itself). */
  readonly handler: (input: RouteInput<P, Q, B>, request: FastifyRequest, reply: FastifyReply) => Promise<unknown>;
}

export class RouteTable {
  readonly #routes: RouteDoc[] = [];

  get routes(): readonly RouteDoc[] {
    return this.#routes;
  }

  add<P extends z.ZodType = z.ZodUndefined, Q extends z.ZodType = z.ZodUndefined, B extends z.ZodType = z.ZodUndefined>(
    app: FastifyInstance,
    spec: RouteSpec<P, Q, B>,
  ): void {
    const { handler, ...doc } = spec;
    this.#routes.push(doc);
    app.route({
      method: spec.method,
      url: spec.url,
      config: { public: spec.public ?? false },
      handler: async (request, reply) => {
        const input = {
          params: spec.params === undefined ? undefined : parseInput(spec.params, request.params, "params"),
          query: spec.query === undefined ? undefined : parseInput(spec.query, request.query, "query"),
          body: spec.body === undefined ? undefined : parseInput(spec.body, request.body, "body"),
        } as RouteInput<P, Q, B>;
        return handler(input, request, reply);
      },
    });
  }
}
