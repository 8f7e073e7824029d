import type { ChunkLocation } from "../../metadata/index.js";
import type { ChunkCache } from "./types.js";

/** Options of a MemoryChunkCache. */
export interface MemoryChunkCacheOptions {
  /** Upper bound of the bytes held; least recently used chunks are evicted beyond it. */
  maxBytes: number;
}

/**
 * A ChunkCache in process memory with least-recently-used eviction. It trusts its writes: the
 * caller puts only verified bytes. A chunk larger than `maxBytes` is not kept.
 */
export class MemoryChunkCache implements ChunkCache {
  private readonly map = new Map<string, Uint8Array>();
  private bytes = 0;
  private readonly maxBytes: number;

  constructor(opts: MemoryChunkCacheOptions) {
    this.maxBytes = opts.maxBytes;
  }

  /** The chunk's bytes (marked most recently used), or undefined. */
  async get(loc: Pick<ChunkLocation, "id">): Promise<Uint8Array | undefined> {
    const id = loc.id;
    const v = this.map.get(id);
    if (v === undefined) return undefined;
    this.map.delete(id);
    this.map.set(id, v);
    return v;
  }

  /** Stores each chunk of the range (a copy), evicting the least recently used beyond the bound. */
  async putRange(_pack: string, offset: number, bytes: Uint8Array, members: readonly ChunkLocation[]): Promise<void> {
    for (const m of members) this.put(m.id, bytes.slice(m.offset - offset, m.offset - offset + m.length));
  }

  private put(id: string, data: Uint8Array): void {
    const had = this.map.get(id);
    if (had !== undefined) {
      this.map.delete(id);
      this.map.set(id, had);
      return;
    }
    if (data.length > this.maxBytes) return;
    this.map.set(id, data);
    this.bytes += data.length;
    for (const [k, v] of this.map) {
      if (this.bytes <= this.maxBytes) break;
      this.map.delete(k);
      this.bytes -= v.length;
    }
  }

  /** Bytes held now. */
  async size(): Promise<number> {
    return this.bytes;
  }

  /** Ids held, least recently used first. */
  keys(): string[] {
    return [...this.map.keys()];
  }

  /** Drops everything; idempotent. */
  async close(): Promise<void> {
    this.map.clear();
    this.bytes = 0;
  }
}
