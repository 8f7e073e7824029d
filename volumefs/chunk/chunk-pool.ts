import { Worker } from "node:worker_threads";
import { createRequire } from "node:module";
import { pathToFileURL } from "node:url";
import { VolumeError } from "../errors.js";
import type { SegmentCuts } from "./chunker.js";
import type { ChunkParams } from "./types.js";

/** A segment chunked and hashed by a worker: see `segmentCuts` and `SegmentJoiner`. */
export interface ChunkedSegment extends SegmentCuts {
  /** The segment's bytes, handed back by the worker (the same bytes that were sent). */
  data: Uint8Array;
  /** blake3 hex of each of the segment's own chunks: `ids[k]` is the chunk ending at `cuts[k]`. */
  ids: string[];
}

/** Options of a ChunkPool. */
export interface ChunkPoolOptions {
  /**
   * Number of worker threads; default 1. On a 2-core host two workers were no faster for one
   * large file (sync of 512 MiB on the file store, `strata put` on RGW): the main thread (reads,
   * pack copies and hashes, SQLite, uploads) is then the bottleneck and three busy threads share
   * two cores. Larger hosts can give a ChunkStore a bigger pool.
   */
  size?: number;
}

interface Job {
  resolve: (seg: ChunkedSegment) => void;
  reject: (err: Error) => void;
  worker: number;
  offset: number;
  length: number;
}

interface Reply {
  job: number;
  buffer: ArrayBuffer;
  cuts?: number[];
  n?: number;
  h?: number;
  ids?: string[];
  error?: string;
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
 * A small pool of worker threads that chunk (FastCDC) and hash (blake3) segments of streams off
 * the main thread; a `SegmentJoiner` on the caller's side turns the segments' cuts into the
 * stream's. Segment bytes move to a worker and back without copies (the buffer is transferred).
 * Workers start lazily, keep the process alive only while they have jobs, and each job goes to
 * the worker with the fewest jobs. `start()` resolves false when workers cannot run here; callers
 * then chunk on the main thread.
 */
export class ChunkPool {
  private readonly want: number;
  private workers: Worker[] = [];
  private load: number[] = [];
  private readonly jobs = new Map<number, Job>();
  private nextJob = 1;
  private starting: Promise<boolean> | undefined;
  private broken: Error | undefined;

  constructor(opts: ChunkPoolOptions = {}) {
    this.want = Math.max(1, opts.size ?? 1);
  }

  /** Number of worker threads the pool runs (once started). */
  get size(): number {
    return this.want;
  }

  /** Starts the workers once; resolves true when they run, false when they cannot. */
  start(): Promise<boolean> {
    this.starting ??= (async () => {
      try {
        const settled = await Promise.allSettled(Array.from({ length: this.want }, () => this.startOne()));
        const started = settled.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
        const failed = settled.find((r): r is PromiseRejectedResult => r.status === "rejected");
        if (failed) {
          await Promise.all(started.map((w) => w.terminate()));
          throw failed.reason;
        }
        started.forEach((w, k) => {
          w.on("message", (m: Reply) => this.onMessage(m));
          w.on("error", (err) => this.fail(err));
          w.on("exit", (code) => this.fail(new Error(`chunk worker ${k} exited with code ${code}`)));
        });
        this.workers = started;
        this.load = started.map(() => 0);
        return true;
      } catch (err) {
        this.broken = err instanceof Error ? err : new Error(String(err));
        await this.close();
        return false;
      }
    })();
    return this.starting;
  }

  private async startOne(): Promise<Worker> {
    const w = newWorker();
    w.unref();
    try {
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
    } catch (err) {
      await w.terminate();
      throw err;
    }
    return w;
  }

  private onMessage(m: Reply): void {
    const job = this.jobs.get(m.job);
    if (!job) return;
    this.jobs.delete(m.job);
    if (--this.load[job.worker]! === 0) this.workers[job.worker]?.unref();
    if (m.error !== undefined) job.reject(VolumeError.IO("chunk segment", new Error(m.error)));
    else job.resolve({ data: new Uint8Array(m.buffer, job.offset, job.length), cuts: m.cuts!, n: m.n!, h: m.h!, ids: m.ids! });
  }

  private fail(err: Error): void {
    this.broken ??= err;
    for (const job of this.jobs.values()) job.reject(VolumeError.IO("chunk segment", err));
    this.jobs.clear();
  }

  /** True when the workers started and none has failed since. */
  get healthy(): boolean {
    return this.workers.length > 0 && this.broken === undefined;
  }

  /**
   * Chunks and hashes one segment in a worker; call only after `start()` resolved true. The
   * segment's ArrayBuffer moves to the worker: the caller hands over the whole buffer (every view
   * of it is unusable until the promise settles) and gets the same bytes back as `data`. Rejects
   * with VolumeError IO when the worker fails (the bytes are then lost to the caller).
   */
  chunkSegment(data: Uint8Array, params: ChunkParams): Promise<ChunkedSegment> {
    if (this.broken || this.workers.length === 0) {
      return Promise.reject(VolumeError.IO("chunk segment", this.broken ?? new Error("chunk pool not started")));
    }
    let worker = 0;
    for (let k = 1; k < this.load.length; k++) if (this.load[k]! < this.load[worker]!) worker = k;
    const id = this.nextJob++;
    const w = this.workers[worker]!;
    if (this.load[worker]!++ === 0) w.ref();
    const buffer = data.buffer;
    return new Promise<ChunkedSegment>((resolve, reject) => {
      this.jobs.set(id, { resolve, reject, worker, offset: data.byteOffset, length: data.byteLength });
      const msg = { job: id, buffer, offset: data.byteOffset, length: data.byteLength, params };
      w.postMessage(msg, buffer instanceof ArrayBuffer ? [buffer] : []);
    });
  }

  /** Stops the workers; idempotent. */
  async close(): Promise<void> {
    const ws = this.workers;
    this.workers = [];
    this.load = [];
    await Promise.all(ws.map((w) => w.terminate()));
  }
}

let shared: ChunkPool | undefined;

/** The process-wide pool used by ChunkStores that are not given their own. */
export function sharedChunkPool(): ChunkPool {
  shared ??= new ChunkPool();
  return shared;
}
