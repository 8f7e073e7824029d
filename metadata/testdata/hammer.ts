/**
 * A child process of the multi-process concurrency test (sqlite-metadata-store.test.ts).
 *
 * Usage: `node --import tsx metadata/testdata/hammer.ts <db path> <worker> <moves>`.
 * Prints "ready", waits for a line on stdin, then opens the database (creating volume
 * "main/shared" unless another worker did), and moves the head `moves` times by
 * read-modify-write: read the head, put trees, a pack and a version whose parent is that head,
 * then compare-and-swap (casHead on even moves, commit on odd ones), retrying on ok: false.
 * Finally prints one JSON line: { ids, conflicts, errors }. Exits 0 even when errors happened.
 */
import { createHash } from "node:crypto";
import { createInterface } from "node:readline";
import { MetadataError } from "../errors.js";
import { SqliteMetadataStore } from "../sqlite-metadata-store.js";
import type { VersionRecord } from "../types.js";

const [dbPath, worker, movesText] = process.argv.slice(2);
if (dbPath === undefined || worker === undefined || movesText === undefined) {
  process.stderr.write("usage: hammer.ts <db path> <worker> <moves>\n");
  process.exit(2);
}
const moves = Number(movesText);

const testId = (seed: string): string => createHash("sha256").update(seed).digest("hex");

async function waitForGo(): Promise<void> {
  const rl = createInterface({ input: process.stdin });
  process.stdout.write("ready\n");
  for await (const _ of rl) break;
  rl.close();
}

async function main(): Promise<void> {
  await waitForGo();
  const ids: string[] = [];
  const errors: string[] = [];
  let conflicts = 0;
  try {
    const store = SqliteMetadataStore.open({ path: dbPath! });
    try {
      await store.createVolume({ env: "main", name: "shared", head: null, forkedFrom: null, createdAt: Date.now() });
    } catch (err) {
      if (!(err instanceof MetadataError && err.code === "ALREADY_EXISTS")) throw err;
    }
    for (let i = 0; i < moves; i++) {
      for (let attempt = 0; ; attempt++) {
        const head = (await store.getVolume("main", "shared"))!.head;
        const seed = `${worker}/${i}/${attempt}`;
        const tree = { id: testId(`tree ${seed}`), data: Buffer.from(seed) };
        const pack = testId(`pack ${seed}`);
        const v: VersionRecord = {
          id: testId(`version ${seed}`),
          root: tree.id,
          parents: head === null ? [] : [head],
          time: Date.now(),
          message: seed,
          labels: { worker: worker! },
          files: 1,
          bytes: seed.length,
        };
        await store.putPack({ id: pack, size: 200, createdAt: Date.now() }, [
          { id: testId(`chunk a ${seed}`), pack, offset: 0, length: 100 },
          { id: testId(`chunk b ${seed}`), pack, offset: 100, length: 100 },
        ]);
        let res;
        if (i % 2 === 0) {
          await store.putTrees([tree]);
          await store.putVersion(v);
          res = await store.casHead("main", "shared", head, v.id);
        } else {
          res = await store.commit({ env: "main", volume: "shared", expectedHead: head, version: v, trees: [tree] });
        }
        if (res.ok) {
          ids.push(v.id);
          break;
        }
        conflicts++;
      }
    }
    await store.close();
  } catch (err) {
    errors.push(err instanceof MetadataError ? `${err.code}: ${err.message}` : String(err));
  }
  process.stdout.write(JSON.stringify({ ids, conflicts, errors }) + "\n");
}

await main();
