#!/usr/bin/env node
/**
 * Bundles the `strata` program into dist/cli/ (run by `npm run build`, after tsc).
 *
 * Why: a command that starts a sandbox spends most of its own time loading modules, not running
 * them. From the compiled tree, `strata run` resolves and reads about 150 files (our layers,
 * @grpc/grpc-js, protobufjs); one bundle is read and compiled at once. bin/strata runs the bundle;
 * dist/sdk/ (tsc) stays the library build.
 *
 * Layout of dist/cli/:
 *   main.js            the program (sdk/main.ts); `strata agent` runs from it too
 *   chunk-worker.js    the chunk pool's worker, found next to the pool's code (chunk-pool.ts)
 *   *-HASH.js          the command groups (cli.ts imports them on demand) and their shared code
 *   meta.json          esbuild's metafile: which sources and packages went into which file
 * Native addons and the S3 SDK stay packages resolved from node_modules at run time.
 */
import { build } from "esbuild";
import { rm, writeFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));
const outdir = `${root}dist/cli`;

await rm(outdir, { recursive: true, force: true });
const result = await build({
  absWorkingDir: root,
  entryPoints: { main: "sdk/main.ts", "chunk-worker": "volumefs/chunk/chunk-worker.ts" },
  outdir,
  entryNames: "[name]",
  chunkNames: "[name]-[hash]",
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target: "node20",
  sourcemap: "linked",
  external: ["better-sqlite3", "fuse-native", "blake3", "@aws-sdk/*"],
  // The bundled CommonJS packages (@grpc/grpc-js, protobufjs) call require() for Node's own modules.
  banner: { js: 'import { createRequire as __strataRequire } from "node:module"; const require = __strataRequire(import.meta.url);' },
  metafile: true,
  logLevel: "warning",
});
// What went into which file, for `npx esbuild --analyze`-style inspection.
await writeFile(`${outdir}/meta.json`, JSON.stringify(result.metafile));
