import { describe, it, expect } from "vitest";
import { Chunker, cutPoints, DEFAULT_CHUNK_PARAMS, GEAR, SegmentJoiner, segmentCuts } from "./chunker.js";
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

/**
 * Cuts of `buf` chunked as independent segments ending at `splits` and joined, checking on the way
 * that every chunk is the stream's bytes and that a chunk given an index is that segment chunk.
 */
function joinedCuts(buf: Uint8Array, splits: number[], params: ChunkParams): number[] {
  const j = new SegmentJoiner(params);
  const cuts: number[] = [];
  let total = 0;
  let prev = 0;
  const emit = (data: Uint8Array): void => {
    expect(Buffer.from(data).equals(Buffer.from(buf.subarray(total, total + data.length)))).toBe(true);
    cuts.push((total += data.length));
  };
  for (const s of [...splits, buf.length]) {
    const data = buf.slice(prev, s);
    const seg = segmentCuts(data, params);
    for (const c of j.push(data, seg)) {
      if (c.index >= 0) {
        const start = c.index === 0 ? 0 : seg.cuts[c.index - 1]!;
        expect(c.data.byteOffset - data.byteOffset).toBe(start);
        expect(c.data.length).toBe(seg.cuts[c.index]! - start);
      }
      emit(c.data);
    }
    prev = s;
  }
  const last = j.finish();
  if (last) emit(last);
  return cuts;
}

/** Split points every `size` bytes. */
function every(size: number, total: number): number[] {
  const out: number[] = [];
  for (let at = size; at < total; at += size) out.push(at);
  return out;
}

describe("segment joining", () => {
  it("finds the sequential cuts on random data, for segments larger and smaller than max", () => {
    const buf = randomBuffer(3 << 20, 21);
    for (const params of [SMALL, DEFAULT_CHUNK_PARAMS]) {
      const whole = cutPoints(buf, params);
      for (const size of [64 << 10, params.max, params.max - 1, params.max + 1, params.min - 1, params.min, 1000, 1 << 20]) {
        expect(joinedCuts(buf, every(size, buf.length), params)).toEqual(whole);
      }
    }
  });

  it("takes most chunks of random data from the segments' own cuts", () => {
    const buf = randomBuffer(4 << 20, 28);
    const j = new SegmentJoiner();
    let own = 0;
    let all = 0;
    for (let at = 0; at < buf.length; at += 1 << 20) {
      const data = buf.subarray(at, at + (1 << 20));
      for (const c of j.push(data, segmentCuts(data))) {
        all++;
        if (c.index >= 0) own++;
      }
    }
    expect(own).toBeGreaterThanOrEqual(all - 3 * 3);
  });

  it("finds the sequential cuts for irregular segments, some of one byte", () => {
    const buf = randomBuffer(1 << 20, 22);
    const whole = cutPoints(buf, SMALL);
    const next = prng(23);
    for (let round = 0; round < 20; round++) {
      const splits = new Set<number>();
      const count = 1 + (next() % 150);
      for (let k = 0; k < count; k++) splits.add(1 + (next() % (buf.length - 1)));
      if (round === 0) for (let k = 1; k < 50; k++) splits.add(k);
      expect(joinedCuts(buf, [...splits].sort((x, y) => x - y), SMALL)).toEqual(whole);
    }
  });

  it("finds the sequential cuts across long runs of one byte, where the chains never meet", () => {
    for (const params of [SMALL, DEFAULT_CHUNK_PARAMS]) {
      const run = 3 * params.max + 12345;
      const parts = [randomBuffer(300_001, 24), new Uint8Array(run), randomBuffer(200_003, 25), new Uint8Array(run).fill(0xa7), new Uint8Array(run)];
      const buf = new Uint8Array(Buffer.concat(parts));
      const whole = cutPoints(buf, params);
      const gaps = whole.map((c, k) => c - (whole[k - 1] ?? 0));
      expect(gaps.filter((g) => g === params.max).length).toBeGreaterThan(6);
      for (const size of [params.max, params.max + params.min, 3 * params.max - 7, params.min - 1, 100_000, 1 << 20]) {
        expect(joinedCuts(buf, every(size, buf.length), params)).toEqual(whole);
      }
      expect(joinedCuts(new Uint8Array(run), every(params.max + 1, run), params)).toEqual(cutPoints(new Uint8Array(run), params));
    }
  });

  it("cuts at a segment's end carry nothing into the next", () => {
    const buf = randomBuffer(1 << 20, 26);
    const whole = cutPoints(buf, SMALL);
    expect(joinedCuts(buf, whole.slice(0, -1), SMALL)).toEqual(whole);
    expect(joinedCuts(buf, whole.slice(0, -1).map((c) => c - 1), SMALL)).toEqual(whole);
    expect(joinedCuts(buf, whole.slice(0, -1).map((c) => c + 1), SMALL)).toEqual(whole);
  });

  it("handles empty streams and segments, and rejects cuts of another segment", () => {
    const j = new SegmentJoiner(SMALL);
    expect(j.push(new Uint8Array(0), segmentCuts(new Uint8Array(0), SMALL))).toEqual([]);
    expect(j.finish()).toBeUndefined();
    const a = randomBuffer(50_000, 27);
    const k = new SegmentJoiner(SMALL);
    expect(() => k.push(a, segmentCuts(a.subarray(0, 40_000), SMALL))).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
  });
});
