import { describe, it, expect } from "vitest";
import { randomBytes } from "node:crypto";
import { MemoryObjectStore } from "../object/index.js";
import { chunkId } from "./hash.js";
import { PackBuilder, PACK_TRAILER_BYTES, packKey, parsePack, readPackIndex } from "./pack.js";

function buildPack(n: number, size = 1000) {
  const b = new PackBuilder();
  const datas = Array.from({ length: n }, (_, k) => randomBytes(size + k));
  datas.forEach((d, k) => expect(b.add(chunkId(d), k % 5 === 0 ? "tree" : "chunk", d)).toBe(true));
  return { datas, built: b.finish() };
}

describe("pack", () => {
  it("round-trips entries through bytes and the parsed index", () => {
    const { datas, built } = buildPack(10);
    expect(built.id).toBe(chunkId(built.bytes));
    const parsed = parsePack(built.bytes, built.id);
    expect(parsed.entries).toEqual(built.entries);
    parsed.entries.forEach((e, k) => {
      expect(e.kind).toBe(k % 5 === 0 ? "tree" : "chunk");
      expect(Buffer.from(built.bytes.subarray(e.offset, e.offset + e.length)).equals(datas[k]!)).toBe(true);
    });
  });

  it("lays out the same pack in a used buffer as in new ones, copying entries as they are added", () => {
    const datas = Array.from({ length: 7 }, (_, k) => randomBytes(500 + k));
    const fill = (b: PackBuilder): PackBuilder => (datas.forEach((d, k) => b.add(chunkId(d), k % 3 === 0 ? "tree" : "chunk", Buffer.from(d))), b);
    const fresh = fill(new PackBuilder()).finish();
    const used = new Uint8Array(fresh.bytes.length + 100).fill(0xff);
    const b = new PackBuilder((min) => (expect(min).toBeLessThanOrEqual(used.length), used));
    const scratch = Buffer.alloc(600);
    datas.forEach((d, k) => {
      d.copy(scratch);
      b.add(chunkId(d), k % 3 === 0 ? "tree" : "chunk", scratch.subarray(0, d.length));
    });
    expect(b.packBytes).toBe(fresh.bytes.length);
    const again = b.finish();
    expect(again.bytes.buffer).toBe(used.buffer);
    expect(Buffer.from(again.bytes).equals(Buffer.from(fresh.bytes))).toBe(true);
    expect(again.id).toBe(fresh.id);
    expect(fill(new PackBuilder(() => new Uint8Array(600))).finish().id).toBe(fresh.id);
  });

  it("skips a duplicate id and counts sizes", () => {
    const b = new PackBuilder();
    const d = randomBytes(100);
    expect(b.add(chunkId(d), "chunk", d)).toBe(true);
    expect(b.add(chunkId(d), "chunk", d)).toBe(false);
    expect(b.count).toBe(1);
    expect(b.size).toBe(100);
    expect(b.finish().bytes.length).toBe(100 + 48 + PACK_TRAILER_BYTES);
  });

  it("writes an empty pack that parses", () => {
    const built = new PackBuilder().finish();
    expect(parsePack(built.bytes).entries).toEqual([]);
  });

  it("reads the index from the store's tail in one or two ranged GETs", async () => {
    const store = new MemoryObjectStore();
    const { built } = buildPack(3000, 10);
    await store.put(packKey(built.id), built.bytes);
    const small = await readPackIndex(store, built.id, 1024);
    expect(small.entries).toEqual(built.entries);
    expect(small.size).toBe(built.bytes.length);
    const big = await readPackIndex(store, built.id, 1 << 20);
    expect(big.entries).toEqual(built.entries);
  });

  it("rejects tampered packs with CORRUPT", async () => {
    const { built } = buildPack(4);
    const dataFlip = Uint8Array.from(built.bytes);
    dataFlip[5]! ^= 1;
    expect(() => parsePack(dataFlip)).toThrow(expect.objectContaining({ code: "CORRUPT" }));
    expect(() => parsePack(dataFlip, built.id)).toThrow(expect.objectContaining({ code: "CORRUPT" }));
    const indexFlip = Uint8Array.from(built.bytes);
    indexFlip[indexFlip.length - PACK_TRAILER_BYTES - 10]! ^= 1;
    const store = new MemoryObjectStore();
    await store.put(packKey(built.id), indexFlip);
    await expect(readPackIndex(store, built.id)).rejects.toMatchObject({ code: "CORRUPT" });
    const magicFlip = Uint8Array.from(built.bytes);
    magicFlip[magicFlip.length - 1]! ^= 1;
    await store.put(packKey(built.id), magicFlip);
    await expect(readPackIndex(store, built.id)).rejects.toMatchObject({ code: "CORRUPT" });
    await expect(readPackIndex(store, "0".repeat(64))).rejects.toMatchObject({ code: "NOT_FOUND" });
  });
});
