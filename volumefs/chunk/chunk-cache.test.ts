import { describe, it, expect, beforeEach, afterEach } from "vitest";
import { mkdtemp, rm, unlink, writeFile, utimes, readdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { DiskChunkCache } from "./disk-chunk-cache.js";
import { MemoryChunkCache } from "./memory-chunk-cache.js";
import { chunkId } from "./hash.js";

function chunk(n: number): { id: string; data: Uint8Array } {
  const data = randomBytes(n);
  return { id: chunkId(data), data };
}

describe("MemoryChunkCache", () => {
  it("evicts least recently used first and stays under its bound", async () => {
    const c = new MemoryChunkCache({ maxBytes: 3000 });
    const [a, b, d, e] = [chunk(1000), chunk(1000), chunk(1000), chunk(1000)];
    await c.put(a.id, a.data);
    await c.put(b.id, b.data);
    await c.put(d.id, d.data);
    expect(await c.get(a.id)).toBe(a.data);
    await c.put(e.id, e.data);
    expect(await c.get(b.id)).toBeUndefined();
    expect(c.keys()).toEqual([d.id, a.id, e.id]);
    expect(await c.size()).toBe(3000);
  });
});

describe("DiskChunkCache", () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "strata-cache-"));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("stores chunks as whole files under dir/ab/<id> and reads them back", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 20 });
    const a = chunk(5000);
    await c.put(a.id, a.data);
    await c.put(a.id, a.data);
    expect(await readdir(join(dir, a.id.slice(0, 2)))).toEqual([a.id]);
    expect(Buffer.from((await c.get(a.id))!).equals(Buffer.from(a.data))).toBe(true);
    expect(await c.size()).toBe(5000);
    expect(await readdir(join(dir, "tmp"))).toEqual([]);
  });

  it("evicts least recently used first and stays under maxBytes", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 3000 });
    const [a, b, d, e] = [chunk(1000), chunk(1000), chunk(1000), chunk(1000)];
    for (const x of [a, b, d]) await c.put(x.id, x.data);
    expect(await c.get(a.id)).toBeDefined();
    await c.put(e.id, e.data);
    expect(await c.get(b.id)).toBeUndefined();
    expect(await c.keys()).toEqual([d.id, a.id, e.id]);
    expect(await c.size()).toBeLessThanOrEqual(3000);
    const files = (await readdir(dir, { recursive: true })).filter((f) => /[0-9a-f]{64}$/.test(f));
    expect(files.length).toBe(3);
  });

  it("learns sizes and recency (mtime) from the directory on open", async () => {
    const first = new DiskChunkCache({ dir, maxBytes: 1 << 20 });
    const xs = [chunk(1000), chunk(1000), chunk(1000)];
    for (const x of xs) await first.put(x.id, x.data);
    await first.close();
    const t = Date.now() / 1000;
    await utimes(join(dir, xs[0]!.id.slice(0, 2), xs[0]!.id), t, t);
    await utimes(join(dir, xs[1]!.id.slice(0, 2), xs[1]!.id), t - 100, t - 100);
    await utimes(join(dir, xs[2]!.id.slice(0, 2), xs[2]!.id), t - 50, t - 50);
    const second = new DiskChunkCache({ dir, maxBytes: 2000 });
    expect(await second.size()).toBe(2000);
    expect(await second.keys()).toEqual([xs[2]!.id, xs[0]!.id]);
  });

  it("treats a file evicted by another process as a miss", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 20 });
    const other = new DiskChunkCache({ dir, maxBytes: 1 << 20 });
    const a = chunk(2000);
    await c.put(a.id, a.data);
    expect(await other.get(a.id)).toBeDefined();
    await unlink(join(dir, a.id.slice(0, 2), a.id));
    expect(await c.get(a.id)).toBeUndefined();
    expect(await other.get(a.id)).toBeUndefined();
    expect(await c.size()).toBe(0);
    await c.put(a.id, a.data);
    expect(await other.get(a.id)).toBeDefined();
  });

  it("never returns damaged bytes", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 20 });
    const a = chunk(2000);
    await c.put(a.id, a.data);
    await writeFile(join(dir, a.id.slice(0, 2), a.id), randomBytes(2000));
    expect(await c.get(a.id)).toBeUndefined();
    expect(await readdir(join(dir, a.id.slice(0, 2)))).toEqual([]);
  });

  it("serves concurrent readers and writers of the same ids without partial reads", async () => {
    const writers = [0, 1, 2].map(() => new DiskChunkCache({ dir, maxBytes: 400_000 }));
    const xs = Array.from({ length: 40 }, () => chunk(20_000));
    const ops: Promise<unknown>[] = [];
    for (const x of xs) {
      for (const w of writers) {
        ops.push(w.put(x.id, x.data));
        ops.push(w.get(x.id).then((got) => expect(got === undefined || Buffer.from(got).equals(Buffer.from(x.data))).toBe(true)));
      }
    }
    await Promise.all(ops);
    for (const w of writers) expect(await w.size()).toBeLessThanOrEqual(400_000);
  });
});
