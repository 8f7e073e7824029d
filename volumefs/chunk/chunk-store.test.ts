import { describe, it, expect } from "vitest";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { hash } from "blake3";
import { MemoryObjectStore, withFaults, transientError, type ObjectStore } from "../object/index.js";
import { SqliteMetadataStore, type MetadataStore } from "../../metadata/index.js";
import { ChunkStore, type ChunkStoreOptions } from "./chunk-store.js";
import { ChunkPool } from "./chunk-pool.js";
import { cutPoints, DEFAULT_CHUNK_PARAMS } from "./chunker.js";
import { chunkId } from "./hash.js";
import { MemoryChunkCache } from "./memory-chunk-cache.js";
import { DiskChunkCache } from "./disk-chunk-cache.js";
import { packKey, parsePack } from "./pack.js";
import { makeTestS3Store, s3Skipped } from "../../test/support/s3.js";

/** Tests that need the real S3 server (skipped with the rest of the S3 suite). */
const s3it = s3Skipped() ? it.skip : it;

const SMALL = { min: 1024, avg: 4096, max: 16384 };

function bytes(label: string, n: number): Uint8Array {
  return hash(Buffer.from(label), { length: n });
}

function setup(opts: Partial<ChunkStoreOptions> = {}) {
  const objects = new MemoryObjectStore();
  const meta = SqliteMetadataStore.open({ path: ":memory:" });
  const store = new ChunkStore({ objects, meta, params: SMALL, packTargetBytes: 256 * 1024, workerThresholdBytes: Infinity, ...opts });
  return { objects, meta, store };
}

/** A real metadata store that counts getChunks calls. */
function counting(meta: MetadataStore): MetadataStore & { getChunksCalls: number } {
  const state = { getChunksCalls: 0 };
  return new Proxy(meta, {
    get(target, prop) {
      if (prop === "getChunksCalls") return state.getChunksCalls;
      if (prop === "getChunks") {
        return (ids: readonly string[]) => {
          state.getChunksCalls++;
          return target.getChunks(ids);
        };
      }
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === "function" ? v.bind(target) : v;
    },
  }) as MetadataStore & { getChunksCalls: number };
}

async function* pieces(data: Uint8Array, size: number): AsyncIterable<Uint8Array> {
  for (let at = 0; at < data.length; at += size) yield data.subarray(at, at + size);
}

/** Yields each buffer as it is (for streams whose buffers the writer may take over). */
async function* pieces2(buffers: Uint8Array[]): AsyncIterable<Uint8Array> {
  for (const b of buffers) yield b;
}

describe("ChunkStore", () => {
  it("writes files into packs and reads them back", async () => {
    const { store, meta, objects } = setup();
    const w = store.writer();
    const files = [bytes("a", 1_000_000), bytes("b", 4096), bytes("c", 0), bytes("d", 70_000)];
    const written = [];
    for (const f of files) written.push(await w.writeBuffer(f));
    const stats = await w.flush();
    expect(stats.packs).toBeGreaterThanOrEqual(4);
    expect(stats.newBytes).toBe(1_000_000 + 4096 + 70_000);
    expect(stats.dedupedChunks).toBe(0);
    const packs = await meta.listPacks();
    expect(packs.length).toBe(stats.packs);
    for (const p of packs) {
      const body = await objects.get(packKey(p.id));
      expect(parsePack(body, p.id).size).toBe(p.size);
    }
    for (const [k, f] of files.entries()) {
      const r = written[k]!;
      expect(r.size).toBe(f.length);
      expect(Buffer.from(await store.readRange(r.chunks, 0, f.length)).equals(Buffer.from(f))).toBe(true);
      for (const c of r.chunks) expect((await store.read(c.id)).length).toBe(c.length);
    }
    expect(written[2]!.chunks).toEqual([]);
  });

  it("stores a chunk once across files, writers and (via meta) volumes", async () => {
    const { store, meta } = setup();
    const base = bytes("base", 2_000_000);
    const w1 = store.writer();
    await w1.writeBuffer(base);
    const again = await w1.writeBuffer(base);
    const s1 = await w1.flush();
    expect(s1.newBytes).toBe(base.length);
    expect(s1.dedupedBytes).toBe(base.length);

    const edited = Uint8Array.from(base);
    edited.set(bytes("edit", 20_000), 1_000_000);
    const other = new ChunkStore({ objects: store.objects, meta, params: SMALL, packTargetBytes: 256 * 1024, workerThresholdBytes: Infinity });
    const w2 = other.writer();
    const r2 = await w2.writeBuffer(edited);
    const s2 = await w2.flush();
    expect(s2.newBytes).toBeGreaterThanOrEqual(20_000);
    expect(s2.newBytes).toBeLessThan(20_000 + 4 * SMALL.max);
    expect(s2.dedupedBytes + s2.newBytes).toBe(base.length);
    expect(Buffer.from(await other.readRange(r2.chunks, 0, edited.length)).equals(Buffer.from(edited))).toBe(true);
    expect(again.chunks.length).toBeGreaterThan(100);
  });

  it("checks dedup for many small files in batches, not one query per file", async () => {
    const objects = new MemoryObjectStore();
    const meta = counting(SqliteMetadataStore.open({ path: ":memory:" }));
    const store = new ChunkStore({ objects, meta, packTargetBytes: 1 << 20, dedupBatchBytes: 1 << 20, workerThresholdBytes: Infinity });
    const w = store.writer();
    const refs = [];
    for (let i = 0; i < 1000; i++) refs.push(await w.writeBuffer(bytes(`file ${i}`, 4096)));
    await w.writeBuffer(bytes("file 7", 4096));
    const stats = await w.flush();
    expect(meta.getChunksCalls).toBeLessThanOrEqual(5);
    expect(stats.newChunks).toBe(1000);
    expect(stats.dedupedChunks).toBe(1);
    expect(stats.packs).toBe(4);
    expect(Buffer.from(await store.readRange(refs[500]!.chunks, 0, 4096)).equals(Buffer.from(bytes("file 500", 4096)))).toBe(true);
  });

  it("reads any range like a reference buffer, coalescing GETs of adjacent chunks", async () => {
    const inner = new MemoryObjectStore();
    const objects = withFaults(inner, () => undefined);
    const meta = SqliteMetadataStore.open({ path: ":memory:" });
    const store = new ChunkStore({ objects, meta, params: SMALL, packTargetBytes: 4 << 20, workerThresholdBytes: Infinity });
    const ref = bytes("reference", 3_000_000);
    const w = store.writer();
    const { chunks } = await w.writeBuffer(ref);
    await w.flush();
    let seed = 17;
    const rnd = (n: number) => ((seed = (seed * 1103515245 + 12345) >>> 0) % n);
    for (let k = 0; k < 200; k++) {
      const off = rnd(ref.length + 100);
      const len = rnd(k % 10 === 0 ? 400_000 : 20_000);
      const got = await store.readRange(chunks, off, len);
      const want = ref.subarray(Math.min(off, ref.length), Math.min(off + len, ref.length));
      expect(Buffer.from(got).equals(Buffer.from(want))).toBe(true);
    }
    const before = objects.calls.get;
    const whole = await store.readRange(chunks, 0, ref.length);
    expect(whole.length).toBe(ref.length);
    expect(objects.calls.get - before).toBe(1);
  });

  it("fills the disk cache behind reads, so another store on the host reads with no GETs", async () => {
    const dir = await mkdtemp(join(tmpdir(), "strata-cache-"));
    try {
      const objects = withFaults(new MemoryObjectStore(), () => undefined);
      const { meta, store } = setup({ objects, cache: new DiskChunkCache({ dir, maxBytes: 1 << 30 }) });
      const first = { objects, meta, store };
      const w = first.store.writer();
      const data = bytes("cached", 3_000_000);
      const { chunks } = await w.writeBuffer(data);
      await w.flush();
      const before = first.objects.calls.get;
      expect(Buffer.from(await first.store.readRange(chunks, 0, data.length)).equals(Buffer.from(data))).toBe(true);
      const gets = first.objects.calls.get - before;
      expect(gets).toBeGreaterThan(0);
      // Read again at once: the chunks whose cache write is still running come from memory.
      await first.store.readRange(chunks, 0, data.length);
      expect(first.objects.calls.get - before).toBe(gets);
      // The writes behind the reads end: wait (bounded) until the cache directory holds every chunk.
      const locs = [...(await first.meta.getChunks(chunks.map((c) => c.id))).values()];
      const probe = new DiskChunkCache({ dir, maxBytes: 1 << 30 });
      const cachedAll = async () => (await Promise.all(locs.map((l) => probe.get(l)))).every((d) => d !== undefined);
      for (let i = 0; i < 100 && !(await cachedAll()); i++) await new Promise((r) => setTimeout(r, 20));
      await probe.close();
      const second = new ChunkStore({ objects: first.objects, meta: first.meta, params: SMALL, cache: new DiskChunkCache({ dir, maxBytes: 1 << 30 }) });
      const at = first.objects.calls.get;
      expect(Buffer.from(await second.readRange(chunks, 1000, 2_000_000)).equals(Buffer.from(data.subarray(1000, 2_001_000)))).toBe(true);
      expect(first.objects.calls.get - at).toBe(0);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("fails with CORRUPT on tampered pack bytes and never caches them", async () => {
    const cache = new MemoryChunkCache({ maxBytes: 1 << 30 });
    const { store, objects, meta } = setup({ cache });
    const w = store.writer();
    const { chunks } = await w.writeBuffer(bytes("victim", 50_000));
    await w.flush();
    const [pack] = await meta.listPacks();
    const body = Uint8Array.from(await objects.get(packKey(pack!.id)));
    body[10]! ^= 0xff;
    await objects.put(packKey(pack!.id), body);
    await expect(store.read(chunks[0]!.id)).rejects.toMatchObject({ code: "CORRUPT" });
    await expect(store.readRange(chunks, 0, 100)).rejects.toMatchObject({ code: "CORRUPT" });
    expect(await cache.get(chunks[0]!.id)).toBeUndefined();
    expect(await cache.size()).toBeLessThan(50_000);
    await expect(store.read(chunkId(bytes("nobody", 10)))).rejects.toMatchObject({ code: "NOT_FOUND" });
  });

  s3it("reads packs from S3 with chunks hashed by the GET worker, and fails with CORRUPT on tampered bytes there too", async () => {
    const fx = await makeTestS3Store();
    const meta = SqliteMetadataStore.open({ path: ":memory:" });
    const opts = { objects: fx.store, meta, params: SMALL, packTargetBytes: 4 << 20, workerThresholdBytes: Infinity };
    try {
      const data = bytes("over s3", 3 << 20);
      const w = new ChunkStore(opts).writer();
      const { chunks } = await w.writeBuffer(data);
      await w.flush();
      expect(Buffer.from(await new ChunkStore(opts).readRange(chunks, 0, data.length)).equals(Buffer.from(data))).toBe(true);
      const served = fx.s3.fetcher!.served;
      expect(served).toBeGreaterThan(0);

      const [pack] = await meta.listPacks();
      const body = Uint8Array.from(await fx.store.get(packKey(pack!.id)));
      body[2 << 20]! ^= 0xff; // inside some chunk's bytes
      await fx.store.put(packKey(pack!.id), body);
      await expect(new ChunkStore(opts).readRange(chunks, 0, data.length)).rejects.toMatchObject({ code: "CORRUPT" });
      expect(fx.s3.fetcher!.served).toBeGreaterThan(served);
    } finally {
      await meta.close();
      await fx.cleanup();
    }
  });

  it("registers a pack only after its upload succeeded", async () => {
    const inner = new MemoryObjectStore();
    const meta = SqliteMetadataStore.open({ path: ":memory:" });
    for (const after of [false, true]) {
      const objects = withFaults(inner, (op, _key, n) => (op === "put" && n === 1 ? { error: transientError("put pack"), after } : undefined));
      const known = (await meta.listPacks()).length;
      const store = new ChunkStore({ objects, meta, params: SMALL, workerThresholdBytes: Infinity });
      const w = store.writer();
      const { chunks } = await w.writeBuffer(bytes(`lost ${after}`, 30_000));
      await expect(w.flush()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
      expect((await meta.listPacks()).length).toBe(known);
      expect((await meta.getChunks(chunks.map((c) => c.id))).size).toBe(0);
      const retry = store.writer();
      await retry.writeBuffer(bytes(`lost ${after}`, 30_000));
      const s = await retry.flush();
      expect(s.packs).toBe(1);
      expect((await meta.getChunks(chunks.map((c) => c.id))).size).toBe(chunks.length);
    }
  });

  it("registers nothing when an upload acknowledgement is lost", async () => {
    const inner = new MemoryObjectStore();
    const meta = SqliteMetadataStore.open({ path: ":memory:" });
    const objects = withFaults(inner, (op) => (op === "put" ? { error: transientError("put pack"), after: true } : undefined));
    const store = new ChunkStore({ objects, meta, params: SMALL, workerThresholdBytes: Infinity });
    const w = store.writer();
    await w.writeBuffer(bytes("ack lost", 30_000));
    await expect(w.flush()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    expect(await meta.listPacks()).toEqual([]);
    const stored = [];
    for await (const o of inner.list("packs/")) stored.push(o.key);
    expect(stored.length).toBe(1);
  });

  it("stores trees as pack entries and reads them from the pack when meta lacks them", async () => {
    const { store, meta } = setup();
    const tree = Buffer.from(JSON.stringify({ entries: [{ name: "a", kind: "file" }] }));
    const id = chunkId(tree);
    const w = store.writer();
    w.addTree(id, tree);
    expect(() => w.addTree(chunkId(Buffer.from("x")), tree)).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
    await w.flush();
    expect(await meta.getTree(id)).toBeUndefined();
    expect(Buffer.from(await store.readTree(id)).equals(tree)).toBe(true);
    expect(Buffer.from((await meta.getTree(id))!).equals(tree)).toBe(true);
    await expect(store.readTree(chunkId(Buffer.from("none")))).rejects.toMatchObject({ code: "NOT_FOUND" });
  });

  it("chunks streams in a worker thread with the same boundaries as in-thread", async () => {
    const data = bytes("stream", 6 << 20);
    let prev = 0;
    const expectedIds = cutPoints(data, DEFAULT_CHUNK_PARAMS).map((c) => chunkId(data.subarray(prev, (prev = c))));
    const results = [];
    for (const threshold of [1 << 20, Infinity]) {
      const { store } = setup({ params: DEFAULT_CHUNK_PARAMS, workerThresholdBytes: threshold, packTargetBytes: 2 << 20 });
      expect(await store.workersReady()).toBe(threshold !== Infinity);
      const w = store.writer();
      const r = await w.writeStream(pieces(data, 100_003));
      const big = await w.writeBuffer(data);
      const s = await w.flush();
      expect(big.chunks).toEqual(r.chunks);
      expect(s.newBytes).toBe(data.length);
      expect(Buffer.from(await store.readRange(r.chunks, 0, data.length)).equals(Buffer.from(data))).toBe(true);
      results.push(r);
    }
    expect(results[0]).toEqual(results[1]);
    expect(results[0]!.chunks.map((c) => c.id)).toEqual(expectedIds);
  });

  it("chunks segments on several workers with the sequential cuts, with and without transfer", async () => {
    const pool = new ChunkPool({ size: 2 });
    try {
      expect(await pool.start()).toBe(true);
      const zeros = new Uint8Array(3 * DEFAULT_CHUNK_PARAMS.max + 777);
      const data = new Uint8Array(Buffer.concat([bytes("a", 2 << 20), zeros, bytes("b", 1 << 20), zeros, bytes("c", 123_457)]));
      let prev = 0;
      const expectedIds = cutPoints(data, DEFAULT_CHUNK_PARAMS).map((c) => chunkId(data.subarray(prev, (prev = c))));
      for (const segmentBytes of [100_000, DEFAULT_CHUNK_PARAMS.max, 1 << 20]) {
        const { store } = setup({ params: DEFAULT_CHUNK_PARAMS, workerThresholdBytes: 1 << 20, packTargetBytes: 1 << 20, pool, segmentBytes });
        const w = store.writer();
        const copied = await w.writeStream(pieces(data, 300_007));
        const owned = Array.from({ length: Math.ceil(data.length / (1 << 20)) }, (_, k) => data.slice(k << 20, (k + 1) << 20));
        const moved = await w.writeStream(pieces2(owned), { transfer: true });
        expect(owned.filter((b) => b.byteLength === 0).length).toBeGreaterThan(0);
        await w.flush();
        for (const r of [copied, moved]) {
          expect(r.size).toBe(data.length);
          expect(r.chunks.map((c) => c.id)).toEqual(expectedIds);
          expect(Buffer.from(await store.readRange(r.chunks, 0, data.length)).equals(Buffer.from(data))).toBe(true);
        }
      }
    } finally {
      await pool.close();
    }
  });

  it("hands taken-over buffers back only when it holds no view of them", async () => {
    const pool = new ChunkPool({ size: 2 });
    try {
      expect(await pool.start()).toBe(true);
      const { store } = setup({ params: SMALL, workerThresholdBytes: 1 << 20, packTargetBytes: 256 * 1024, pool });
      const block = 1 << 20;
      const data = new Uint8Array(Buffer.concat([bytes("r1", 3 * block + 5000), bytes("r1", 2 * block), new Uint8Array(block + 77), bytes("r2", 2 * block)]));
      const spare: Uint8Array[] = [];
      let recycled = 0;
      async function* blocks(): AsyncGenerator<Uint8Array> {
        for (let at = 0; at < data.length; at += block) {
          const n = Math.min(block, data.length - at);
          const buf = spare.pop() ?? new Uint8Array(block);
          buf.set(data.subarray(at, at + n));
          yield n === block ? buf : buf.subarray(0, n);
        }
      }
      const w = store.writer();
      const r = await w.writeStream(blocks(), {
        transfer: true,
        recycle: (b) => {
          recycled++;
          b.fill(0xee);
          spare.push(b);
        },
      });
      await w.flush();
      expect(recycled).toBeGreaterThan(3);
      let prev = 0;
      expect(r.chunks.map((c) => c.id)).toEqual(cutPoints(data, SMALL).map((c) => chunkId(data.subarray(prev, (prev = c)))));
      expect(Buffer.from(await store.readRange(r.chunks, 0, data.length)).equals(Buffer.from(data))).toBe(true);
    } finally {
      await pool.close();
    }
  });

  it("runs many streams at once over a small pool without deadlock", async () => {
    const pool = new ChunkPool({ size: 2 });
    try {
      expect(await pool.start()).toBe(true);
      const { store } = setup({ params: SMALL, workerThresholdBytes: 64 * 1024, segmentBytes: 50_000, pool });
      const w = store.writer();
      const files = Array.from({ length: 6 }, (_, k) => bytes(`f${k}`, 700_000 + k * 1000));
      const results = await Promise.all(files.map((f) => w.writeStream(pieces(f, 33_333))));
      await w.flush();
      results.forEach((r, k) => {
        let p = 0;
        expect(r.chunks.map((c) => c.id)).toEqual(cutPoints(files[k]!, SMALL).map((c) => chunkId(files[k]!.subarray(p, (p = c)))));
      });
    } finally {
      await pool.close();
    }
  });

  it("bounds what is buffered while uploads are slow", async () => {
    const inner = new MemoryObjectStore();
    let release: () => void = () => undefined;
    const gate = new Promise<void>((r) => (release = r));
    let started = 0;
    const slow: ObjectStore = Object.create(inner);
    slow.put = async (key, body, o) => {
      started++;
      await gate;
      return inner.put(key, body, o);
    };
    const meta = SqliteMetadataStore.open({ path: ":memory:" });
    const store = new ChunkStore({ objects: slow, meta, params: SMALL, packTargetBytes: 256 * 1024, maxBufferedPacks: 2, uploadConcurrency: 1, dedupBatchBytes: 64 * 1024, workerThresholdBytes: Infinity });
    const w = store.writer();
    let finished = false;
    const data = bytes("big", 4 << 20);
    const p = w.writeStream(pieces(data, 64 * 1024)).then((r) => ((finished = true), r));
    for (let i = 0; i < 50; i++) await new Promise((r) => setImmediate(r));
    expect(finished).toBe(false);
    expect(started).toBe(1);
    release();
    const r = await p;
    const s = await w.flush();
    expect(s.newBytes).toBe(data.length);
    expect(Buffer.from(await store.readRange(r.chunks, 0, data.length)).equals(Buffer.from(data))).toBe(true);
  });
});
