/**
 * Content-defined chunking (FastCDC with normalized chunking, 32-bit gear hash).
 *
 * On-disk format decision: chunk boundaries are part of what dedup across releases relies on, so
 * the gear table, the masks and the cut rule below never change for a given `GEAR_VERSION`.
 *
 * Cut rule, for one chunk starting at byte 0 of the remaining input:
 * - bytes at index < min - 1 are skipped (not hashed); the hash starts at 0;
 * - for each byte at index i >= min - 1: `h = ((h << 1) + GEAR[byte]) | 0`, `len = i + 1`;
 *   the chunk ends at `len` if `(h & mask) === 0`, with `mask = maskS` (avgBits + 2 high bits)
 *   while `len < avg`, else `maskL` (avgBits - 2 high bits); it ends at `len === max` regardless.
 * - the masks select the high bits of the 32-bit hash, which depend on the last 32 bytes.
 * The hash state restarts at each boundary, so boundaries depend only on the bytes since the
 * previous boundary, never on how input was split into pushes.
 */
import { hash } from "blake3";
import { VolumeError } from "../errors.js";
import type { ChunkParams } from "./types.js";

/** Version of the gear table and cut rule; bump only with a new chunking format. */
export const GEAR_VERSION = 1;

/**
 * The 256-entry gear table: the first 1024 bytes of the blake3 XOF of "strata gear table v1",
 * read as little-endian 32-bit words. Fixed forever for GEAR_VERSION 1.
 */
export const GEAR: Int32Array = (() => {
  const bytes = hash(Buffer.from("strata gear table v1"), { length: 1024 });
  const table = new Int32Array(256);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < 256; i++) table[i] = view.getInt32(i * 4, true);
  return table;
})();

/**
 * The default chunking parameters: min 16 KiB, avg 64 KiB, max 256 KiB (measured mean 73 KiB).
 *
 * Chosen by measurement (`node --import tsx bench/chunk-params.ts`; 2-core VM, Node 20, native
 * blake3; JSON in bench/results/chunk-params.json). Scenario on random data: a 256 MiB base, 20
 * variants each overwriting one contiguous 1% region at a random offset, one variant inserting 100
 * bytes in the middle; "stored" = unique chunk bytes of all 22 files / base size (the floor is
 * 1.20). "1 GiB target" extrapolates the measured per-edit overhead to the product target: 100
 * forks each changing 1% of a 1 GiB volume must store at most 2.1x one copy.
 *
 * | avg      | chunks/GiB | stored/base | overhead per edit | 1 GiB target | insert 100 B costs |
 * |----------|------------|-------------|-------------------|--------------|--------------------|
 * | 16 KiB   | 57.5k      | 1.2035      | 44 KiB            | 2.004x       | 28 KiB             |
 * | 64 KiB   | 14.4k      | 1.2132      | 169 KiB           | 2.016x       | 82 KiB             |
 * | 256 KiB  | 3.6k       | 1.2474      | 600 KiB           | 2.057x       | 432 KiB            |
 * | 1 MiB    | 0.9k       | 1.4336      | 3006 KiB          | 2.287x (fails) | 1121 KiB         |
 *
 * Throughput does not decide it: the gear loop ran at about 870-910 MB/s for every size (1.1-1.2
 * GB/s since it was unrolled) and chunk+hash at 650-730 MB/s on a quiet machine (raw blake3
 * 4.0-4.5 GB/s on the same buffer); the
 * per-chunk costs that grow at small sizes are index rows, ranged GETs and cache files. 64 KiB
 * meets the target with a wide margin at a quarter of the rows of 16 KiB; 256 KiB is near the
 * edge once edits are smaller than 1%, and 1 MiB fails. Small files are one chunk whatever the
 * average, so they do not pull the choice lower.
 */
export const DEFAULT_CHUNK_PARAMS: Readonly<ChunkParams> = Object.freeze({
  min: 16 * 1024,
  avg: 64 * 1024,
  max: 256 * 1024,
});

interface Masks {
  min: number;
  avg: number;
  max: number;
  maskS: number;
  maskL: number;
}

/** Derived masks for `params`; throws VolumeError INVALID_ARGUMENT for bad params. */
function masksFor(params: ChunkParams): Masks {
  const { min, avg, max } = params;
  const bits = Math.log2(avg);
  if (!Number.isInteger(bits) || bits < 8 || bits > 28) {
    throw new VolumeError("INVALID_ARGUMENT", `check chunk params: avg ${avg} is not a power of two in [256, 2^28]`);
  }
  if (!Number.isInteger(min) || !Number.isInteger(max) || min < 64 || min > avg || max < avg || max > 2 ** 30) {
    throw new VolumeError("INVALID_ARGUMENT", `check chunk params: need 64 <= min <= avg <= max, got ${min}/${avg}/${max}`);
  }
  const high = (n: number): number => (n >= 32 ? -1 : (((2 ** n - 1) * 2 ** (32 - n)) | 0));
  return { min, avg, max, maskS: high(Math.min(bits + 2, 31)), maskL: high(Math.max(bits - 2, 1)) };
}

/** Scan state of the chunk in progress. */
interface ScanState {
  /** Bytes of the current chunk consumed so far. */
  n: number;
  /** Gear hash so far. */
  h: number;
}

/** Resets `st` at a boundary and returns the index just past it. */
function cut(st: ScanState, at: number): number {
  st.n = 0;
  st.h = 0;
  return at;
}

/**
 * Scans `src[start, end)` continuing the chunk described by `st` (the hash loops are unrolled by
 * four: about 1.2 GB/s instead of 0.9 on the reference VM). Returns the index in `src` just
 * past the boundary (and resets `st`), or -1 when no boundary lies in the range (`st` advanced).
 */
function scan(m: Masks, st: ScanState, src: Uint8Array, start: number, end: number): number {
  let n = st.n;
  let h = st.h;
  let i = start;
  const skipTo = m.min - 1;
  if (n < skipTo) {
    const k = Math.min(skipTo - n, end - i);
    i += k;
    n += k;
    if (n < skipTo) {
      st.n = n;
      return -1;
    }
  }
  if (n < m.avg - 1) {
    // Below the average size: the stricter mask (normalized chunking).
    const base = i - n;
    const stop = Math.min(end, i + (m.avg - 1 - n));
    const at = roll(st, src, i, stop, h, m.maskS);
    if (at >= 0) return at;
    i = stop;
    h = st.h;
    n = i - base;
    if (n < m.avg - 1) {
      st.n = n;
      return -1;
    }
  }
  const base = i - n;
  const stop = Math.min(end, i + (m.max - n));
  const at = roll(st, src, i, stop, h, m.maskL);
  if (at >= 0) return at;
  n = stop - base;
  if (n >= m.max) return cut(st, stop);
  st.n = n;
  return -1;
}

/**
 * Rolls the gear hash `h` over `src[i, stop)`: the index just past the first byte after which
 * `(h & mask) === 0` (and `st` reset), or -1 with the hash at `stop` in `st.h`. Unrolled by four.
 */
function roll(st: ScanState, src: Uint8Array, i: number, stop: number, h: number, mask: number): number {
  const gear = GEAR;
  while (i + 4 <= stop) {
    h = ((h << 1) + gear[src[i]!]!) | 0;
    if ((h & mask) === 0) return cut(st, i + 1);
    h = ((h << 1) + gear[src[i + 1]!]!) | 0;
    if ((h & mask) === 0) return cut(st, i + 2);
    h = ((h << 1) + gear[src[i + 2]!]!) | 0;
    if ((h & mask) === 0) return cut(st, i + 3);
    h = ((h << 1) + gear[src[i + 3]!]!) | 0;
    if ((h & mask) === 0) return cut(st, i + 4);
    i += 4;
  }
  while (i < stop) {
    h = ((h << 1) + gear[src[i]!]!) | 0;
    i++;
    if ((h & mask) === 0) return cut(st, i);
  }
  st.h = h;
  return -1;
}

/** A copy of `src[from, to)` with its own buffer (Buffer#slice would return a view). */
function copyOf(src: Uint8Array, from: number, to: number): Uint8Array {
  return Uint8Array.prototype.slice.call(src, from, to);
}

/**
 * The end offsets of the chunks of a whole buffer, in order; the last is `buf.length` (none for
 * an empty buffer). The same boundaries as a `Chunker` fed the same bytes in any split.
 */
export function cutPoints(buf: Uint8Array, params: ChunkParams = DEFAULT_CHUNK_PARAMS): number[] {
  const m = masksFor(params);
  const st: ScanState = { n: 0, h: 0 };
  const cuts: number[] = [];
  let i = 0;
  while (i < buf.length) {
    const c = scan(m, st, buf, i, buf.length);
    if (c < 0) break;
    cuts.push(c);
    i = c;
  }
  if (cuts.length === 0 ? buf.length > 0 : cuts[cuts.length - 1] !== buf.length) cuts.push(buf.length);
  return cuts;
}

/** The cuts of one segment of a stream, chunked as if a boundary came just before it. */
export interface SegmentCuts {
  /** End offsets in the segment of the chunks found, ascending; the partial tail is not one. */
  cuts: number[];
  /** Bytes after the last cut (the scan state's chunk length). */
  n: number;
  /** Gear hash of the scan state after the last byte. */
  h: number;
}

/**
 * Chunks `buf` as if a boundary came just before it, without reporting its partial tail as a
 * chunk. Segments of one stream chunked this way (in any order, on any thread) are turned into
 * the stream's true cuts by a `SegmentJoiner`.
 */
export function segmentCuts(buf: Uint8Array, params: ChunkParams = DEFAULT_CHUNK_PARAMS): SegmentCuts {
  const m = masksFor(params);
  const st: ScanState = { n: 0, h: 0 };
  const cuts: number[] = [];
  let i = 0;
  while (i < buf.length) {
    const c = scan(m, st, buf, i, buf.length);
    if (c < 0) break;
    cuts.push(c);
    i = c;
  }
  return { cuts, n: st.n, h: st.h };
}

/** A chunk of the stream completed by `SegmentJoiner.push`. */
export interface JoinedChunk {
  /** The chunk's bytes: a view of the segment, or a fresh buffer when it began in an earlier one. */
  data: Uint8Array;
  /**
   * When >= 0, the chunk is the segment's own chunk ending at `cuts[index]` (and starting at
   * `cuts[index - 1]`, or 0), so whatever was computed for that chunk of the segment (its id)
   * holds for it; -1 when the chunk is not one of the segment's own.
   */
  index: number;
}

/**
 * Turns segments of one stream, each chunked independently by `segmentCuts` (in parallel, say),
 * into exactly the chunks sequential chunking of the whole stream finds.
 *
 * Why it works: a boundary depends only on the bytes since the previous boundary. A segment's own
 * chain of cuts starts from a pretend boundary at its first byte; the true chain enters the
 * segment carrying the bytes since the last true cut. The joiner continues the true chain into
 * the segment (scanning on the calling thread) until it lands on a cut the segment found on its
 * own; from there both chains are the same chain, so the rest of the segment's cuts, and its end
 * state, are taken as they are. When the true chain enters at a boundary the chains agree at
 * once; when they never meet (a long run of one repeated byte cuts every `max` bytes, offset by
 * the entry point) the whole segment is scanned here, which is still correct.
 */
export class SegmentJoiner {
  private readonly m: Masks;
  private readonly st: ScanState = { n: 0, h: 0 };
  private carry: Uint8Array[] = [];
  private done = false;

  /** Throws VolumeError INVALID_ARGUMENT for bad params. */
  constructor(params: ChunkParams = DEFAULT_CHUNK_PARAMS) {
    this.m = masksFor(params);
  }

  /**
   * Takes the next segment of the stream with its `segmentCuts` (made with the same params);
   * returns the chunks it completed, in order. Views of `data` stay in use until the caller drops
   * them, and the segment's tail is kept until the next push or `finish`.
   */
  push(data: Uint8Array, seg: SegmentCuts): JoinedChunk[] {
    if (this.done) throw new VolumeError("INVALID_ARGUMENT", "push segment: joiner already finished");
    const out: JoinedChunk[] = [];
    const cuts = seg.cuts;
    let pos = 0;
    let k = 0;
    if (this.st.n > 0) {
      for (;;) {
        const c = scan(this.m, this.st, data, pos, data.length);
        if (c < 0) {
          if (pos < data.length) this.carry.push(data.subarray(pos));
          return out;
        }
        out.push({ data: this.take(data.subarray(pos, c)), index: -1 });
        pos = c;
        while (k < cuts.length && cuts[k]! < c) k++;
        if (k < cuts.length && cuts[k] === c) {
          k++;
          break;
        }
      }
    }
    for (; k < cuts.length; k++) {
      out.push({ data: data.subarray(pos, cuts[k]), index: k });
      pos = cuts[k]!;
    }
    if (seg.n !== data.length - pos) {
      throw new VolumeError("INVALID_ARGUMENT", `push segment: cuts do not match the segment (tail ${data.length - pos}, state ${seg.n})`);
    }
    this.st.n = seg.n;
    this.st.h = seg.h;
    if (pos < data.length) this.carry.push(data.subarray(pos));
    return out;
  }

  /** True when the carried bytes (those since the last cut) are views of `buffer`. */
  holds(buffer: ArrayBufferLike): boolean {
    return this.carry.some((c) => c.buffer === buffer);
  }

  /** Ends the stream: the last partial chunk, or undefined when nothing is left. */
  finish(): Uint8Array | undefined {
    this.done = true;
    if (this.st.n === 0) return undefined;
    this.st.n = 0;
    return this.take(new Uint8Array(0));
  }

  /** The carried bytes followed by `rest`, as one buffer; empties the carry. */
  private take(rest: Uint8Array): Uint8Array {
    if (this.carry.length === 0) return rest;
    const parts = this.carry;
    this.carry = [];
    let len = rest.length;
    for (const p of parts) len += p.length;
    const out = new Uint8Array(len);
    let at = 0;
    for (const p of parts) {
      out.set(p, at);
      at += p.length;
    }
    out.set(rest, at);
    return out;
  }
}

/**
 * A streaming content-defined chunker. Feed bytes with `push` (any split), collect completed
 * chunks, and call `finish` once for the last partial chunk. Returned chunks are fresh copies the
 * caller owns; the chunker keeps no reference to pushed buffers after `push` returns.
 */
export class Chunker {
  readonly params: Readonly<ChunkParams>;
  private readonly m: Masks;
  private readonly st: ScanState = { n: 0, h: 0 };
  private carry: Uint8Array;
  private carryLen = 0;
  private done = false;

  /** Throws VolumeError INVALID_ARGUMENT for bad params. */
  constructor(params: ChunkParams = DEFAULT_CHUNK_PARAMS) {
    this.params = Object.freeze({ ...params });
    this.m = masksFor(params);
    this.carry = new Uint8Array(0);
  }

  /** Bytes pushed but not yet returned as a chunk (less than `params.max`). */
  get buffered(): number {
    return this.carryLen;
  }

  /** Consumes `data`; returns the chunks it completed, in order (possibly none). */
  push(data: Uint8Array): Uint8Array[] {
    if (this.done) throw new VolumeError("INVALID_ARGUMENT", "push chunker: already finished");
    const out: Uint8Array[] = [];
    let i = 0;
    if (this.carryLen > 0) {
      const c = scan(this.m, this.st, data, 0, data.length);
      if (c < 0) {
        this.append(data, 0, data.length);
        return out;
      }
      const chunk = new Uint8Array(this.carryLen + c);
      chunk.set(this.carry.subarray(0, this.carryLen), 0);
      chunk.set(data.subarray(0, c), this.carryLen);
      out.push(chunk);
      this.carryLen = 0;
      i = c;
    }
    while (i < data.length) {
      const c = scan(this.m, this.st, data, i, data.length);
      if (c < 0) {
        this.append(data, i, data.length);
        break;
      }
      out.push(copyOf(data, i, c));
      i = c;
    }
    return out;
  }

  /** Ends the stream: the last partial chunk, or undefined when nothing is left. */
  finish(): Uint8Array | undefined {
    this.done = true;
    if (this.carryLen === 0) return undefined;
    const last = copyOf(this.carry, 0, this.carryLen);
    this.carryLen = 0;
    this.carry = new Uint8Array(0);
    return last;
  }

  private append(src: Uint8Array, from: number, to: number): void {
    const need = this.carryLen + (to - from);
    if (need > this.carry.length) {
      const next = new Uint8Array(Math.min(this.m.max, Math.max(need, this.carry.length * 2, 64 * 1024)));
      next.set(this.carry.subarray(0, this.carryLen));
      this.carry = next;
    }
    this.carry.set(src.subarray(from, to), this.carryLen);
    this.carryLen = need;
  }
}
