/**
 * The models kino knows by id: where each comes from, the job defaults that suit it, and for the
 * real models the architecture that `--random-weights` builds. A model can also be given as a
 * checkpoint folder (see resolve.ts); this catalog is only the named ones.
 */
import type { WanArchitecture } from "../protocol/engine.ts";
import { WAN21_T2V_14B, WAN21_T2V_1_3B, WAN_NEGATIVE_PROMPT } from "./wan21.ts";

/** Defaults of a job on a model, taken where the request leaves a field out. */
export interface JobDefaults {
  readonly width: number;
  readonly height: number;
  readonly frames: number;
  readonly steps: number;
  readonly guidance: number;
  /** Flow shift; null keeps the checkpoint scheduler's own. */
  readonly shift: number | null;
  readonly fps: number;
  readonly negativePrompt: string;
}

/** What sizes and frame counts a model accepts. */
export interface ShapeRules {
  /** Width and height must be multiples of this (VAE 8× × transformer patch 2). */
  readonly spatialMultiple: number;
  /** Frames must be `temporalMultiple·k + 1` (the VAE packs this many frames per latent after the first). */
  readonly temporalMultiple: number;
}

export interface CatalogModel {
  readonly id: string;
  readonly description: string;
  /** "hub": downloaded from the Hugging Face hub; "kino": made locally by `kino models make-tiny`. */
  readonly origin: "hub" | "kino";
  /** The hub repository, for origin "hub". */
  readonly hubRepo: string | null;
  readonly defaults: JobDefaults;
  readonly shape: ShapeRules;
  /** The full-size architecture, for `--random-weights`; null where there is none (tiny). */
  readonly architecture: WanArchitecture | null;
}

export const WAN21_SHAPE: ShapeRules = Object.freeze({ spatialMultiple: 16, temporalMultiple: 4 });

/** Wan 2.1 at 480p, per Wan's docs: 832×480, 81 frames at 16 fps, 50 steps, CFG 5, shift 3. */
export const WAN21_480P_DEFAULTS: JobDefaults = Object.freeze({
  width: 832,
  height: 480,
  frames: 81,
  steps: 50,
  guidance: 5.0,
  shift: 3.0,
  fps: 16,
  negativePrompt: WAN_NEGATIVE_PROMPT,
});

/**
 * kino's tiny model has random weights, so a small job is all it needs: it exercises every phase and
 * finishes in seconds on a CPU. Its scheduler keeps its own shift.
 */
export const TINY_DEFAULTS: JobDefaults = Object.freeze({
  width: 320,
  height: 192,
  frames: 17,
  steps: 10,
  guidance: 5.0,
  shift: null,
  fps: 16,
  negativePrompt: "",
});

export const TINY_ID = "tiny";
export const WAN21_1_3B_ID = "wan2.1-t2v-1.3b";
export const WAN21_14B_ID = "wan2.1-t2v-14b";

/** The file make-tiny writes into a tiny checkpoint: whatever it generates is noise. */
export const TINY_MARKER = "kino_tiny.json";

export const CATALOG: readonly CatalogModel[] = deepFreeze([
  {
    id: TINY_ID,
    description: "kino's tiny Wan 2.1 with random weights, for testing the pipeline: its videos are noise",
    origin: "kino",
    hubRepo: null,
    defaults: TINY_DEFAULTS,
    shape: WAN21_SHAPE,
    architecture: null,
  },
  {
    id: WAN21_1_3B_ID,
    description: "Wan 2.1 text-to-video 1.3B (480p)",
    origin: "hub",
    hubRepo: "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    defaults: WAN21_480P_DEFAULTS,
    shape: WAN21_SHAPE,
    architecture: WAN21_T2V_1_3B,
  },
  {
    id: WAN21_14B_ID,
    description: "Wan 2.1 text-to-video 14B (480p and 720p)",
    origin: "hub",
    hubRepo: "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    defaults: WAN21_480P_DEFAULTS,
    shape: WAN21_SHAPE,
    architecture: WAN21_T2V_14B,
  },
]);

export function findCatalogModel(id: string): CatalogModel | undefined {
  return CATALOG.find((m) => m.id === id);
}

export function catalogIds(): string[] {
  return CATALOG.map((m) => m.id);
}

function deepFreeze<T>(value: T): T {
  if (value !== null && typeof value === "object" && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const v of Object.values(value)) deepFreeze(v);
  }
  return value;
}
