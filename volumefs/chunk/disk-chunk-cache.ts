/**
 * The host-wide chunk cache on disk, shared by every mount and process on the host.
 *
 * Layout under `dir`:
 *   packs/<ab>/<pack>   one sparse file per pack, named by the pack id (<ab> = its first two hex
 *                       chars); a cached chunk sits at its own offset in the pack
 *
 * A fetched range is written with one positioned write, so a cold sequential read costs one
 * write per few MiB rather than a file per 64 KiB chunk. Nothing marks which parts of a file are
 * filled: every read is verified against the chunk id, and a hole (zeros), a write still in
 * progress in another process, or damaged bytes all fail the check and count as a miss. Writers
 * of the same range write the same bytes (packs are immutable and named by their content), so
 * concurrent writers cannot disagree.
 *
 * Eviction is per pack file, least recently used first. Recency is the file's mtime, touched on a
 * hit (at most once a minute per pack), so every process sharing the directory evicts in roughly
 * the same order. Each process tracks sizes (allocated blocks) and recency in memory, learned by a
 * scan on open and refreshed by a rescan every `rescanMs`. A file may vanish at any time (another
 * process evicts it): that is a miss, never an error. Open descriptors are reused across reads and
 * writes and dropped at each rescan, so a file another process unlinked is not kept alive.
 */
import { mkdir, readdir, rmdir, stat, unlink } from "node:fs/promises";
import { close, constants, fstat, futimes, open, read, statSync, write } from "node:fs";
import { join } from "node:path";
import { VolumeError } from "../errors.js";
import type { ChunkLocation } from "../../metadata/index.js";
import { verifyChunk } from "./hash.js";
import type { ChunkCache } from "./types.js";

/** Options of a DiskChunkCache. */
export interface DiskChunkCacheOptions {
  /** The cache directory; created if missing. */
  dir: string;
  /** Upper bound of the bytes of pack files this process keeps the directory under. */
  maxBytes: number;
  /** Interval between rescans of the directory, to learn other processes' files; default 60 000 ms. */
  rescanMs?: number;
  /** Most open descriptors kept for reuse; default 32. */
  maxOpenFiles?: number;
}

interface Entry {
  /** Allocated bytes of the pack file. */
  size: number;
  /** Last time this process touched the file's mtime, ms since the epoch. */
  touched: number;
}

const TOUCH_EVERY_MS = 60_000;
const PACK_ID = /^[0-9a-f]{64}$/;
const OLD_TMP = /^[0-9a-f]{64}\.\d+\.[0-9a-f]+$/;

function errno(err: unknown): string | undefined {
  return (err as NodeJS.ErrnoException | undefined)?.code;
}

const openFd = (path: string, flags: number): Promise<number> =>
  new Promise((res, rej) => open(path, flags, 0o644, (err, fd) => (err ? rej(err) : res(fd))));
const closeFd = (fd: number): void => close(fd, () => undefined);
/** One positioned read into `buf`; resolves the bytes read. */
export const pread = (fd: number, buf: Uint8Array, position: number): Promise<number> =>
  new Promise((res, rej) => read(fd, buf, 0, buf.length, position, (err, n) => (err ? rej(err) : res(n))));
const pwrite = (fd: number, buf: Uint8Array, position: number): Promise<void> =>
  new Promise((res, rej) => write(fd, buf, 0, buf.length, position, (err) => (err ? rej(err) : res())));
const allocated = (fd: number): Promise<number> =>
  new Promise((res, rej) => fstat(fd, (err, s) => (err ? rej(err) : res(s.blocks * 512))));

/**
 * Open descriptors of pack files (read-write, so one serves reads and writes), reused across
 * operations. A descriptor is closed only when no operation uses it, so its number is never
 * reused while a read or write is in flight on it.
 */
class FdPool {
  private readonly fds = new Map<string, { fd: Promise<number>; users: number; stale: boolean }>();
  constructor(private readonly max: number) {}

  /** Runs `f` on a descriptor of `path`, creating the file when `create`. */
  async use<T>(path: string, create: boolean, f: (fd: number) => Promise<T>): Promise<T> {
    let e = this.fds.get(path);
    if (e) {
      this.fds.delete(path);
      this.fds.set(path, e);
    } else {
      const entry = { fd: openFd(path, constants.O_RDWR | (create ? constants.O_CREAT : 0)), users: 0, stale: false };
      e = entry;
      this.fds.set(path, entry);
      entry.fd.catch(() => this.fds.get(path) === entry && this.fds.delete(path));
    }
    // Counted before the trim, which may pick this very entry (a pool of one): it is then closed
    // after `f`, not before.
    e.users++;
    this.trim();
    try {
      return await f(await e.fd);
    } finally {
      e.users--;
      if (e.stale && e.users === 0) void e.fd.then(closeFd, () => undefined);
    }
  }

  /** Closes (once unused) the descriptor of `path`. */
  retire(path: string): void {
    const e = this.fds.get(path);
    if (!e) return;
    this.fds.delete(path);
    e.stale = true;
    if (e.users === 0) void e.fd.then(closeFd, () => undefined);
  }

  /** Closes (once unused) every descriptor. */
  retireAll(): void {
    for (const path of [...this.fds.keys()]) this.retire(path);
  }

  private trim(): void {
    for (const path of this.fds.keys()) {
      if (this.fds.size <= this.max) break;
      this.retire(path);
    }
  }
}

/** A ChunkCache of sparse pack files in a directory, LRU-bounded, safe to share between processes. */
export class DiskChunkCache implements ChunkCache {
  readonly dir: string;
  private readonly packsDir: string;
  private readonly maxBytes: number;
  private readonly rescanMs: number;
  private readonly entries = new Map<string, Entry>();
  private readonly fds: FdPool;
  private bytes = 0;
  private ready: Promise<void> | undefined;
  private lastScan = 0;
  private scanning: Promise<void> | undefined;
  private firstScan: Promise<void> | undefined;
  private closed = false;
  /** Prefix directories made (or found) by this process. */
  private readonly made = new Set<string>();

  constructor(opts: DiskChunkCacheOptions) {
    this.dir = opts.dir;
    this.packsDir = join(opts.dir, "packs");
    this.maxBytes = opts.maxBytes;
    this.rescanMs = opts.rescanMs ?? 60_000;
    this.fds = new FdPool(opts.maxOpenFiles ?? 32);
  }

  /**
   * Creates the directory and starts learning what it holds in the background (a short-lived
   * command must not wait for a scan to read one chunk); eviction waits for the first scan.
   * Called by every method, idempotent.
   */
  open(): Promise<void> {
    this.ready ??= (async () => {
      try {
        await mkdir(this.packsDir, { recursive: true });
      } catch (err) {
        throw VolumeError.IO("open chunk cache", err, { path: this.dir });
      }
      this.scanning = this.removeOldLayout()
        .then(() => this.scan())
        .then(() => this.evict())
        .catch(() => undefined)
        .finally(() => (this.scanning = undefined));
      this.firstScan = this.scanning;
    })();
    return this.ready;
  }

  private pathOf(pack: string): string {
    return join(this.packsDir, pack.slice(0, 2), pack);
  }

  private async scan(): Promise<void> {
    const found: { pack: string; size: number; mtime: number }[] = [];
    const now = Date.now();
    for (const top of await readdir(this.packsDir).catch(() => [] as string[])) {
      if (this.closed) return;
      if (!/^[0-9a-f]{2}$/.test(top)) continue;
      for (const name of await readdir(join(this.packsDir, top)).catch(() => [] as string[])) {
        if (!name.startsWith(top) || !PACK_ID.test(name)) continue;
        const s = await stat(join(this.packsDir, top, name)).catch(() => undefined);
        if (s?.isFile()) found.push({ pack: name, size: s.blocks * 512, mtime: s.mtimeMs });
      }
    }
    found.sort((a, b) => a.mtime - b.mtime);
    const onDisk = new Map(found.map((f) => [f.pack, f]));
    // What this process touched since the scan began is more recent than what the scan saw.
    const prior = [...this.entries].filter(([pack, e]) => onDisk.has(pack) || e.touched >= now);
    this.entries.clear();
    this.bytes = 0;
    const known = new Set(prior.map(([pack]) => pack));
    for (const f of found) if (!known.has(f.pack)) this.entries.set(f.pack, { size: f.size, touched: f.mtime });
    for (const [pack, e] of prior) this.entries.set(pack, { size: Math.max(e.size, onDisk.get(pack)?.size ?? 0), touched: e.touched });
    for (const e of this.entries.values()) this.bytes += e.size;
    this.fds.retireAll();
    this.lastScan = Date.now();
  }

  /**
   * The first layout kept one file per chunk in <ab>/<id> and temp files in tmp/, beside packs/
   * (cleared once per process, before the first scan).
   * A directory is removed only when every name in it is one that layout made (the cache
   * directory is the user's choice: nothing else in it is touched).
   */
  private async removeOldLayout(): Promise<void> {
    for (const top of await readdir(this.dir).catch(() => [] as string[])) {
      const ours = top === "tmp" ? OLD_TMP : /^[0-9a-f]{2}$/.test(top) ? new RegExp(`^${top}[0-9a-f]{62}$`) : undefined;
      if (!ours) continue;
      const d = join(this.dir, top);
      const names = await readdir(d).catch(() => undefined);
      if (!names || !names.every((n) => ours.test(n))) continue;
      for (const n of names) await unlink(join(d, n)).catch(() => undefined);
      await rmdir(d).catch(() => undefined);
    }
  }

  private maybeRescan(): void {
    if (this.scanning || Date.now() - this.lastScan < this.rescanMs) return;
    this.scanning = this.scan()
      .then(() => this.evict())
      .catch(() => undefined)
      .finally(() => (this.scanning = undefined));
  }

  private forget(pack: string): void {
    const e = this.entries.get(pack);
    if (!e) return;
    this.entries.delete(pack);
    this.bytes -= e.size;
  }

  /**
   * Marks `pack` most recently used here, and on disk at most once a minute: the caller awaits
   * that write while it holds `fd`, which may be closed right after it lets go.
   */
  private async touch(pack: string, fd: number): Promise<void> {
    const e = this.entries.get(pack);
    if (!e) return;
    this.entries.delete(pack);
    this.entries.set(pack, e);
    const now = Date.now();
    if (now - e.touched >= TOUCH_EVERY_MS) {
      e.touched = now;
      await new Promise<void>((res) => futimes(fd, now / 1000, now / 1000, () => res()));
    }
  }

  /** The chunk's bytes, or undefined; a hit marks its pack recently used (here and on disk). */
  async get(loc: ChunkLocation): Promise<Uint8Array | undefined> {
    await this.open();
    const p = this.pathOf(loc.pack);
    // A pack we do not know (another process may have cached it since our last scan) is checked
    // with one stat that makes no error object: misses are the common case of a cold read.
    if (!this.entries.has(loc.pack) && statSync(p, { throwIfNoEntry: false }) === undefined) return undefined;
    let data: Uint8Array | undefined;
    try {
      data = await this.fds.use(p, false, async (fd) => {
        const buf = Buffer.allocUnsafe(loc.length);
        const n = await pread(fd, buf, loc.offset);
        if (n !== loc.length || !verifyChunk(loc.id, buf)) return undefined;
        if (!this.entries.has(loc.pack)) this.learn(loc.pack, await allocated(fd));
        await this.touch(loc.pack, fd);
        return buf;
      });
    } catch (err) {
      if (errno(err) === "ENOENT") {
        this.forget(loc.pack);
        this.fds.retire(p);
        return undefined;
      }
      throw VolumeError.IO("read cached chunk", err, { path: p });
    }
    this.maybeRescan();
    return data;
  }

  private learn(pack: string, size: number): void {
    const e = this.entries.get(pack);
    if (e) {
      // A pack file only grows (eviction removes it whole): two writes of ranges of one pack may
      // learn their sizes out of order, and the smaller one, read first, must not win.
      if (size <= e.size) return;
      this.bytes += size - e.size;
      e.size = size;
    } else {
      this.entries.set(pack, { size, touched: Date.now() });
      this.bytes += size;
    }
  }

  /** Writes a fetched range of a pack at its offset (idempotent); evicts LRU packs beyond maxBytes. */
  async putRange(pack: string, offset: number, bytes: Uint8Array, _members: readonly ChunkLocation[]): Promise<void> {
    await this.open();
    if (this.closed || bytes.length > this.maxBytes) return;
    if (!PACK_ID.test(pack)) throw new VolumeError("INVALID_ARGUMENT", `put cached range: bad pack id ${JSON.stringify(pack)}`);
    const p = this.pathOf(pack);
    const sub = pack.slice(0, 2);
    try {
      if (!this.made.has(sub)) {
        await mkdir(join(this.packsDir, sub), { recursive: true });
        this.made.add(sub);
      }
      const size = await this.fds.use(p, true, async (fd) => {
        await pwrite(fd, bytes, offset);
        return allocated(fd);
      });
      this.learn(pack, size);
      const e = this.entries.get(pack)!;
      this.entries.delete(pack);
      this.entries.set(pack, e);
    } catch (err) {
      if (errno(err) === "ENOENT") this.made.delete(sub); // the directory was removed behind our back
      throw VolumeError.IO("write cached range", err, { path: p });
    }
    await this.evict();
    this.maybeRescan();
  }

  private async evict(): Promise<void> {
    if (this.lastScan === 0) return;
    while (this.bytes > this.maxBytes) {
      const first = this.entries.keys().next();
      if (first.done) break;
      const pack = first.value;
      this.forget(pack);
      const p = this.pathOf(pack);
      this.fds.retire(p);
      await unlink(p).catch((err) => {
        if (errno(err) !== "ENOENT") throw VolumeError.IO("evict cached pack", err, { path: p });
      });
    }
  }

  /** Bytes of pack files this process knows of (after the first scan). */
  async size(): Promise<number> {
    await this.open();
    await this.firstScan;
    return this.bytes;
  }

  /** Pack ids known, least recently used first (after the first scan). */
  async keys(): Promise<string[]> {
    await this.open();
    await this.firstScan;
    return [...this.entries.keys()];
  }

  /** Waits for a background rescan and closes descriptors; idempotent. Files stay on disk. */
  async close(): Promise<void> {
    this.closed = true;
    await this.scanning;
    this.fds.retireAll();
  }
}
