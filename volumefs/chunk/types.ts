/**
 * Types of the chunk layer: content-defined chunks, packs and the host-wide chunk cache.
 */
import type { ChunkLocation } from "../../metadata/index.js";

/** Content-defined chunking parameters, in bytes. min <= avg <= max, avg a power of two. */
export interface ChunkParams {
  min: number;
  avg: number;
  max: number;
}

/** What a pack entry holds. */
export type PackEntryKind = "chunk" | "tree";

/**
 * The `ChunkCache` seam: a host-wide cache of chunk bytes, shared by every mount and process on
 * the host, bounded in size with least-recently-used eviction. Chunks are looked up by their
 * location (id and place in a pack) and stored a fetched pack range at a time, so that an
 * implementation may keep one file per pack instead of one per chunk.
 * It is a cache: any entry may vanish at any time; `get` of a missing chunk returns undefined.
 * Implementations never return bytes whose hash is not the id (they verify or trust their writes).
 */
export interface ChunkCache {
  /** The chunk's bytes, or undefined. Marks it recently used. */
  get(loc: ChunkLocation): Promise<Uint8Array | undefined>;
  /**
   * Stores `bytes`, verified bytes of pack `pack` starting at `offset`, which hold the chunks
   * `members` (idempotent); may evict others to stay under the bound.
   */
  putRange(pack: string, offset: number, bytes: Uint8Array, members: readonly ChunkLocation[]): Promise<void>;
  /** Bytes held now. */
  size(): Promise<number>;
  /** Releases resources; idempotent. */
  close(): Promise<void>;
}
