/**
 * What the planner knows about a machine: named presets, so plans can be made and tested without a
 * GPU, or the engine's measurement of this one (the `probe` request, cached per GPU: probe-cache.ts).
 */

export const GiB = 2 ** 30;

export interface HardwareProfile {
  readonly name: string;
  /** Bytes of device memory in all, and free when the engine starts. */
  readonly vramTotal: number;
  readonly vramFree: number;
  /** Bytes of host memory. */
  readonly hostRam: number;
  /** Bytes of host memory that may be page-locked (pinned) for fast copies. */
  readonly pinnedLimit: number;
  /** Host-to-device and device-to-host copy rates from pinned memory, bytes/s. */
  readonly h2d: number;
  readonly d2h: number;
  /** Dense bf16 GEMM rate reached at the model's shapes, FLOP/s. */
  readonly gemmFlops: number;
  /** Exact attention (the fastest SDPA backend) rate, FLOP/s. */
  readonly attentionFlops: number;
  /** The host CPU's bf16 GEMM rate, FLOP/s: what a text encoder placed on the CPU runs at. */
  readonly cpuFlops: number;
  /** Sequential read rate of the disk holding the weights, bytes/s: what blocks streamed from disk arrive at. */
  readonly diskRead: number;
}

/**
 * The disk read rate a profile assumes until a probe measures it: a conservative NVMe figure (PCIe 4 drives read
 * 3–7 GB/s sequentially at best; buffered reads through the page cache and a disk shared with other work get less).
 */
export const DEFAULT_DISK_READ = 2.5e9;

/**
 * An H100 SXM 80 GB on PCIe 5: the rates kino's floor measured (766 / 605 TFLOP/s, docs/benchmarks.md),
 * rounded; 55 GB/s pinned H2D; the disk rate assumed (DEFAULT_DISK_READ).
 */
export const H100_80GB: HardwareProfile = Object.freeze({
  name: "h100-80gb",
  vramTotal: 79.2 * GiB,
  vramFree: 78.7 * GiB,
  hostRam: 256 * GiB,
  pinnedLimit: 128 * GiB,
  h2d: 55e9,
  d2h: 55e9,
  gemmFlops: 770e12,
  attentionFlops: 600e12,
  cpuFlops: 2e12,
  diskRead: DEFAULT_DISK_READ,
});

/** A desktop RTX 4090 24 GB on PCIe 4 (25 GB/s pinned), 165 TFLOP/s dense bf16 GEMM, 150 attention; the disk rate assumed. */
export const RTX4090_24GB: HardwareProfile = Object.freeze({
  name: "rtx4090-24gb",
  vramTotal: 23.6 * GiB,
  vramFree: 23.1 * GiB,
  hostRam: 64 * GiB,
  pinnedLimit: 32 * GiB,
  h2d: 25e9,
  d2h: 25e9,
  gemmFlops: 165e12,
  attentionFlops: 150e12,
  cpuFlops: 1e12,
  diskRead: DEFAULT_DISK_READ,
});

export const HARDWARE_PRESETS: readonly HardwareProfile[] = [H100_80GB, RTX4090_24GB];

export function findHardwarePreset(name: string): HardwareProfile | undefined {
  return HARDWARE_PRESETS.find((h) => h.name === name);
}

/**
 * The profile of a GPU as its engine reports it now (name, total and free VRAM, host RAM; pinning
 * capped at half the RAM), with the H100 preset's rates until a probe measures this machine's.
 */
export function reportedProfile(gpu: { readonly name: string; readonly totalBytes: number; readonly freeBytes: number }, hostRamBytes: number | null): HardwareProfile {
  const hostRam = hostRamBytes ?? H100_80GB.hostRam;
  return { ...H100_80GB, name: gpu.name, vramTotal: gpu.totalBytes, vramFree: gpu.freeBytes, hostRam, pinnedLimit: hostRam / 2 };
}
