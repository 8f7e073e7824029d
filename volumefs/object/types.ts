/**
 * The `ObjectStore` seam: a flat key space of immutable-ish byte objects (S3, a local directory).
 *
 * Contracts every implementation keeps (the conformance suite `describeObjectStore` checks them):
 * - Keys are non-empty strings of `/`-separated segments, no segment empty, `.` or `..`.
 * - Every method is idempotent: putting the same bytes twice, deleting a missing key, are fine.
 * - A put is atomic: a reader sees the whole old object, the whole new one, or none; never a part.
 * - Missing objects: `get` throws VolumeError NOT_FOUND; `head` returns undefined.
 * - Failures are VolumeErrors: STORE_UNREACHABLE (retryable) for network and 5xx trouble,
 *   ACCESS_DENIED for credentials, PRECONDITION_FAILED for a failed conditional put,
 *   IO for local file-system failures. Transient ones carry `retryable: true`.
 */

import type { BufferHold } from "./buffer-lease.js";

/** Options of a put. */
export interface PutOptions {
  /** Create only: fail with PRECONDITION_FAILED if the key already exists (If-None-Match: *). */
  ifNoneMatch?: "*";
}

/** A byte range of an object. */
export interface ByteRange {
  /** First byte, from 0. */
  offset: number;
  /** Number of bytes; the result is shorter only when the object ends first. */
  length: number;
}

/** What a ranged get may do besides returning the bytes. */
export interface GetOptions {
  /**
   * Parts of the range (offsets from its start) whose blake3 digests the store may compute as it
   * receives the bytes, while they are in the CPU's cache (the S3 store's GET worker does). When
   * it does, it sets `digests`: one lowercase hex digest per part, in order. A caller that must
   * check the bytes checks them itself when `digests` stays unset.
   */
  blake3?: HashedParts;
  /**
   * Set by a caller that can say when it is done with the bytes: a store that received them into
   * a buffer it wants back (the S3 store's GET worker) then sets `hold`, and the buffer goes back
   * once the caller releases it and no other holder is left (see buffer-lease.ts). Without this
   * option the bytes are the caller's for good.
   */
  lease?: { hold?: BufferHold };
}

/** See GetOptions.blake3. */
export interface HashedParts {
  parts: readonly ByteRange[];
  digests?: string[];
}

/** One listed object. */
export interface ObjectInfo {
  key: string;
  /** Size in bytes. */
  size: number;
}

export interface ObjectStore {
  /**
   * Stores `body` under `key`, replacing any object there (unless `ifNoneMatch`). `body` is not
   * used after the returned promise settles: the caller may then reuse it.
   */
  put(key: string, body: Uint8Array, opts?: PutOptions): Promise<void>;
  /**
   * Stores the contents of a local file under `key`; large files go up in parts
   * (multipart on S3). The file must not change while this runs.
   */
  putFile(key: string, path: string, opts?: PutOptions): Promise<void>;
  /** The whole object, or the given range of it. Throws NOT_FOUND when missing. */
  get(key: string, range?: ByteRange, opts?: GetOptions): Promise<Uint8Array>;
  /** Size of the object, or undefined when missing. */
  head(key: string): Promise<{ size: number } | undefined>;
  /** Objects whose keys start with `prefix`, in ascending key order, paged internally. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  /** Removes the objects; missing keys are ignored. */
  delete(keys: readonly string[]): Promise<void>;
  /** A description for messages, e.g. "s3://bucket/prefix" or "file:///path". */
  readonly url: string;
}
