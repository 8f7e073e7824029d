/**
 * The host-wide chunk cache on disk, shared by every mount and process on the host.
 *
 * Layout under `dir`:
 *   <ab>/<id>        one file per chunk, named by its full id; <ab> = the id's first two hex chars
 *   tmp/<id>.<pid>.<random>   a write in progress
 *
 * Invariants: a chunk file appears only by rename of a complete temp file, so a reader sees a
 * whole chunk or nothing; any file may vanish at any time (another process evicts it), and a
 * missing file (ENOENT) is a miss, never an error. Recency is the file's mtime, touched on a hit
 * (at most once a minute per chunk), so every process sharing the directory evicts in roughly the
 * same least-recently-used order. Each process tracks sizes and recency in memory, learned by a
 * scan on open and refreshed by a rescan every `rescanMs`; bytes read back are verified against
 * their id, and a damaged file is deleted and reported as a miss.
 */
import { mkdir, readdir, readFile, rename, stat, unlink, utimes, writeFile } from "node:fs/promises";
import { statSync } from "node:fs";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { VolumeError } from "../errors.js";
import { verifyChunk } from "./hash.js";
import type { ChunkCache } from "./types.js";

/** Options of a DiskChunkCache. */
export interface DiskChunkCacheOptions {
  /** The cache directory; created if missing. */
  dir: string;
  /** Upper bound of the bytes of chunk files this process keeps the directory under. */
  maxBytes: number;
  /** Interval between rescans of the directory, to learn other processes' files; default 60 000 ms. */
  rescanMs?: number;
}

interface Entry {
  size: number;
  /** Last time this process touched the file's mtime, ms since the epoch. */
  touched: number;
}

const TOUCH_EVERY_MS = 60_000;
const STALE_TMP_MS = 3_600_000;

function isEnoent(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === "ENOENT";
}

/** A ChunkCache of files in a directory, LRU-bounded, safe to share between processes. */
export class DiskChunkCache implements ChunkCache {
  readonly dir: string;
  private readonly maxBytes: number;
  private readonly rescanMs: number;
  private readonly entries = new Map<string, Entry>();
  private bytes = 0;
  private ready: Promise<void> | undefined;
  private lastScan = 0;
  private scanning: Promise<void> | undefined;
  private firstScan: Promise<void> | undefined;
  private closed = false;

  constructor(opts: DiskChunkCacheOptions) {
    this.dir = opts.dir;
    this.maxBytes = opts.maxBytes;
    this.rescanMs = opts.rescanMs ?? 60_000;
  }

  /**
   * Creates the directory and starts learning what it holds in the background (a full cache is
   * ~10^5 files: a short-lived command must not wait for a scan to read one chunk); eviction waits
   * for the first scan. Called by every method, idempotent.
   */
  open(): Promise<void> {
    this.ready ??= (async () => {
      try {
        await mkdir(join(this.dir, "tmp"), { recursive: true });
      } catch (err) {
        throw VolumeError.IO("open chunk cache", err, { path: this.dir });
      }
      this.scanning = this.scan()
        .then(() => this.evict())
        .catch(() => undefined)
        .finally(() => (this.scanning = undefined));
      this.firstScan = this.scanning;
    })();
    return this.ready;
  }

  private pathOf(id: string): string {
    return join(this.dir, id.slice(0, 2), id);
  }

  private async scan(): Promise<void> {
    const found: { id: string; size: number; mtime: number }[] = [];
    const tops = await readdir(this.dir).catch(() => [] as string[]);
    const now = Date.now();
    for (const top of tops) {
      if (this.closed) return;
      if (top === "tmp") {
        for (const t of await readdir(join(this.dir, "tmp")).catch(() => [] as string[])) {
          const p = join(this.dir, "tmp", t);
          const s = await stat(p).catch(() => undefined);
          if (s && now - s.mtimeMs > STALE_TMP_MS) await unlink(p).catch(() => undefined);
        }
        continue;
      }
      if (!/^[0-9a-f]{2}$/.test(top)) continue;
      for (const name of await readdir(join(this.dir, top)).catch(() => [] as string[])) {
        if (!name.startsWith(top) || !/^[0-9a-f]{64}$/.test(name)) continue;
        const s = await stat(join(this.dir, top, name)).catch(() => undefined);
        if (s?.isFile()) found.push({ id: name, size: s.size, mtime: s.mtimeMs });
      }
    }
    found.sort((a, b) => a.mtime - b.mtime);
    const onDisk = new Map(found.map((f) => [f.id, f]));
    const prior = [...this.entries].filter(([id, e]) => onDisk.has(id) || e.touched >= now);
    for (const [id, e] of prior) if (!onDisk.has(id)) onDisk.set(id, { id, size: e.size, mtime: e.touched });
    this.entries.clear();
    this.bytes = 0;
    const known = new Set(prior.map(([id]) => id));
    for (const f of found) if (!known.has(f.id)) this.entries.set(f.id, { size: f.size, touched: f.mtime });
    for (const [id, e] of prior) this.entries.set(id, { size: onDisk.get(id)!.size, touched: e.touched });
    for (const e of this.entries.values()) this.bytes += e.size;
    this.lastScan = Date.now();
  }

  private maybeRescan(): void {
    if (this.scanning || Date.now() - this.lastScan < this.rescanMs) return;
    this.scanning = this.scan()
      .then(() => this.evict())
      .catch(() => undefined)
      .finally(() => (this.scanning = undefined));
  }

  /** Prefix directories made (or found) by this process. */
  private readonly made = new Set<string>();

  private forget(id: string): void {
    const e = this.entries.get(id);
    if (!e) return;
    this.entries.delete(id);
    this.bytes -= e.size;
  }

  /** The chunk's bytes, or undefined; a hit marks it recently used (here and on disk). */
  async get(id: string): Promise<Uint8Array | undefined> {
    await this.open();
    const p = this.pathOf(id);
    // An id we do not know (another process may have cached it since our last scan) is checked
    // with one stat that makes no error object: misses are the common case of a cold read.
    if (!this.entries.has(id) && statSync(p, { throwIfNoEntry: false }) === undefined) return undefined;
    let data: Buffer;
    try {
      data = await readFile(p);
    } catch (err) {
      if (isEnoent(err)) {
        this.forget(id);
        return undefined;
      }
      throw VolumeError.IO("read cached chunk", err, { path: p });
    }
    if (!verifyChunk(id, data)) {
      this.forget(id);
      await unlink(p).catch(() => undefined);
      return undefined;
    }
    const now = Date.now();
    const e = this.entries.get(id) ?? { size: data.length, touched: 0 };
    if (!this.entries.has(id)) this.bytes += e.size;
    this.entries.delete(id);
    this.entries.set(id, e);
    if (now - e.touched >= TOUCH_EVERY_MS) {
      e.touched = now;
      await utimes(p, now / 1000, now / 1000).catch(() => undefined);
    }
    this.maybeRescan();
    return data;
  }

  /** Stores a chunk atomically (idempotent); evicts least recently used files beyond maxBytes. */
  async put(id: string, data: Uint8Array): Promise<void> {
    await this.open();
    if (this.closed) return;
    if (!/^[0-9a-f]{64}$/.test(id)) throw new VolumeError("INVALID_ARGUMENT", `put cached chunk: bad id ${JSON.stringify(id)}`);
    if (data.length > this.maxBytes) return;
    const existing = this.entries.get(id);
    if (existing) {
      this.entries.delete(id);
      this.entries.set(id, existing);
      return;
    }
    const p = this.pathOf(id);
    const tmp = join(this.dir, "tmp", `${id}.${process.pid}.${randomBytes(6).toString("hex")}`);
    try {
      const sub = id.slice(0, 2);
      if (!this.made.has(sub)) {
        await mkdir(join(this.dir, sub), { recursive: true });
        this.made.add(sub);
      }
      await writeFile(tmp, data);
      await rename(tmp, p).catch(async (err) => {
        if (!isEnoent(err)) throw err;
        await mkdir(join(this.dir, sub), { recursive: true }); // removed behind our back
        await rename(tmp, p);
      });
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw VolumeError.IO("write cached chunk", err, { path: p });
    }
    this.entries.set(id, { size: data.length, touched: Date.now() });
    this.bytes += data.length;
    await this.evict();
    this.maybeRescan();
  }

  private async evict(): Promise<void> {
    if (this.lastScan === 0) return;
    while (this.bytes > this.maxBytes) {
      const first = this.entries.keys().next();
      if (first.done) break;
      const id = first.value;
      this.forget(id);
      await unlink(this.pathOf(id)).catch((err) => {
        if (!isEnoent(err)) throw VolumeError.IO("evict cached chunk", err, { path: this.pathOf(id) });
      });
    }
  }

  /** Bytes of chunk files this process knows of (after the first scan). */
  async size(): Promise<number> {
    await this.open();
    await this.firstScan;
    return this.bytes;
  }

  /** Ids known, least recently used first (after the first scan). */
  async keys(): Promise<string[]> {
    await this.open();
    await this.firstScan;
    return [...this.entries.keys()];
  }

  /** Waits for a background rescan; idempotent. Files stay on disk for the next open. */
  async close(): Promise<void> {
    this.closed = true;
    await this.scanning;
  }
}
