import { Worker } from "node:worker_threads";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import { VolumeError } from "../errors.js";
import type { ChunkParams } from "./types.js";

/** A chunk with its id, as produced by a chunking session. */
export interface HashedChunk {
  /** blake3 hex of `data`. */
  id: string;
  data: Uint8Array;
}

/** Options of a ChunkPool. */
export interface ChunkPoolOptions {
  /** Number of worker threads; default 1 (the main thread is the other core on small hosts). */
  size?: number;
}

/**
 * One streaming chunk+hash job running in a worker. `push` copies the bytes to the worker and
 * returns at once; `take` waits for the chunks completed so far, in stream order.
 */
export interface ChunkSession {
  /** Sends bytes (copied; the caller may reuse `data`). */
  push(data: Uint8Array): void;
  /** Ends the stream. */
  finish(): void;
  /**
   * Waits until at least one reply (or the end) is available, then returns every chunk received
   * so far and whether the stream is complete. Throws VolumeError IO when the worker failed.
   */
  take(): Promise<{ chunks: HashedChunk[]; done: boolean }>;
  /** Bytes pushed whose replies have not come back yet. */
  readonly pending: number;
}

interface SessionState {
  chunks: HashedChunk[];
  done: boolean;
  error: Error | undefined;
  pending: number;
  pushed: number[];
  wake: (() => void) | undefined;
  worker: Worker | undefined;
}

function newWorker(): Worker {
  const here = import.meta.url;
  if (here.endsWith(".ts")) {
    const tsx = pathToFileURL(createRequire(here).resolve("tsx/esm/api").replace(/\.cjs$/, ".mjs")).href;
    const entry = new URL("./chunk-worker.ts", here).href;
    const boot = `import(${JSON.stringify(tsx)}).then((api) => api.tsImport(${JSON.stringify(entry)}, ${JSON.stringify(here)}))`;
    return new Worker(boot, { eval: true });
  }
  return new Worker(new URL("./chunk-worker.js", here));
}

/**
 * A small pool of worker threads that chunk (FastCDC) and hash (blake3) streams off the main
 * thread. Workers start lazily, keep the process alive only while a session runs, and sessions
 * are spread round-robin. `start()` resolves false when workers cannot run here; callers then
 * chunk on the main thread.
 */
export class ChunkPool {
  private readonly size: number;
  private workers: Worker[] = [];
  private readonly sessions = new Map<number, SessionState>();
  private nextSid = 1;
  private rr = 0;
  private starting: Promise<boolean> | undefined;
  private broken: Error | undefined;

  constructor(opts: ChunkPoolOptions = {}) {
    this.size = Math.max(1, opts.size ?? 1);
  }

  /** Starts the workers once; resolves true when they run, false when they cannot. */
  start(): Promise<boolean> {
    this.starting ??= (async () => {
      try {
        for (let i = 0; i < this.size; i++) {
          const w = newWorker();
          w.unref();
          await new Promise<void>((resolve, reject) => {
            const done = (err?: Error): void => {
              w.off("message", onReady).off("error", done).off("exit", onExit);
              if (err) reject(err);
              else resolve();
            };
            const onReady = (m: { ready?: boolean }): void => done(m.ready ? undefined : new Error("chunk worker did not start"));
            const onExit = (code: number): void => done(new Error(`chunk worker exited with code ${code}`));
            w.on("message", onReady).on("error", done).on("exit", onExit);
          });
          w.on("message", (m: { sid: number; chunks?: HashedChunk[]; done?: boolean; error?: string }) => this.onMessage(m));
          w.on("error", (err) => this.fail(err));
          w.on("exit", (code) => this.fail(new Error(`chunk worker exited with code ${code}`)));
          this.workers.push(w);
        }
        return true;
      } catch (err) {
        this.broken = err instanceof Error ? err : new Error(String(err));
        await this.close();
        return false;
      }
    })();
    return this.starting;
  }

  private onMessage(m: { sid: number; chunks?: HashedChunk[]; done?: boolean; error?: string }): void {
    const s = this.sessions.get(m.sid);
    if (!s) return;
    if (m.error !== undefined) s.error = VolumeError.IO("chunk stream", new Error(m.error));
    else {
      for (const c of m.chunks ?? []) s.chunks.push({ id: c.id, data: new Uint8Array(c.data.buffer, c.data.byteOffset, c.data.byteLength) });
      s.pending -= s.pushed.shift() ?? 0;
      if (m.done) s.done = true;
    }
    if (s.done || s.error) this.endSession(m.sid, s);
    s.wake?.();
  }

  private endSession(sid: number, s: SessionState): void {
    this.sessions.delete(sid);
    const w = s.worker;
    if (w && ![...this.sessions.values()].some((o) => o.worker === w)) w.unref();
  }

  private fail(err: Error): void {
    this.broken ??= err;
    for (const s of this.sessions.values()) {
      s.error ??= VolumeError.IO("chunk stream", err);
      s.wake?.();
    }
    this.sessions.clear();
  }

  /** True when the workers started and none has failed since. */
  get healthy(): boolean {
    return this.workers.length > 0 && this.broken === undefined;
  }

  /** Opens a chunking session; call only after `start()` resolved true. */
  session(params: ChunkParams): ChunkSession {
    const w = this.workers[this.rr++ % Math.max(1, this.workers.length)];
    const sid = this.nextSid++;
    const s: SessionState = { chunks: [], done: false, error: undefined, pending: 0, pushed: [], wake: undefined, worker: w };
    if (!w || this.broken) s.error = VolumeError.IO("chunk stream", this.broken ?? new Error("chunk pool not started"));
    else {
      this.sessions.set(sid, s);
      w.ref();
      w.postMessage({ op: "begin", sid, params });
    }
    return {
      push(data: Uint8Array) {
        if (s.error || !w) return;
        s.pending += data.length;
        s.pushed.push(data.length);
        const copy = Uint8Array.prototype.slice.call(data);
        w.postMessage({ op: "push", sid, data: copy }, [copy.buffer]);
      },
      finish() {
        if (s.error || !w) return;
        s.pushed.push(0);
        w.postMessage({ op: "finish", sid });
      },
      async take() {
        while (s.chunks.length === 0 && !s.done && !s.error) {
          await new Promise<void>((resolve) => (s.wake = resolve));
          s.wake = undefined;
        }
        if (s.error) throw s.error;
        const chunks = s.chunks;
        s.chunks = [];
        return { chunks, done: s.done };
      },
      get pending() {
        return s.pending;
      },
    };
  }

  /** Stops the workers; idempotent. */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    await Promise.all(ws.map((w) => w.terminate()));
  }
}

let shared: ChunkPool | undefined;

/** The process-wide pool (one worker) used by ChunkStores that are not given their own. */
export function sharedChunkPool(): ChunkPool {
  shared ??= new ChunkPool();
  return shared;
}
