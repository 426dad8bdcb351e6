// Bundles src/ into dist/: dist/index.html, dist/assets/app.js and app.css (minified, with source maps).
// Run by `make run` / `make test` (npm ci && npm run build); dist/ is not committed.
import { copyFile, mkdir, rm } from "node:fs/promises";
import * as esbuild from "esbuild";

const dist = new URL("./dist/", import.meta.url);
await rm(dist, { recursive: true, force: true });
await mkdir(new URL("assets/", dist), { recursive: true });
await esbuild.build({
  entryPoints: { app: "src/main.js" },
  bundle: true,
  minify: true,
  sourcemap: true,
  format: "esm",
  target: ["chrome110", "firefox115", "safari16"],
  outdir: "dist/assets",
  legalComments: "linked", // the libraries' licence notices, kept beside the bundle
  logLevel: "info",
});
await esbuild.build({
  entryPoints: { app: "src/style.css" },
  bundle: true,
  minify: true,
  outdir: "dist/assets",
  logLevel: "info",
});
await copyFile(new URL("./src/index.html", import.meta.url), new URL("index.html", dist));
