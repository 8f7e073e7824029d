/**
 * volumefs/object: the `ObjectStore` seam and its implementations.
 *
 * ```ts
 * import { FileObjectStore, S3ObjectStore, withRetry } from "./object/index.js";
 * const local = new FileObjectStore("/root/.strata/objects");
 * const s3 = S3ObjectStore.fromUrl("s3://bucket/prefix", { endpoint: "http://127.0.0.1:7480" });
 * await s3.ensureBucket();
 * const store = withRetry(s3);
 * await store.put("packs/ab/cd", bytes, { ifNoneMatch: "*" });
 * ```
 *
 * The conformance suite lives in `./conformance.js` (it imports vitest, so it is not exported here).
 */
export * from "./types.js";
export { MemoryObjectStore, compareKeys } from "./memory-object-store.js";
export { FileObjectStore } from "./file-object-store.js";
export { S3ObjectStore, translateS3Error, type S3ObjectStoreOptions } from "./s3-object-store.js";
export {
  withRetry,
  withPrefix,
  withFaults,
  failNth,
  failFirst,
  transientError,
  type RetryOptions,
  type FaultOp,
  type Fault,
  type FaultPlan,
  type FaultyStore,
} from "./wrappers.js";
export { checkKey } from "./keys.js";
export { hold, holdAll, pin, recycledBuffers, type BufferHold } from "./buffer-lease.js";
