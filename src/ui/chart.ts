/** The VRAM/RAM chart of the followed job, per denoising step, drawn with uPlot. */
import uPlot from "uplot";
import type { MemorySeries } from "./job-state.ts";

export class MemoryChart {
  readonly #plot: uPlot;
  readonly #parent: HTMLElement;

  constructor(parent: HTMLElement) {
    this.#parent = parent;
    const gib = (_u: uPlot, v: number | null) => (v === null ? "–" : `${v.toFixed(2)} GiB`);
    this.#plot = new uPlot(
      {
        width: Math.max(parent.clientWidth, 320),
        height: 180,
        // Memory from 0, so a flat line reads as flat rather than magnified noise.
        scales: { x: { time: false }, y: { range: (_u, _min, max) => [0, Math.max(max, 0.1) * 1.15] } },
        axes: [
          { label: "step", stroke: "#aab", grid: { stroke: "#2a2f3a" }, ticks: { stroke: "#2a2f3a" } },
          { label: "GiB", stroke: "#aab", grid: { stroke: "#2a2f3a" }, ticks: { stroke: "#2a2f3a" }, size: 56 },
        ],
        series: [
          { label: "step" },
          { label: "VRAM", stroke: "#e8a33d", width: 2, value: gib, points: { show: true } },
          { label: "RAM", stroke: "#4fb3d9", width: 2, value: gib, points: { show: true } },
        ],
      },
      [[], [], []],
      parent,
    );
    new ResizeObserver(() => this.#plot.setSize({ width: Math.max(parent.clientWidth, 320), height: 180 })).observe(parent);
  }

  show(memory: MemorySeries): void {
    this.#plot.setData([memory.step, memory.vram, memory.ram]);
    // What a test (or a curious reader of the DOM) can check without reading the canvas.
    this.#parent.dataset.points = String(memory.step.length);
  }
}
