import { describe, it, expect, beforeEach, afterEach } from "vitest";
import { mkdir, mkdtemp, readdir, rm, stat, unlink, utimes, writeFile } from "node:fs/promises";
import { openSync, writeSync, closeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import type { ChunkLocation } from "../../metadata/index.js";
import { DiskChunkCache } from "./disk-chunk-cache.js";
import { MemoryChunkCache } from "./memory-chunk-cache.js";
import { chunkId } from "./hash.js";

/** A made-up pack: `sizes` chunks of random bytes laid end to end, and their locations. */
function pack(sizes: number[]): { id: string; bytes: Buffer; locs: ChunkLocation[] } {
  const bytes = randomBytes(sizes.reduce((a, b) => a + b, 0));
  const id = chunkId(bytes);
  let at = 0;
  const locs = sizes.map((n) => {
    const loc = { id: chunkId(bytes.subarray(at, at + n)), pack: id, offset: at, length: n };
    at += n;
    return loc;
  });
  return { id, bytes, locs };
}

const same = (a: Uint8Array | undefined, b: Uint8Array): boolean => a !== undefined && Buffer.from(a).equals(Buffer.from(b));
const bytesOf = (p: { bytes: Buffer }, l: ChunkLocation): Buffer => p.bytes.subarray(l.offset, l.offset + l.length);

describe("MemoryChunkCache", () => {
  it("evicts least recently used first and stays under its bound", async () => {
    const c = new MemoryChunkCache({ maxBytes: 3000 });
    const p = pack([1000, 1000, 1000, 1000]);
    const [a, b, d, e] = p.locs as [ChunkLocation, ChunkLocation, ChunkLocation, ChunkLocation];
    await c.putRange(p.id, 0, p.bytes.subarray(0, 3000), [a, b, d]);
    expect(same(await c.get(a), bytesOf(p, a))).toBe(true);
    await c.putRange(p.id, 3000, p.bytes.subarray(3000), [e]);
    expect(await c.get(b)).toBeUndefined();
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
  const fileOf = (packId: string): string => join(dir, "packs", packId.slice(0, 2), packId);

  it("keeps one sparse file per pack, with each range at its own offset", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 24 });
    const p = pack([5000, 7000, 9000, 4000]);
    const [a, b, d, e] = p.locs as [ChunkLocation, ChunkLocation, ChunkLocation, ChunkLocation];
    await c.putRange(p.id, d.offset, p.bytes.subarray(d.offset), [d, e]);
    await c.putRange(p.id, d.offset, p.bytes.subarray(d.offset), [d, e]);
    expect(await readdir(join(dir, "packs", p.id.slice(0, 2)))).toEqual([p.id]);
    expect(same(await c.get(d), bytesOf(p, d))).toBe(true);
    expect(same(await c.get(e), bytesOf(p, e))).toBe(true);
    // The parts of the file never written read as zeros: a miss, not wrong bytes.
    expect(await c.get(a)).toBeUndefined();
    expect(await c.get(b)).toBeUndefined();
    await c.putRange(p.id, 0, p.bytes.subarray(0, b.offset + b.length), [a, b]);
    for (const l of p.locs) expect(same(await c.get(l), bytesOf(p, l))).toBe(true);
    expect(await c.size()).toBeGreaterThanOrEqual(p.bytes.length);
    await c.close();
  });

  it("evicts whole packs, least recently used first, and stays under maxBytes", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 3 * 16384 });
    const ps = [0, 1, 2, 3].map(() => pack([16384]));
    const [a, b, d, e] = ps as [ReturnType<typeof pack>, ReturnType<typeof pack>, ReturnType<typeof pack>, ReturnType<typeof pack>];
    await c.size(); // the first scan is done: eviction runs from here on
    for (const x of [a, b, d]) await c.putRange(x.id, 0, x.bytes, x.locs);
    expect(await c.get(a.locs[0]!)).toBeDefined();
    await c.putRange(e.id, 0, e.bytes, e.locs);
    expect(await c.get(b.locs[0]!)).toBeUndefined();
    expect(await c.keys()).toEqual([d.id, a.id, e.id]);
    expect(await c.size()).toBeLessThanOrEqual(3 * 16384);
    const files = (await readdir(join(dir, "packs"), { recursive: true })).filter((f) => /[0-9a-f]{64}$/.test(f));
    expect(files.length).toBe(3);
    await c.close();
  });

  it("learns sizes and recency (mtime) from the directory on open", async () => {
    const first = new DiskChunkCache({ dir, maxBytes: 1 << 24 });
    const ps = [pack([8192]), pack([8192]), pack([8192])];
    for (const x of ps) await first.putRange(x.id, 0, x.bytes, x.locs);
    await first.close();
    const t = Date.now() / 1000;
    await utimes(fileOf(ps[0]!.id), t, t);
    await utimes(fileOf(ps[1]!.id), t - 100, t - 100);
    await utimes(fileOf(ps[2]!.id), t - 50, t - 50);
    const block = (await stat(fileOf(ps[0]!.id))).blocks * 512;
    const second = new DiskChunkCache({ dir, maxBytes: 2 * block });
    expect(await second.size()).toBe(2 * block);
    expect(await second.keys()).toEqual([ps[2]!.id, ps[0]!.id]);
    await second.close();
  });

  it("treats a pack evicted by another process as a miss", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 24, rescanMs: 0 });
    const other = new DiskChunkCache({ dir, maxBytes: 1 << 24, rescanMs: 0 });
    const p = pack([2000]);
    const [a] = p.locs as [ChunkLocation];
    await c.putRange(p.id, 0, p.bytes, p.locs);
    expect(same(await other.get(a), p.bytes)).toBe(true);
    await unlink(fileOf(p.id));
    await c.size();
    expect(await c.get(a)).toBeUndefined();
    expect(await other.get(a)).toBeUndefined();
    await c.putRange(p.id, 0, p.bytes, p.locs);
    expect(same(await other.get(a), p.bytes)).toBe(true);
    await c.close();
    await other.close();
  });

  it("never returns damaged bytes", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 24 });
    const p = pack([2000, 3000]);
    const [a, b] = p.locs as [ChunkLocation, ChunkLocation];
    await c.putRange(p.id, 0, p.bytes, p.locs);
    const fd = openSync(fileOf(p.id), "r+");
    writeSync(fd, randomBytes(100), 0, 100, b.offset + 10);
    closeSync(fd);
    expect(same(await c.get(a), bytesOf(p, a))).toBe(true);
    expect(await c.get(b)).toBeUndefined();
    await c.putRange(p.id, b.offset, bytesOf(p, b), [b]);
    expect(same(await c.get(b), bytesOf(p, b))).toBe(true);
    await c.close();
  });

  it("removes the cache files of the first layout (a file per chunk) on open, and nothing else", async () => {
    await mkdir(join(dir, "ab"), { recursive: true });
    await mkdir(join(dir, "tmp"), { recursive: true });
    await mkdir(join(dir, "cd"), { recursive: true });
    await writeFile(join(dir, "ab", "ab".padEnd(64, "0")), "old");
    await writeFile(join(dir, "tmp", `${"ab".padEnd(64, "1")}.123.abcdef`), "old");
    await writeFile(join(dir, "cd", "cd".padEnd(64, "0")), "old");
    await writeFile(join(dir, "cd", "notes.txt"), "a user's file");
    await writeFile(join(dir, "other"), "a user's file");
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 24 });
    await c.size();
    expect((await readdir(dir)).sort()).toEqual(["cd", "other", "packs"]);
    expect((await readdir(join(dir, "cd"))).sort()).toEqual(["cd".padEnd(64, "0"), "notes.txt"]);
    await c.close();
  });

  it("writes and reads with no descriptor kept for reuse (maxOpenFiles 0)", async () => {
    const c = new DiskChunkCache({ dir, maxBytes: 1 << 24, maxOpenFiles: 0 });
    const p = pack([4000, 5000]);
    await c.putRange(p.id, 0, p.bytes, p.locs);
    for (const l of p.locs) expect(same(await c.get(l), bytesOf(p, l))).toBe(true);
    await c.close();
  });

  it("serves concurrent readers and writers of the same packs without wrong bytes", async () => {
    const caches = [0, 1, 2].map(() => new DiskChunkCache({ dir, maxBytes: 1 << 20 }));
    const ps = Array.from({ length: 30 }, () => pack([20_000, 12_000, 30_000]));
    const ops: Promise<unknown>[] = [];
    for (const p of ps) {
      for (const c of caches) {
        ops.push(c.putRange(p.id, 0, p.bytes, p.locs));
        for (const l of p.locs) ops.push(c.get(l).then((got) => expect(got === undefined || same(got, bytesOf(p, l))).toBe(true)));
      }
    }
    await Promise.all(ops);
    for (const c of caches) {
      expect(await c.size()).toBeLessThanOrEqual(1 << 20);
      await c.close();
    }
  });
});
