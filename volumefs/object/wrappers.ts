import { StrataError } from "../../metadata/index.js";
import { VolumeError } from "../errors.js";
import type { ByteRange, GetOptions, ObjectInfo, ObjectStore, PutOptions } from "./types.js";

/** Options of `withRetry`. */
export interface RetryOptions {
  /** Total attempts per call, including the first; default 5. */
  attempts?: number;
  /** Delay before the first retry, in ms, doubled per retry; default 50. */
  baseDelayMs?: number;
  /** Upper bound of one delay, in ms; default 2 000. */
  maxDelayMs?: number;
}

function isRetryable(err: unknown): boolean {
  return err instanceof StrataError && err.retryable;
}

/**
 * Wraps `store` so that each call that fails with a `retryable` error is repeated, up to
 * `attempts` in all, after exponential backoff with full jitter. Non-retryable errors (NOT_FOUND,
 * ACCESS_DENIED, PRECONDITION_FAILED, …) are thrown at once; after the last attempt the last
 * error is thrown. `list` retries only a failure before its first result.
 */
export function withRetry(store: ObjectStore, opts: RetryOptions = {}): ObjectStore {
  const attempts = Math.max(1, opts.attempts ?? 5);
  const base = opts.baseDelayMs ?? 50;
  const max = opts.maxDelayMs ?? 2000;
  const retry = async <T>(fn: () => Promise<T>): Promise<T> => {
    for (let attempt = 1; ; attempt++) {
      try {
        return await fn();
      } catch (err) {
        if (!isRetryable(err) || attempt >= attempts) throw err;
        const cap = Math.min(max, base * 2 ** (attempt - 1));
        await new Promise((r) => setTimeout(r, Math.random() * cap));
      }
    }
  };
  return {
    url: store.url,
    put: (key, body, o) => retry(() => store.put(key, body, o)),
    putFile: (key, path, o) => retry(() => store.putFile(key, path, o)),
    get: (key, range, o) => retry(() => store.get(key, range, o)),
    head: (key) => retry(() => store.head(key)),
    delete: (keys) => retry(() => store.delete(keys)),
    async *list(prefix: string): AsyncIterable<ObjectInfo> {
      let started = false;
      for (let attempt = 1; ; attempt++) {
        try {
          for await (const info of store.list(prefix)) {
            started = true;
            yield info;
          }
          return;
        } catch (err) {
          if (started || !isRetryable(err) || attempt >= attempts) throw err;
          await new Promise((r) => setTimeout(r, Math.random() * Math.min(max, base * 2 ** (attempt - 1))));
        }
      }
    },
  };
}

/**
 * Wraps `store` so that every key is stored under `prefix` (which should end in "/"); keys the
 * caller sees and lists are relative to it.
 */
export function withPrefix(store: ObjectStore, prefix: string): ObjectStore {
  return {
    url: store.url.endsWith("/") ? store.url + prefix : `${store.url}/${prefix}`,
    put: (key, body, o) => store.put(prefix + key, body, o),
    putFile: (key, path, o) => store.putFile(prefix + key, path, o),
    get: (key, range, o) => store.get(prefix + key, range, o),
    head: (key) => store.head(prefix + key),
    delete: (keys) => store.delete(keys.map((k) => prefix + k)),
    async *list(p: string): AsyncIterable<ObjectInfo> {
      for await (const info of store.list(prefix + p)) yield { key: info.key.slice(prefix.length), size: info.size };
    },
  };
}

/** The operations `withFaults` can fail. */
export type FaultOp = "put" | "putFile" | "get" | "head" | "list" | "delete";

/** What a fault plan decides for one call. */
export interface Fault {
  /** The error to throw. */
  error: Error;
  /** For put/putFile: perform the real call first, then throw (the "ack was lost" case). */
  after?: boolean;
}

/**
 * A fault plan: called before every call with the operation, its key (the first key for delete,
 * the prefix for list) and the 1-based number of calls of that operation so far (this one
 * included). Returns an Error (thrown before the real call), a Fault, or undefined (no fault).
 */
export type FaultPlan = (op: FaultOp, key: string, callNumber: number) => Error | Fault | undefined;

/** A store that fails on the schedule of `plan`; records what happened for assertions. */
export interface FaultyStore extends ObjectStore {
  /** Calls seen so far, per operation (failed ones included). */
  readonly calls: Record<FaultOp, number>;
  /** Faults injected so far. */
  readonly injected: number;
}

/** For tests: wraps a real store so that it fails when `plan` says so. */
export function withFaults(store: ObjectStore, plan: FaultPlan): FaultyStore {
  const calls: Record<FaultOp, number> = { put: 0, putFile: 0, get: 0, head: 0, list: 0, delete: 0 };
  let injected = 0;
  const decide = (op: FaultOp, key: string): Fault | undefined => {
    calls[op]++;
    const f = plan(op, key, calls[op]);
    if (f === undefined) return undefined;
    injected++;
    return f instanceof Error ? { error: f } : f;
  };
  const wrap = async <T>(op: FaultOp, key: string, fn: () => Promise<T>): Promise<T> => {
    const f = decide(op, key);
    if (f === undefined) return fn();
    if (f.after === true && (op === "put" || op === "putFile")) {
      await fn();
      throw f.error;
    }
    throw f.error;
  };
  return {
    url: store.url,
    calls,
    get injected() {
      return injected;
    },
    put: (key: string, body: Uint8Array, o?: PutOptions) => wrap("put", key, () => store.put(key, body, o)),
    putFile: (key: string, path: string, o?: PutOptions) => wrap("putFile", key, () => store.putFile(key, path, o)),
    get: (key: string, range?: ByteRange, o?: GetOptions) => wrap("get", key, () => store.get(key, range, o)),
    head: (key: string) => wrap("head", key, () => store.head(key)),
    delete: (keys: readonly string[]) => wrap("delete", keys[0] ?? "", () => store.delete(keys)),
    async *list(prefix: string): AsyncIterable<ObjectInfo> {
      const f = decide("list", prefix);
      if (f !== undefined) throw f.error;
      yield* store.list(prefix);
    },
  };
}

/** A plan that fails the `n`th call (1-based) of `op` with `err` (thrown before the call unless `after`). */
export function failNth(op: FaultOp, n: number, err: Error, after = false): FaultPlan {
  return (o, _key, call) => (o === op && call === n ? { error: err, after } : undefined);
}

/** A plan that fails the first `n` calls of `op` with `err`. */
export function failFirst(op: FaultOp, n: number, err: Error, after = false): FaultPlan {
  return (o, _key, call) => (o === op && call <= n ? { error: err, after } : undefined);
}

/** A retryable STORE_UNREACHABLE error, as a flaky network gives. */
export function transientError(op = "fault"): VolumeError {
  return VolumeError.STORE_UNREACHABLE(op, new Error("injected fault"));
}
