/**
 * volumefs/object: the `ObjectStore` seam and its implementations.
 *
 * ```ts
 * import { FileObjectStore, S3ObjectStore, withRetry } from "./object/index.js";
 * const local = new FileObjectStore("/root/.strata/objects");
 * const s3 = withRetry(S3ObjectStore.fromUrl("s3://bucket/prefix", { endpoint: "http://127.0.0.1:7480" }));
 * await s3.put("packs/ab/cd", bytes, { ifNoneMatch: "*" });
 * ```
 */
export * from "./types.js";
export { MemoryObjectStore, compareKeys } from "./memory-object-store.js";
export { checkKey } from "./keys.js";
