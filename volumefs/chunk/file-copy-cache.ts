/**
 * Whole copies of stored files, beside the host-wide chunk cache, for the kernel to read itself
 * (FUSE backing files): a stored file read from its start through a mount is written here as it
 * is read, and later read-only opens of it read the copy through the local file system's page
 * cache, with no request to the mount at all. A FUSE file's own page cache holds 4 KiB pages
 * only (Linux 6.18), which caps a warm read at about a third of the local disk's speed.
 *
 * Layout under `dir`: `<boot>/<ab>/<key>`, a complete copy named by the file's content (`key`:
 * blake3 of its chunk ids), and `<boot>/tmp/` for copies being written, where `<boot>` is the
 * kernel's boot id. A copy is renamed into place once every byte is written, so a name is always
 * a whole file; writers of the same key in other processes write the same bytes. Copies are not
 * synced to the disk: they are used only in the boot that wrote them (a crash of the machine
 * may leave a renamed file without its bytes; copies of earlier boots are removed at the first
 * scan), which makes a copy usable as soon as its last byte is written. A copy is not verified
 * when the kernel reads it: its bytes were verified chunk by chunk on their way in, and from
 * then on the local disk is trusted, as the page cache is.
 *
 * A copy is written past the page cache (O_DIRECT) where the file system takes such writes: the
 * read that fills it already put its bytes in the mount's own page cache, and a second cached
 * copy of them cost the fill most of its CPU (fresh page-cache pages are the dearest memory a
 * virtual machine touches). The copy's first reader reads it from the disk.
 *
 * Eviction: least recently opened first (the mtime, touched on an open at most once a minute),
 * beyond `maxBytes`. Sizes and recency are learned by a scan on first use and every `rescanMs`,
 * so that processes sharing the directory keep it under the bound together. A copy another
 * process removes is a miss, never an error.
 */
import { closeSync, fstatSync, ftruncateSync, futimesSync, mkdirSync, openSync, readdirSync, renameSync, rmSync, statSync, unlinkSync, constants } from "node:fs";
import { close, readFileSync, rm, write, writev } from "node:fs";
import { join } from "node:path";
import { hash } from "blake3";
import { koffi } from "../native.js";
import { pread } from "./disk-chunk-cache.js";
import { holdAll } from "../object/buffer-lease.js";

export interface FileCopyCacheOptions {
  /** The directory of the copies; created if missing. */
  dir: string;
  /** Upper bound of the bytes of copies this process keeps the directory under. */
  maxBytes: number;
  /** Smallest file worth a copy (smaller ones read well enough from the mount's page cache); default 1 MiB. */
  minBytes?: number;
  /** Most bytes of one copy's writes in flight before the copy is given up (the disk fell behind); default 64 MiB. */
  maxPendingBytes?: number;
  /** Interval between rescans of the directory; default 60 000 ms. */
  rescanMs?: number;
  /** Write copies past the page cache where the file system allows it; default true. */
  direct?: boolean;
}

const KEY = /^[0-9a-f]{64}$/;
const BOOT = /^[0-9a-f-]{36}$/;

/** This boot's id (copies of other boots are not trusted: see the layout above). */
function bootId(): string {
  try {
    const id = readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
    if (BOOT.test(id)) return id;
  } catch {
    // not Linux
  }
  return "00000000-0000-0000-0000-000000000000";
}
const TOUCH_EVERY_MS = 60_000;

export class FileCopyCache {
  readonly dir: string;
  private readonly maxBytes: number;
  private readonly minBytes: number;
  private readonly maxPending: number;
  private readonly rescanMs: number;
  private readonly entries = new Map<string, { size: number; touched: number }>();
  private bytes = 0;
  private lastScan = 0;
  private readonly filling = new Map<string, CopyFill>();
  /** Whether fills write past the page cache where they can (see the header). */
  private readonly direct: boolean;

  /** The copies of this boot: `<dir>/<boot id>`. */
  private readonly root: string;

  constructor(opts: FileCopyCacheOptions) {
    this.dir = opts.dir;
    this.root = join(opts.dir, bootId());
    this.maxBytes = opts.maxBytes;
    this.minBytes = opts.minBytes ?? 2 ** 20;
    this.maxPending = opts.maxPendingBytes ?? 64 * 2 ** 20;
    this.rescanMs = opts.rescanMs ?? 60_000;
    this.direct = opts.direct ?? true;
  }

  /** Whether a file of `size` bytes gets a copy (cheap: callers ask before keying the file). */
  copies(size: number): boolean {
    return size >= this.minBytes && size <= this.maxBytes / 2;
  }

  /** The key of a file's copy: blake3 of its chunk ids, in order. */
  static key(chunkIds: readonly string[]): string {
    return hash(Buffer.from(chunkIds.join(","))).toString("hex");
  }

  private path(key: string): string {
    return join(this.root, key.slice(0, 2), key);
  }

  /** A read-only descriptor of the complete copy of `key`, or undefined. The caller closes it. */
  open(key: string): number | undefined {
    this.maybeScan();
    let fd: number;
    try {
      fd = openSync(this.path(key), constants.O_RDONLY);
    } catch {
      this.forget(key);
      return undefined;
    }
    const now = Date.now();
    const e = this.entries.get(key);
    if (!e) {
      this.remember(key, fstatSync(fd).blocks * 512, now);
      this.evict();
    } else if (now - e.touched > TOUCH_EVERY_MS) {
      e.touched = now;
      try {
        futimesSync(fd, now / 1000, now / 1000);
      } catch {
        // read-only cache directory: recency stays this process's
      }
    }
    return fd;
  }

  /**
   * Whether a complete copy of `key` is known (made by this process, or found by the last scan of
   * the directory): no system call, so a caller may ask before every read.
   */
  has(key: string): boolean {
    this.maybeScan();
    return this.entries.has(key);
  }

  /** A reader of the complete copy of `key`, or undefined (see `open`). */
  reader(key: string): CopyReader | undefined {
    const fd = this.open(key);
    return fd === undefined ? undefined : new CopyReader(fd);
  }

  /**
   * Starts a copy of a `size`-byte file, to be given all its bytes (`CopyFill.write`, in any
   * order); undefined when none is wanted (too small or too large, present, or being written by
   * this process).
   */
  startFill(key: string, size: number): CopyFill | undefined {
    if (!this.copies(size) || this.filling.has(key)) return undefined;
    this.maybeScan();
    if (this.entries.has(key)) return undefined;
    const tmpDir = join(this.root, "tmp");
    try {
      mkdirSync(tmpDir, { recursive: true });
      const tmp = join(tmpDir, `${key}.${process.pid}.${Math.random().toString(36).slice(2)}`);
      const fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o644);
      const fill = new CopyFill(this, key, size, fd, tmp, this.maxPending, this.direct ? directFd(tmp) : undefined);
      this.filling.set(key, fill);
      return fill;
    } catch {
      return undefined;
    }
  }

  /** Called by a fill when it ends, whole or given up. */
  ended(fill: CopyFill, whole: boolean): void {
    if (this.filling.get(fill.key) === fill) this.filling.delete(fill.key);
    if (!whole) return;
    try {
      mkdirSync(join(this.root, fill.key.slice(0, 2)), { recursive: true });
      renameSync(fill.tmp, this.path(fill.key));
      this.remember(fill.key, statSync(this.path(fill.key)).blocks * 512, Date.now());
      this.evict();
    } catch {
      rmSync(fill.tmp, { force: true });
    }
  }

  /** Bytes of the copies this process knows of. */
  get size(): number {
    return this.bytes;
  }

  private remember(key: string, size: number, touched: number): void {
    this.forget(key);
    this.entries.set(key, { size, touched });
    this.bytes += size;
  }

  private forget(key: string): void {
    const e = this.entries.get(key);
    if (!e) return;
    this.entries.delete(key);
    this.bytes -= e.size;
  }

  private maybeScan(): void {
    if (Date.now() - this.lastScan < this.rescanMs) return;
    this.lastScan = Date.now();
    this.entries.clear();
    this.bytes = 0;
    // Copies of earlier boots.
    for (const boot of readdirSafe(this.dir)) {
      if (BOOT.test(boot) && join(this.dir, boot) !== this.root) rm(join(this.dir, boot), { recursive: true, force: true }, () => undefined);
    }
    for (const top of readdirSafe(this.root)) {
      if (!/^[0-9a-f]{2}$/.test(top)) continue;
      for (const name of readdirSafe(join(this.root, top))) {
        if (!KEY.test(name)) continue;
        try {
          const st = statSync(join(this.root, top, name));
          this.remember(name, st.blocks * 512, st.mtimeMs);
        } catch {
          // removed meanwhile
        }
      }
    }
    // Copies a killed process left half written.
    for (const name of readdirSafe(join(this.root, "tmp"))) {
      const p = join(this.root, "tmp", name);
      try {
        if (Date.now() - statSync(p).mtimeMs > 10 * 60_000) unlinkSync(p);
      } catch {
        // removed meanwhile
      }
    }
    this.evict();
  }

  private evict(): void {
    if (this.bytes <= this.maxBytes) return;
    const oldest = [...this.entries].sort((a, b) => a[1].touched - b[1].touched);
    for (const [key] of oldest) {
      if (this.bytes <= this.maxBytes) break;
      try {
        unlinkSync(this.path(key));
      } catch {
        // another process evicted it
      }
      this.forget(key);
    }
  }
}

function readdirSafe(dir: string): string[] {
  try {
    return readdirSync(dir);
  } catch {
    return [];
  }
}

/** Alignment of a write past the page cache: offset, length and memory (a page covers every disk's). */
const DIRECT_ALIGN = 4096;
/** The size of the aligned buffers direct writes go through (a read's worth; larger writes take more). */
const DIRECT_BUFFER = 2 ** 20;
/**
 * Aligned buffers kept for reuse: as many as a fill may have pending (maxPendingBytes' default).
 * A buffer made anew costs more than the copy into it: its memory is mapped and zeroed page by
 * page on first touch (a cold read of 1 GiB made about 8% faster by keeping 64 rather than 8).
 */
const DIRECT_KEEP = 64;
/** Kept buffers go once none was taken for this long. */
const DIRECT_IDLE_MS = 5_000;

/** A second descriptor of `path` for writes past the page cache, or undefined where the file system refuses them (tmpfs) or no aligned memory can be had. */
function directFd(path: string): number | undefined {
  if (!addressOf() || !("O_DIRECT" in constants)) return undefined;
  try {
    return openSync(path, constants.O_WRONLY | constants.O_DIRECT);
  } catch {
    return undefined;
  }
}

let address: ((b: Uint8Array) => bigint) | null | undefined;
/** The memory address of a buffer (koffi, which the FUSE layer loads anyway), or null without it. */
function addressOf(): ((b: Uint8Array) => bigint) | null {
  if (address === undefined) {
    const k = koffi();
    try {
      address = k ? (b) => k.address(b) : null;
      address?.(Buffer.alloc(1));
    } catch {
      address = null;
    }
  }
  return address;
}

/** Free aligned buffers of DIRECT_BUFFER bytes. */
const directBuffers: Buffer[] = [];

/** A DIRECT_ALIGN-aligned buffer of at least `size` bytes (node gives no aligned memory: a larger one is cut to an aligned start). */
function takeDirectBuffer(size: number): Buffer {
  directTaken = Date.now();
  if (size <= DIRECT_BUFFER && directBuffers.length > 0) return directBuffers.pop()!;
  const len = Math.max(size, DIRECT_BUFFER);
  const raw = Buffer.allocUnsafeSlow(len + DIRECT_ALIGN);
  const skip = (DIRECT_ALIGN - Number(addressOf()!(raw) % BigInt(DIRECT_ALIGN))) % DIRECT_ALIGN;
  return raw.subarray(skip, skip + len);
}

function giveDirectBuffer(b: Buffer): void {
  if (b.length !== DIRECT_BUFFER || directBuffers.length >= DIRECT_KEEP) return;
  directBuffers.push(b);
  directTrim ??= setTimeout(trimDirectBuffers, DIRECT_IDLE_MS).unref();
}

let directTaken = 0;
let directTrim: NodeJS.Timeout | undefined;

/** Lets the kept buffers go once fills stopped taking them (an idle mount holds no such memory). */
function trimDirectBuffers(): void {
  directTrim = undefined;
  const idle = Date.now() - directTaken;
  if (idle >= DIRECT_IDLE_MS) directBuffers.length = 0;
  else directTrim = setTimeout(trimDirectBuffers, DIRECT_IDLE_MS - idle).unref();
}

/**
 * One copy being written: the file's bytes as reads return them, in any order (the kernel reads
 * ahead in parallel), written behind those reads; renamed into place once every byte of the
 * `size` is written. With `directFd`, pieces at aligned offsets (a kernel read's are) are copied
 * into aligned memory and written through it past the page cache; the last piece is padded to
 * the alignment and the file cut to `size` at the end. Others go through `fd`.
 */
export class CopyFill {
  /** Written (or being written) byte ranges, sorted, disjoint, merged. */
  private covered: [number, number][] = [];
  private pending = 0;
  private failed = false;
  private ended = false;
  /** A padded last piece was written: the file is cut to `size` before it is kept. */
  private padded = false;
  /** Bytes written past the page cache (the rest went through it). */
  directBytes = 0;

  constructor(
    private readonly cache: FileCopyCache,
    readonly key: string,
    readonly size: number,
    private readonly fd: number,
    readonly tmp: string,
    private readonly maxPending: number,
    private readonly directFd?: number,
  ) {}

  /** True once every byte was handed to `write`. */
  get whole(): boolean {
    return this.covered.length === 1 && this.covered[0]![0] === 0 && this.covered[0]![1] === this.size;
  }

  /**
   * The file's bytes at `offset`, in pieces that must not change afterwards. False once the copy
   * is given up (out of the file's bounds, or the disk fell `maxPendingBytes` behind) or has
   * ended: its descriptors are closed then, and their numbers may name other files.
   */
  write(offset: number, pieces: readonly Uint8Array[]): boolean {
    if (this.failed || this.ended) return false;
    let n = 0;
    for (const p of pieces) n += p.length;
    if (n === 0) return true;
    // Past the file's end, too far behind, or far from what was read so far (a random reader,
    // not one that reads the whole file).
    const end = this.covered.length > 0 ? this.covered[this.covered.length - 1]![1] : 0;
    if (offset + n > this.size || this.pending > this.maxPending || offset > end + this.maxPending) {
      this.abandon();
      return false;
    }
    this.pending += n;
    const done = (err: Error | null, written: number, want: number): void => {
      this.pending -= n;
      if (err || written !== want) this.failed = true;
      this.maybeEnd();
    };
    if (this.directFd !== undefined && offset % DIRECT_ALIGN === 0 && (n % DIRECT_ALIGN === 0 || offset + n === this.size)) {
      const len = Math.ceil(n / DIRECT_ALIGN) * DIRECT_ALIGN;
      const buf = takeDirectBuffer(len);
      let at = 0;
      for (const p of pieces) {
        buf.set(p, at);
        at += p.length;
      }
      buf.fill(0, n, len);
      if (len !== n) this.padded = true;
      this.directBytes += n;
      write(this.directFd, buf, 0, len, offset, (err, written) => {
        giveDirectBuffer(buf);
        done(err, written, len);
      });
    } else {
      // One write per call (a read's worth, up to 1 MiB): the page cache then holds the copy in
      // large folios, which later reads go through about half again as fast as 64 KiB ones.
      // The pieces may be views of a leased buffer: it stays as it is until the write ends.
      const held = holdAll(pieces);
      writev(this.fd, pieces as Uint8Array[], offset, (err, written) => {
        held.release();
        done(err, written, n);
      });
    }
    this.cover(offset, offset + n);
    return true;
  }

  private cover(a: number, b: number): void {
    const out: [number, number][] = [];
    for (const [x, y] of this.covered) {
      if (y < a || x > b) out.push([x, y]);
      else {
        a = Math.min(a, x);
        b = Math.max(b, y);
      }
    }
    out.push([a, b]);
    out.sort((p, q) => p[0] - q[0]);
    this.covered = out;
  }

  /** Gives the copy up unless every byte was handed in: nothing is kept. */
  abandon(): void {
    if (this.whole && !this.failed) return;
    this.failed = true;
    this.maybeEnd();
  }

  private maybeEnd(): void {
    if (this.ended || this.pending > 0) return;
    if (!this.failed && !this.whole) return;
    this.ended = true;
    if (!this.failed && this.padded) {
      try {
        ftruncateSync(this.fd, this.size);
      } catch {
        this.failed = true;
      }
    }
    if (this.directFd !== undefined) closeSync(this.directFd);
    closeSync(this.fd);
    if (this.failed) rmSync(this.tmp, { force: true });
    this.cache.ended(this, !this.failed);
  }
}

/**
 * Reads of one complete copy through one descriptor. `close` closes it only once no read is
 * running: a read must never go on with a descriptor number the process may have reused.
 */
export class CopyReader {
  private reads = 0;
  private closed = false;

  constructor(private readonly fd: number) {}

  /** Exactly `length` bytes at `position`, or undefined when the copy is shorter, unreadable or closed. */
  async read(position: number, length: number): Promise<Uint8Array | undefined> {
    if (this.closed) return undefined;
    const buf = Buffer.allocUnsafe(length);
    let at = 0;
    this.reads++;
    try {
      while (at < length && !this.closed) {
        const n = await pread(this.fd, buf.subarray(at), position + at).catch(() => 0);
        if (n === 0) break;
        at += n;
      }
    } finally {
      if (--this.reads === 0 && this.closed) close(this.fd, () => undefined);
    }
    return at === length ? buf : undefined;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.reads === 0) close(this.fd, () => undefined);
  }
}
