/**
 * Buffer leases: a large received buffer goes back to whoever made it once no one holds a view
 * of it, rather than to the garbage collector.
 *
 * Why: the S3 store's GET worker transfers each body it receives to the main thread. Each is a
 * new ArrayBuffer there, and V8 counts their bytes as external memory: every few tens of MB
 * received it runs a full mark-compact of the main heap (tens of MB of modules). A cold read of
 * 1 GiB did about 25 of them, a quarter of the mount's CPU. A buffer handed back to the worker is
 * detached here at once (its bytes leave the count) and the worker receives the next body into
 * it: no new external memory, no full collection.
 *
 * The rule that makes it safe: a view of a leased buffer is good until the current task ends
 * (the microtasks after it included). Whoever keeps one longer (a cache, a pending write) takes a
 * `hold` first and releases it when done; whoever does not know about leases `pin`s the buffer,
 * which then never goes back. A buffer goes back only in a later task, when no hold is left and
 * it was never pinned: a view taken and used within one task needs nothing.
 *
 * ```ts
 * const first = lease(body.buffer, (b) => worker.postMessage({ recycle: b }, [b]));
 * const keep = hold(body.subarray(0, 10));   // a cache keeps a chunk of it
 * first.release();                          // the receiver is done
 * keep?.release();                          // evicted: the buffer goes back in a later task
 * ```
 */

/** One holder's claim on a leased buffer. `release` may be called more than once; the first counts. */
export interface BufferHold {
  release(): void;
}

interface Lease {
  readonly buffer: ArrayBuffer;
  readonly recycle: (buffer: ArrayBuffer) => void;
  holds: number;
  pinned: boolean;
  /** A check for `holds === 0` is set for the next task. */
  checking: boolean;
}

const leases = new WeakMap<ArrayBuffer, Lease>();
/** Buffers given back so far (for tests and diagnostics). */
let recycled = 0;

const NONE: BufferHold = { release() {} };

/**
 * Leases `buffer`: `recycle` gets it back, in a later task, once every hold is released and no
 * one pinned it. Returns the first hold (the receiver's).
 */
export function lease(buffer: ArrayBuffer, recycle: (buffer: ArrayBuffer) => void): BufferHold {
  const l: Lease = { buffer, recycle, holds: 0, pinned: false, checking: false };
  leases.set(buffer, l);
  return take(l);
}

/**
 * A hold on the buffer `view` is part of, so that it stays as it is until released; undefined
 * when the buffer is not leased (or pinned): nothing to release then.
 */
export function hold(view: Uint8Array): BufferHold | undefined {
  const l = leases.get(view.buffer as ArrayBuffer);
  return l && !l.pinned ? take(l) : undefined;
}

/** Like `hold`, for several views; the holds are released together. */
export function holdAll(views: readonly Uint8Array[]): BufferHold {
  const hs: BufferHold[] = [];
  for (const v of views) {
    const h = hold(v);
    if (h) hs.push(h);
  }
  if (hs.length === 0) return NONE;
  return { release: () => hs.forEach((h) => h.release()) };
}

/** Keeps the buffer `view` is part of for good (to the garbage collector): for holders that cannot say when they are done. */
export function pin(view: Uint8Array): void {
  const l = leases.get(view.buffer as ArrayBuffer);
  if (l) {
    l.pinned = true;
    leases.delete(l.buffer);
  }
}

/** Buffers given back to their makers so far in this process. */
export function recycledBuffers(): number {
  return recycled;
}

function take(l: Lease): BufferHold {
  l.holds++;
  let held = true;
  return {
    release() {
      if (!held) return;
      held = false;
      if (--l.holds === 0 && !l.checking) {
        l.checking = true;
        setImmediate(() => giveBack(l));
      }
    },
  };
}

function giveBack(l: Lease): void {
  l.checking = false;
  if (l.holds > 0 || l.pinned || leases.get(l.buffer) !== l) return;
  leases.delete(l.buffer);
  recycled++;
  l.recycle(l.buffer);
}
