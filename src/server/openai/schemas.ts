/**
 * The OpenAI Videos API's shapes as kino answers them (the `openai` npm package's
 * resources/videos.d.ts is the reference): the create body, the video object, the list page, the
 * deletion answer and the error body. kino's own fields in a create body are the few extensions
 * below (seed, steps, guidance, negative_prompt); everything else OpenAI defines keeps its name.
 */
import { z } from "zod";
import { JobId, MAX_PROMPT_CHARS } from "../schemas.ts";

/** Multipart fields arrive as text: numbers are read from strings, and must be whole strings of digits. */
const number = (description: string) =>
  z
    .preprocess((v) => (typeof v === "string" && /^-?\d+(\.\d+)?$/.test(v.trim()) ? Number(v) : v), z.number({ error: "must be a number" }))
    .optional()
    .meta({ description });

export const VideoCreateBody = z
  .strictObject({
    prompt: z.string().max(MAX_PROMPT_CHARS, `is longer than ${MAX_PROMPT_CHARS} characters (the text encoder reads 512 tokens); shorten it`),
    model: z.string().min(1).max(200).optional().meta({ description: "A kino model id (GET /api/models) or auto; OpenAI's names (sora-2 …) are refused. Default auto." }),
    size: z.string().max(32).optional().meta({ description: "WIDTHxHEIGHT, both multiples of 16; default the model's (832x480).", examples: ["832x480"] }),
    seconds: z
      .union([z.string().max(16), z.number()])
      .optional()
      .meta({ description: "Clip length; frames = seconds × the model's fps (16), rounded to the nearest 4k+1. Default the model's (81 frames)." }),
    input_reference: z.unknown().optional().meta({ description: "Not supported: kino's models are text-to-video." }),
    negative_prompt: z.string().max(MAX_PROMPT_CHARS).optional().meta({ description: "kino extension: what to steer away from." }),
    seed: number("kino extension: 0 to 2^32-1; default random."),
    steps: number("kino extension: denoising steps; default the model's (50, tiny 10)."),
    guidance: number("kino extension: classifier-free guidance scale; default 5."),
  })
  .meta({ id: "OpenAIVideoCreate" });
export type VideoCreateBody = z.output<typeof VideoCreateBody>;

export const VideoStatus = z.enum(["queued", "in_progress", "completed", "failed"]);
export type VideoStatus = z.infer<typeof VideoStatus>;

export const Video = z
  .object({
    /** kino's job id: the same job answers at /api/jobs/{id}. */
    id: JobId,
    object: z.literal("video"),
    /** Unix seconds. */
    created_at: z.number().int(),
    completed_at: z.number().int().nullable(),
    /** Videos stay until deleted. */
    expires_at: z.null(),
    status: VideoStatus,
    /** 0 to 100. */
    progress: z.number().int().min(0).max(100),
    model: z.string(),
    prompt: z.string().nullable(),
    remixed_from_video_id: z.null(),
    /** The clip's length as generated (frames / fps), e.g. "5.06" for 81 frames at 16 fps. */
    seconds: z.string(),
    size: z.string(),
    error: z.object({ code: z.string(), message: z.string() }).nullable(),
  })
  .meta({ id: "OpenAIVideo" });
export type Video = z.infer<typeof Video>;

export const VideoList = z
  .object({
    object: z.literal("list"),
    data: z.array(Video),
    first_id: z.string().nullable(),
    last_id: z.string().nullable(),
    has_more: z.boolean(),
  })
  .meta({ id: "OpenAIVideoList" });

export const VideoListQuery = z.strictObject({
  limit: z.coerce.number().int().min(1).max(100).default(20),
  /** The id of the last video of the previous page. */
  after: JobId.optional(),
  order: z.enum(["asc", "desc"]).default("desc"),
});

export const VideoDeleted = z.object({ id: JobId, object: z.literal("video.deleted"), deleted: z.literal(true) }).meta({ id: "OpenAIVideoDeleted" });

export const ContentQuery = z.strictObject({
  variant: z.enum(["video", "thumbnail", "spritesheet"]).default("video"),
});

/** OpenAI's error body; `code` is kino's error code, `param` the field at fault. */
export const OpenAIErrorBody = z
  .object({ error: z.object({ message: z.string(), type: z.string(), param: z.string().nullable(), code: z.string() }) })
  .meta({ id: "OpenAIError" });
