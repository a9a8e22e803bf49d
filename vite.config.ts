// The web UI (src/ui) built into dist/ui, which `kino serve` serves at / (src/server/ui-routes.ts).
// Everything is bundled: the page loads nothing from other origins.
import { defineConfig } from "vite";

export default defineConfig({
  root: "src/ui",
  base: "/",
  logLevel: "warn",
  build: {
    outDir: "../../dist/ui",
    emptyOutDir: true,
    target: "es2022",
    sourcemap: true,
  },
});
