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
  async get(id: string): Promise<Uint8Array | undefined> {
    const v = this.map.get(id);
    if (v === undefined) return undefined;
    this.map.delete(id);
    this.map.set(id, v);
    return v;
  }

  /** Stores a chunk (idempotent), evicting the least recently used ones beyond the bound. */
  async put(id: string, data: Uint8Array): Promise<void> {
    if (this.map.has(id)) {
      await this.get(id);
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
