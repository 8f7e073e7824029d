/**
 * Types of the chunk layer: content-defined chunks, packs and the host-wide chunk cache.
 */

/** Content-defined chunking parameters, in bytes. min <= avg <= max, avg a power of two. */
export interface ChunkParams {
  min: number;
  avg: number;
  max: number;
}

/** What a pack entry holds. */
export type PackEntryKind = "chunk" | "tree";

/**
 * The `ChunkCache` seam: a host-wide cache of chunk bytes keyed by chunk id, shared by every
 * mount and process on the host, bounded in size with least-recently-used eviction.
 * It is a cache: any entry may vanish at any time; `get` of a missing id returns undefined.
 * Implementations never return bytes whose hash is not `id` (they verify or trust their writes).
 */
export interface ChunkCache {
  /** The chunk's bytes, or undefined. Marks it recently used. */
  get(id: string): Promise<Uint8Array | undefined>;
  /** Stores a chunk (idempotent); may evict others to stay under the bound. */
  put(id: string, data: Uint8Array): Promise<void>;
  /** Bytes held now. */
  size(): Promise<number>;
  /** Releases resources; idempotent. */
  close(): Promise<void>;
}
