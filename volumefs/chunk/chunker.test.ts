import { describe, it, expect } from "vitest";
import { Chunker, cutPoints, DEFAULT_CHUNK_PARAMS, GEAR } from "./chunker.js";
import { chunkId } from "./hash.js";
import type { ChunkParams } from "./types.js";

/** A deterministic pseudo-random byte source (xorshift32), so failures reproduce. */
function prng(seed: number): () => number {
  let x = seed | 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

function randomBuffer(n: number, seed: number): Uint8Array {
  const next = prng(seed);
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i += 4) {
    const v = next();
    out[i] = v;
    out[i + 1] = v >>> 8;
    out[i + 2] = v >>> 16;
    out[i + 3] = v >>> 24;
  }
  return out;
}

const SMALL: ChunkParams = { min: 1024, avg: 4096, max: 16384 };

function streamCuts(buf: Uint8Array, splits: number[], params: ChunkParams): number[] {
  const c = new Chunker(params);
  const cuts: number[] = [];
  let total = 0;
  let prev = 0;
  for (const s of [...splits, buf.length]) {
    for (const chunk of c.push(buf.subarray(prev, s))) cuts.push((total += chunk.length));
    prev = s;
  }
  const last = c.finish();
  if (last) cuts.push((total += last.length));
  return cuts;
}

describe("chunker", () => {
  it("has a fixed gear table (an on-disk format decision)", () => {
    expect(GEAR.length).toBe(256);
    expect(chunkId(new Uint8Array(GEAR.buffer))).toBe("abbaf53216571c1679e71872617499845fa0d5137d819923e4c42446dd0ed224");
    expect(new Set(GEAR).size).toBe(256);
  });

  it("cuts the same boundaries every time, pinned for the default params", () => {
    const buf = randomBuffer(4 << 20, 42);
    const a = cutPoints(buf);
    expect(cutPoints(buf)).toEqual(a);
    expect(a.slice(0, 8)).toEqual([34465, 103630, 164419, 243113, 338435, 406533, 481021, 564226]);
    expect(a[a.length - 1]).toBe(buf.length);
  });

  it("does not depend on how the input is split into pushes", () => {
    const buf = randomBuffer(1 << 20, 7);
    const whole = cutPoints(buf, SMALL);
    const next = prng(99);
    for (let round = 0; round < 20; round++) {
      const splits = new Set<number>();
      const count = next() % 200;
      for (let k = 0; k < count; k++) splits.add(next() % buf.length);
      if (round === 0) for (let k = 1; k < 300; k++) splits.add(k);
      const sorted = [...splits].sort((x, y) => x - y);
      expect(streamCuts(buf, sorted, SMALL)).toEqual(whole);
    }
  });

  it("streams the same bytes it was given", () => {
    const buf = randomBuffer(300_000, 3);
    const c = new Chunker(SMALL);
    const parts = [...c.push(buf.subarray(0, 100_000)), ...c.push(buf.subarray(100_000))];
    const last = c.finish();
    if (last) parts.push(last);
    const joined = Buffer.concat(parts);
    expect(Buffer.compare(joined, Buffer.from(buf))).toBe(0);
  });

  it("returns chunks that do not alias the pushed buffer, even a Buffer", () => {
    const src = Buffer.from(randomBuffer(200_000, 8));
    const keep = Buffer.from(src);
    const c = new Chunker(SMALL);
    const parts = c.push(src);
    src.fill(0);
    const last = c.finish();
    if (last) parts.push(last);
    expect(Buffer.concat(parts).equals(keep)).toBe(true);
  });

  it("keeps every chunk within [min, max] except the last", () => {
    for (const params of [SMALL, DEFAULT_CHUNK_PARAMS]) {
      const buf = randomBuffer(8 << 20, 11);
      const cuts = cutPoints(buf, params);
      let prev = 0;
      cuts.forEach((c, k) => {
        const len = c - prev;
        expect(len).toBeLessThanOrEqual(params.max);
        if (k < cuts.length - 1) expect(len).toBeGreaterThanOrEqual(params.min);
        prev = c;
      });
      const mean = buf.length / cuts.length;
      expect(mean).toBeGreaterThan(params.avg * 0.5);
      expect(mean).toBeLessThan(params.avg * 2);
    }
  });

  it("cuts constant data at max", () => {
    const cuts = cutPoints(new Uint8Array(100_000), SMALL);
    expect(cuts.slice(0, 3)).toEqual([16384, 32768, 49152]);
  });

  it("moves only the boundaries near an edit", () => {
    const buf = randomBuffer(4 << 20, 5);
    const before = cutPoints(buf);
    const edited = new Uint8Array(buf.length + 100);
    const mid = 2 << 20;
    edited.set(buf.subarray(0, mid));
    edited.set(randomBuffer(100, 6), mid);
    edited.set(buf.subarray(mid), mid + 100);
    const after = cutPoints(edited);
    const idsOf = (b: Uint8Array, cuts: number[]) => {
      let p = 0;
      return cuts.map((c) => chunkId(b.subarray(p, (p = c))));
    };
    const a = new Set(idsOf(buf, before));
    const changed = idsOf(edited, after).filter((id) => !a.has(id));
    expect(changed.length).toBeGreaterThanOrEqual(1);
    expect(changed.length).toBeLessThanOrEqual(3);
    expect(before.filter((c) => c < mid - DEFAULT_CHUNK_PARAMS.max)).toEqual(
      after.filter((c) => c < mid - DEFAULT_CHUNK_PARAMS.max),
    );
  });

  it("handles empty input and rejects bad params", () => {
    expect(cutPoints(new Uint8Array(0))).toEqual([]);
    expect(new Chunker().finish()).toBeUndefined();
    expect(() => new Chunker({ min: 10, avg: 3000, max: 9000 })).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
    expect(() => cutPoints(new Uint8Array(1), { min: 4096, avg: 1024, max: 8192 })).toThrow(/chunk params/);
  });
});
