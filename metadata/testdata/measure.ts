/**
 * Prints timings of the metadata operations a sync leans on, on a file database in a temp dir:
 * `node --import tsx metadata/testdata/measure.ts`. Not a test: nothing here asserts timings.
 */
import { createHash } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { SqliteMetadataStore } from "../sqlite-metadata-store.js";

const id = (s: string): string => createHash("sha256").update(s).digest("hex");
const dir = mkdtempSync(join(tmpdir(), "strata-meta-measure-"));
const store = SqliteMetadataStore.open({ path: join(dir, "meta.db") });
const runs = 5;

async function time(label: string, fn: (run: number) => Promise<unknown>): Promise<void> {
  const ms: number[] = [];
  for (let r = 0; r < runs; r++) {
    const t0 = performance.now();
    await fn(r);
    ms.push(performance.now() - t0);
  }
  ms.sort((a, b) => a - b);
  console.log(`${label.padEnd(44)} median ${ms[runs >> 1]!.toFixed(2)} ms  (min ${ms[0]!.toFixed(2)}, max ${ms[runs - 1]!.toFixed(2)})`);
}

await store.createVolume({ env: "main", name: "m", head: null, forkedFrom: null, createdAt: 0 });
let head: string | null = null;
await time("commit with 1,000 trees (1 KiB each)", async (r) => {
  const trees = Array.from({ length: 1000 }, (_, i) => ({ id: id(`t ${r} ${i}`), data: Buffer.alloc(1024, i & 0xff) }));
  const v = { id: id(`v ${r}`), root: trees[0]!.id, parents: head === null ? [] : [head], time: r, message: "", labels: {}, files: 1000, bytes: 0 };
  const res = await store.commit({ env: "main", volume: "m", expectedHead: head, version: v, trees });
  if (!res.ok) throw new Error("unexpected conflict");
  head = v.id;
});
await time("putPack with 1,000 chunk locations", async (r) => {
  const pack = id(`p ${r}`);
  const chunks = Array.from({ length: 1000 }, (_, i) => ({ id: id(`c ${r} ${i}`), pack, offset: i * 4096, length: 4096 }));
  await store.putPack({ id: pack, size: 4096 * 1000, createdAt: r }, chunks);
});
for (let p = 0; p < 10; p++) {
  const pack = id(`big ${p}`);
  await store.putPack({ id: pack, size: 0, createdAt: 0 }, Array.from({ length: 1000 }, (_, i) => ({ id: id(`bc ${p} ${i}`), pack, offset: i, length: 1 })));
}
const known = Array.from({ length: 10_000 }, (_, i) => id(`bc ${Math.floor(i / 1000)} ${i % 1000}`));
await time("getChunks of 10,000 ids (all known)", async () => {
  const m = await store.getChunks(known);
  if (m.size !== 10_000) throw new Error(`got ${m.size}`);
});
await time("getChunks of 10,000 ids (none known)", async (r) => {
  await store.getChunks(Array.from({ length: 10_000 }, (_, i) => id(`unknown ${r} ${i}`)));
});
await store.close();
rmSync(dir, { recursive: true, force: true });
