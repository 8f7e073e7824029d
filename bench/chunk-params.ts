/**
 * Chooses the content-defined chunking parameters by measurement.
 *
 * For avg 16, 64, 256, 1024 KiB (min = avg/4, max = avg*4): chunking and chunk+hash throughput,
 * chunks per GiB, and dedup of a fork scenario on random data: a 256 MiB base, 20 variants each
 * overwriting one contiguous 1% region at a random offset, and one variant inserting 100 bytes
 * in the middle. "stored / base" = unique chunk bytes of all 22 files / base size.
 *
 *   node --import tsx bench/chunk-params.ts [baseMiB]
 *
 * Prints a table and writes bench/results/chunk-params.json.
 */
import { writeFileSync, mkdirSync } from "node:fs";
import { hash } from "blake3";
import { cutPoints } from "../volumefs/chunk/chunker.js";
import { chunkId } from "../volumefs/chunk/hash.js";
import type { ChunkParams } from "../volumefs/chunk/types.js";

const MiB = 1 << 20;
const baseBytes = Number(process.argv[2] ?? 256) * MiB;
const variants = 20;

function seeded(label: string, n: number): Uint8Array {
  return hash(Buffer.from(label), { length: n });
}

function prng(seed: number): () => number {
  let x = seed;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function chunkIds(buf: Uint8Array, params: ChunkParams): Map<string, number> {
  const out = new Map<string, number>();
  let prev = 0;
  for (const c of cutPoints(buf, params)) {
    out.set(chunkId(buf.subarray(prev, c)), c - prev);
    prev = c;
  }
  return out;
}

function bestOf(n: number, f: () => void): number {
  let best = Infinity;
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    f();
    best = Math.min(best, performance.now() - t);
  }
  return best / 1000;
}

const base = seeded("strata bench base", baseBytes);
const rawBlake3 = baseBytes / MiB / bestOf(3, () => hash(base));
const rows: Record<string, number>[] = [];
for (const avgKiB of [16, 64, 256, 1024]) {
  const avg = avgKiB * 1024;
  const params = { min: avg / 4, avg, max: avg * 4 };
  const chunkOnly = baseBytes / MiB / bestOf(2, () => cutPoints(base, params));
  let baseIds = new Map<string, number>();
  const chunkHash = baseBytes / MiB / bestOf(2, () => (baseIds = chunkIds(base, params)));
  const stored = new Map(baseIds);
  const rnd = prng(12345);
  const region = Math.floor(baseBytes / 100);
  const work = new Uint8Array(baseBytes + 100);
  let overwriteExtra = 0;
  for (let v = 0; v < variants; v++) {
    work.set(base);
    const off = Math.floor(rnd() * (baseBytes - region));
    work.set(seeded(`variant ${v}`, region), off);
    const before = [...stored.values()].reduce((a, b) => a + b, 0);
    for (const [id, len] of chunkIds(work.subarray(0, baseBytes), params)) stored.set(id, len);
    overwriteExtra += [...stored.values()].reduce((a, b) => a + b, 0) - before;
  }
  const mid = baseBytes / 2;
  work.set(base.subarray(0, mid));
  work.set(seeded("insert", 100), mid);
  work.set(base.subarray(mid), mid + 100);
  const beforeInsert = [...stored.values()].reduce((a, b) => a + b, 0);
  for (const [id, len] of chunkIds(work, params)) stored.set(id, len);
  const storedBytes = [...stored.values()].reduce((a, b) => a + b, 0);
  rows.push({
    avgKiB,
    minKiB: avgKiB / 4,
    maxKiB: avgKiB * 4,
    chunkMBps: Math.round(chunkOnly),
    chunkHashMBps: Math.round(chunkHash),
    chunksPerGiB: Math.round((baseIds.size * 1024 * MiB) / baseBytes),
    meanChunkKiB: Math.round(baseBytes / baseIds.size / 1024),
    storedOverBase: Number((storedBytes / baseBytes).toFixed(4)),
    extraPerEditOverRegion: Number((overwriteExtra / variants / region).toFixed(3)),
    overheadPerEditKiB: Math.round((overwriteExtra / variants - region) / 1024),
    target100x1pctOf1GiB: Number((2 + (100 * (overwriteExtra / variants - region)) / (1024 * MiB)).toFixed(3)),
    insertExtraKiB: Math.round((storedBytes - beforeInsert) / 1024),
  });
  console.error(`avg ${avgKiB} KiB done`);
}
console.log(`base ${baseBytes / MiB} MiB, raw blake3 ${Math.round(rawBlake3)} MB/s (one thread)`);
console.table(rows);
mkdirSync(new URL("./results/", import.meta.url), { recursive: true });
writeFileSync(
  new URL("./results/chunk-params.json", import.meta.url),
  JSON.stringify({ when: new Date().toISOString(), node: process.version, baseBytes, variants, rawBlake3MBps: Math.round(rawBlake3), rows }, null, 2) + "\n",
);

const { ChunkStore } = await import("../volumefs/chunk/chunk-store.js");
const { MemoryObjectStore } = await import("../volumefs/object/index.js");
const { SqliteMetadataStore } = await import("../metadata/index.js");
const pipeSize = Math.min(baseBytes, 256 * MiB);
const pipeline: Record<string, number | string>[] = [];
for (const mode of ["main thread", "worker"] as const) {
  let best = Infinity;
  for (let r = 0; r < 2; r++) {
    const meta = SqliteMetadataStore.open({ path: ":memory:" });
    const store = new ChunkStore({ objects: new MemoryObjectStore(), meta, workerThresholdBytes: mode === "worker" ? 4 * MiB : Infinity });
    await store.workersReady();
    const w = store.writer();
    const t = performance.now();
    await w.writeStream((async function* () {
      for (let at = 0; at < pipeSize; at += MiB) yield base.subarray(at, at + MiB);
    })());
    await w.flush();
    best = Math.min(best, performance.now() - t);
    await meta.close();
  }
  pipeline.push({ mode, writeStreamMBps: Math.round(pipeSize / MiB / (best / 1000)) });
}
console.log(`ChunkStore.writeStream of ${pipeSize / MiB} MiB into MemoryObjectStore + SqliteMetadataStore(":memory:"), default params`);
console.table(pipeline);
writeFileSync(
  new URL("./results/chunk-params.json", import.meta.url),
  JSON.stringify({ when: new Date().toISOString(), node: process.version, baseBytes, variants, rawBlake3MBps: Math.round(rawBlake3), rows, pipeline }, null, 2) + "\n",
);
process.exit(0);
