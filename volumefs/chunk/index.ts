/**
 * chunk: content-defined chunking (FastCDC), blake3 ids, pack objects, the chunk store (upload
 * and read pipelines) and the host-wide chunk cache.
 *
 * ```ts
 * import { ChunkStore, DiskChunkCache } from "../chunk/index.js";
 * const store = new ChunkStore({ objects, meta, cache: new DiskChunkCache({ dir, maxBytes: 10 * 2 ** 30 }) });
 * const w = store.writer();
 * const file = await w.writeBuffer(bytes);          // { chunks: ChunkRef[], size }
 * w.addTree(treeId, treeBytes);
 * const stats = await w.flush();                   // packs uploaded, then registered in meta
 * const head = await store.readRange(file.chunks, 0, 4096);
 * ```
 */
export * from "./types.js";
export { Chunker, cutPoints, segmentCuts, SegmentJoiner, DEFAULT_CHUNK_PARAMS, GEAR, GEAR_VERSION, type SegmentCuts, type JoinedChunk } from "./chunker.js";
export { chunkId, verifyChunk, isChunkId, ID_HEX_LENGTH } from "./hash.js";
export {
  PackBuilder,
  parsePack,
  readPackIndex,
  packKey,
  PACK_FORMAT_VERSION,
  PACK_TRAILER_BYTES,
  PACK_INDEX_ENTRY_BYTES,
  type PackEntry,
  type PackIndex,
  type BuiltPack,
} from "./pack.js";
export {
  ChunkStore,
  type ChunkStoreOptions,
  type ChunkWriter,
  type ChunkRef,
  type WriteResult,
  type WriteStats,
  type WriteStreamOptions,
} from "./chunk-store.js";
export { ChunkPool, sharedChunkPool, type ChunkPoolOptions, type ChunkedSegment } from "./chunk-pool.js";
export { DiskChunkCache, type DiskChunkCacheOptions } from "./disk-chunk-cache.js";
export { FileCopyCache, CopyFill, CopyReader, type FileCopyCacheOptions } from "./file-copy-cache.js";
export { MemoryChunkCache, type MemoryChunkCacheOptions } from "./memory-chunk-cache.js";
