/**
 * The FUSE adapter: a thin layer over fuse-native 2.2.6 that serves a `MountFs` at a directory.
 * Every callback calls one MountFs method and turns its error into an errno through `toErrno`.
 *
 * fuse-native runs callbacks on Node's main thread; this process must never touch the mount with
 * synchronous calls (that deadlocks). Kernel caching, given the high-level libfuse 2.9 API has
 * only mount-wide timeouts:
 * - a mount whose content never changes (`immutable`: read-only at a pinned version) uses
 *   kernel_cache and long attribute and entry timeouts;
 * - any other mount keeps entries 1 s, attributes 0 s (sizes of staged files, control files and
 *   files after a reload are always fresh) and `auto_cache` (page cache kept across opens while
 *   a file's size and mtime are unchanged). A command written to /.strata/sync or
 *   /.strata/reload (which move the base) is answered only once every entry the kernel cached
 *   before it has expired, so that after `strata reload` no removed name is still found; `access`
 *   asks the file system, not the kernel's entry cache.
 * Large requests: big_writes and max_write/max_read of 128 KiB, passed through `fsname` since
 * fuse-native has no option for them.
 * Known limits of fuse-native 2.2.6: utimens receives the access time in both arguments (so an
 * mtime different from the atime is lost; UTIME_NOW/UTIME_OMIT arrive as about 1073 ms and are
 * taken as "now"), and create() gets no open flags (O_CREAT|O_RDWR is assumed; the kernel checks
 * O_EXCL itself).
 */
import { execFile } from "node:child_process";
import { constants as fsConstants } from "node:fs";
import { constants } from "node:os";
import { mkdir, readdir, stat, writeFile } from "node:fs/promises";
import { resolve } from "node:path";
import { promisify } from "node:util";
import Fuse from "fuse-native";
import { VolumeError } from "../errors.js";
import { NAME_MAX, RESERVED_NAME } from "../vfs/paths.js";
import { opensToChange, type FileAttr, type MountFs } from "../vfs/mount-types.js";
import { NAME_TOO_LONG, toErrno } from "./errno.js";
import { FuseDevice, mountTable } from "./kernel.js";
import { isControl, KernelSession, typeBits } from "./kernel-mount.js";

const run = promisify(execFile);
const E = constants.errno;
const O = fsConstants;
/** Largest read and write request, in bytes. */
export const FUSE_MAX_IO = 128 * 1024;
/** What utimens receives for UTIME_NOW and UTIME_OMIT (0 s and about 2^30 ns, in ms). */
const UTIME_SPECIAL_MS = Math.floor(((1 << 30) - 2) / 1e6);
/** How long the kernel may keep a name (entry_timeout of a changing mount), in seconds. */
const ENTRY_TIMEOUT_S = 1;
/** Delay of the answer to a base-moving control command: the entry timeout plus scheduling slack, in ms. */
const BASE_MOVE_HOLD_MS = ENTRY_TIMEOUT_S * 1000 + 100;
const BASE_MOVING = new Set([`/${RESERVED_NAME}/sync`, `/${RESERVED_NAME}/reload`]);

/** Options of `mountFs`. */
export interface FuseMountOptions {
  /** Refuse every change (EROFS) except writes to the control files under `/.strata/`. Default false. */
  readOnly?: boolean;
  /** The content never changes while mounted (read-only at a pinned version): cache it in the kernel without bound. Default false. */
  immutable?: boolean;
  /** libfuse's request trace on stderr, and each failed call logged. Default false. */
  debug?: boolean;
  /** Name shown as the mount's source in /proc/mounts. Default "strata". */
  name?: string;
  /** Raw libfuse options appended last (they win), e.g. ["attr_timeout=1"]; fuse-native driver only. */
  extraOptions?: string[];
  /**
   * "kernel" (default): the FUSE protocol spoken over /dev/fuse by kernel-mount.ts, with
   * per-entry caching and invalidation. "fuse-native": libfuse 2.9's high-level API through
   * fuse-native, kept as the reference the kernel driver is measured against. The environment
   * variable STRATA_FUSE_DRIVER sets the default.
   */
  driver?: "kernel" | "fuse-native";
  /**
   * Kernel driver: once mounted, start the request reader thread of this process's next mount,
   * so that it does not wait for one to start (about 20 ms). For processes that mount again and
   * again (the node agent). Default false.
   */
  prepareNext?: boolean;
}

/** A live mount. */
export interface FuseMount {
  /** The absolute mount directory. */
  readonly dir: string;
  /** Unmounts (lazily, so open files do not block it), then closes the MountFs. Idempotent. */
  unmount(): Promise<void>;
  /** Requests the kernel driver's reader thread answered itself, by operation (kernel driver only). */
  answered?(): Record<string, number>;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Cb = (...args: any[]) => void;


function toStat(a: FileAttr): Record<string, number> {
  return {
    mode: typeBits(a.kind) | (a.mode & 0o7777),
    uid: a.uid,
    gid: a.gid,
    size: a.size,
    nlink: a.nlink,
    blksize: FUSE_MAX_IO,
    blocks: Math.ceil(a.size / 512),
    atime: a.atime,
    mtime: a.mtime,
    ctime: a.ctime,
  };
}

function checkNames(path: string): void {
  for (const seg of path.split("/")) {
    if (Buffer.byteLength(seg) > NAME_MAX) {
      throw new VolumeError("INVALID_PATH", `check path ${JSON.stringify(path)}: a name is longer than ${NAME_MAX} bytes`, { path, details: NAME_TOO_LONG });
    }
  }
}

/** True when `dir` is a mount point of a FUSE file system (live or with a dead server). */
export async function isFuseMountPoint(dir: string): Promise<boolean> {
  const abs = resolve(dir);
  return (await mountTable()).some((m) => m.point === abs && m.type.startsWith("fuse"));
}

/**
 * Detaches the FUSE mount at `dir` even when its server died ("Transport endpoint is not
 * connected"): `fusermount -uz`, then `umount -l`. Resolves false when nothing was mounted there.
 */
export async function forceUnmount(dir: string): Promise<boolean> {
  const abs = resolve(dir);
  if (!(await isFuseMountPoint(abs))) return false;
  const tries: [string, string[]][] = [
    ["fusermount", ["-uz", abs]],
    ["fusermount3", ["-uz", abs]],
    ["umount", ["-l", abs]],
  ];
  let last: unknown;
  for (const [cmd, args] of tries) {
    try {
      await run(cmd, args);
      if (!(await isFuseMountPoint(abs))) return true;
    } catch (err) {
      last = err;
    }
  }
  throw VolumeError.IO(`unmount ${abs}`, last ?? new Error("still mounted"), { hint: "close programs using the mount and retry" });
}

async function prepareDir(dir: string): Promise<void> {
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) throw VolumeError.NOT_A_DIRECTORY(dir, { op: "mount", hint: "mount on an empty directory (a missing one is made)" });
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOTDIR") throw VolumeError.NOT_A_DIRECTORY(dir, { op: "mount", cause: err, hint: "a file is in the way of the path; mount on an empty directory" });
    if (code === "ENOENT") {
      await mkdir(dir, { recursive: true });
      return;
    }
    if (code === "ENOTCONN" || code === "ECONNABORTED") {
      await forceUnmount(dir);
      return;
    }
    throw err;
  }
  if (await isFuseMountPoint(dir)) {
    throw new VolumeError("ALREADY_EXISTS", `mount ${dir}: already a mount point`, { hint: `unmount it first with \`strata unmount ${dir}\`` });
  }
  if ((await readdir(dir)).length > 0) {
    throw new VolumeError("NOT_EMPTY", `mount ${dir}: directory is not empty`, { hint: "mount on an empty directory" });
  }
}

function fuseOptions(opts: FuseMountOptions): ConstructorParameters<typeof Fuse>[2] {
  const raw = [opts.name ?? "strata", "big_writes", `max_write=${FUSE_MAX_IO}`, "subtype=strata"];
  if (opts.immutable) raw.push("kernel_cache", "attr_timeout=86400", "entry_timeout=86400", "negative_timeout=86400");
  else raw.push("auto_cache", "attr_timeout=0", `entry_timeout=${ENTRY_TIMEOUT_S}`, "negative_timeout=0");
  raw.push(...(opts.extraOptions ?? []));
  return { fsname: raw.join(","), maxRead: FUSE_MAX_IO, timeout: false, debug: opts.debug === true, force: false, mkdir: true };
}

/**
 * Serves `fs` at `dir` (created when missing; a stale mount left by a dead server is detached
 * first) and resolves once the kernel mount is live. The caller must not touch `dir` with
 * synchronous calls from this process. Fails ALREADY_EXISTS when `dir` is a live mount point.
 */
export async function mountFs(fs: MountFs, dir: string, opts: FuseMountOptions = {}): Promise<FuseMount> {
  const abs = resolve(dir);
  await prepareDir(abs);
  const driver = opts.driver ?? (process.env.STRATA_FUSE_DRIVER === "fuse-native" ? "fuse-native" : "kernel");
  return driver === "kernel" ? mountKernel(fs, abs, opts) : mountNative(fs, abs, opts);
}

/** Kernel read-ahead of a mount, in KiB (the kernel's default for FUSE is 128). */
const READ_AHEAD_KB = 8192;

async function mountKernel(fs: MountFs, abs: string, opts: FuseMountOptions): Promise<FuseMount> {
  const dev = await FuseDevice.mount(abs, { fsname: opts.name ?? "strata" });
  const session = new KernelSession(fs, dev, { readOnly: opts.readOnly === true, immutable: opts.immutable === true, debug: opts.debug === true, stats: process.env.STRATA_FUSE_STATS === "1" });
  dev.start(session);
  const timeout = new Promise<"timeout">((res) => setTimeout(() => res("timeout"), 10_000).unref());
  if ((await Promise.race([session.initialized, timeout])) === "timeout") {
    await dev.unmount();
    throw VolumeError.IO(`mount ${abs}`, new Error("the kernel did not start the FUSE session"), { hint: "check dmesg for fuse errors" });
  }
  if (dev.connection !== undefined) {
    await writeFile(`/sys/class/bdi/0:${dev.connection}/read_ahead_kb`, String(READ_AHEAD_KB)).catch(() => undefined);
  }
  if (opts.prepareNext) FuseDevice.prepareReader();
  let closing: Promise<void> | undefined;
  return {
    dir: abs,
    answered: () => dev.answered(),
    unmount() {
      closing ??= (async () => {
        await dev.unmount();
        if (process.env.STRATA_FUSE_STATS === "1") {
          const rows = [...session.stats].sort((a, b) => b[1].ms - a[1].ms);
          for (const [op, s] of rows) process.stderr.write(`strata fuse stats: ${op} ${s.n} calls, ${s.ms.toFixed(0)} ms, ${((s.ms / s.n) * 1000).toFixed(0)} us each\n`);
          for (const [op, n] of Object.entries(dev.answered())) if (n > 0) process.stderr.write(`strata fuse stats: ${op} ${n} calls answered by the reader thread\n`);
        }
        await fs.close();
      })();
      return closing;
    },
  };
}

async function mountNative(fs: MountFs, abs: string, opts: FuseMountOptions): Promise<FuseMount> {
  const debug = opts.debug === true;
  const readOnly = opts.readOnly === true;

  const fail = (cb: Cb, op: string, path: string, err: unknown): void => {
    const errno = toErrno(err);
    if (debug) process.stderr.write(`strata fuse: ${op} ${path}: ${(err as Error)?.message ?? String(err)} (${errno})\n`);
    cb(errno);
  };
  const guard = (path: string): void => {
    checkNames(path);
    if (readOnly && !isControl(path)) throw VolumeError.READ_ONLY(JSON.stringify(path), { op: "change" });
  };
  /** Runs a call that answers with a status only. */
  const status = (op: string, path: string, cb: Cb, mutates: boolean, fn: () => Promise<unknown>): void => {
    (async () => {
      if (mutates) guard(path);
      else checkNames(path);
      await fn();
    })().then(
      () => cb(0),
      (err) => fail(cb, op, path, err),
    );
  };
  /** Runs a call that answers with a value. */
  const value = <T>(op: string, path: string, cb: Cb, fn: () => Promise<T>, map: (v: T) => unknown = (v) => v): void => {
    (async () => {
      checkNames(path);
      return await fn();
    })().then(
      (v) => cb(0, map(v)),
      (err) => fail(cb, op, path, err),
    );
  };

  const ops: Record<string, Cb> = {
    init: (cb: Cb) => cb(0),
    statfs: (path: string, cb: Cb) => value("statfs", path, cb, () => fs.statfs(), (s) => ({ ...s, frsize: s.bsize, favail: s.ffree })),
    getattr: (path: string, cb: Cb) => value("getattr", path, cb, () => fs.getattr(path), toStat),
    fgetattr: (path: string, _fd: number, cb: Cb) => value("getattr", path, cb, () => fs.getattr(path), toStat),
    readdir: (path: string, cb: Cb) => value("readdir", path, cb, () => fs.readdir(path), (names) => [".", "..", ...names]),
    access: (path: string, _mode: number, cb: Cb) => status("access", path, cb, false, () => fs.getattr(path)),
    readlink: (path: string, cb: Cb) => value("readlink", path, cb, () => fs.readlink(path)),
    open: (path: string, flags: number, cb: Cb) => {
      const writes = opensToChange(flags);
      (async () => {
        if (writes) guard(path);
        else checkNames(path);
        return fs.open(path, flags);
      })().then(
        (fh) => cb(0, fh),
        (err) => fail(cb, "open", path, err),
      );
    },
    create: (path: string, mode: number, cb: Cb) => {
      (async () => {
        guard(path);
        return fs.create(path, mode & 0o7777, O.O_CREAT | O.O_RDWR);
      })().then(
        (fh) => cb(0, fh),
        (err) => fail(cb, "create", path, err),
      );
    },
    read: (path: string, fh: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
      fs.read(fh, len, pos).then(
        (data) => {
          const n = Math.min(data.length, len);
          buf.set(n === data.length ? data : data.subarray(0, n));
          cb(n);
        },
        (err) => fail(cb, "read", path, err),
      );
    },
    write: (path: string, fh: number, buf: Buffer, len: number, pos: number, cb: Cb) => {
      if (readOnly && !isControl(path)) return cb(-E.EROFS);
      const hold = !opts.immutable && BASE_MOVING.has(path);
      fs.write(fh, Buffer.from(buf.subarray(0, len)), pos).then(
        (n) => (hold ? setTimeout(() => cb(n), BASE_MOVE_HOLD_MS) : cb(n)),
        (err) => fail(cb, "write", path, err),
      );
    },
    truncate: (path: string, size: number, cb: Cb) => status("truncate", path, cb, true, () => fs.truncate(path, size)),
    ftruncate: (path: string, fh: number, size: number, cb: Cb) => status("ftruncate", path, cb, true, () => fs.ftruncate(fh, size)),
    flush: (path: string, fh: number, cb: Cb) => status("flush", path, cb, false, () => fs.flush(fh)),
    fsync: (path: string, datasync: number, fh: number, cb: Cb) => status("fsync", path, cb, false, () => fs.fsync(fh, datasync !== 0)),
    release: (path: string, fh: number, cb: Cb) => status("release", path, cb, false, () => fs.release(fh)),
    unlink: (path: string, cb: Cb) => status("unlink", path, cb, true, () => fs.unlink(path)),
    mkdir: (path: string, mode: number, cb: Cb) => status("mkdir", path, cb, true, () => fs.mkdir(path, mode & 0o7777)),
    rmdir: (path: string, cb: Cb) => status("rmdir", path, cb, true, () => fs.rmdir(path)),
    rename: (src: string, dst: string, cb: Cb) => status("rename", src, cb, true, async () => {
      guard(dst);
      await fs.rename(src, dst);
    }),
    symlink: (target: string, path: string, cb: Cb) => status("symlink", path, cb, true, () => fs.symlink(target, path)),
    link: (src: string, dst: string, cb: Cb) => status("link", dst, cb, true, () => fs.link(src, dst)),
    chmod: (path: string, mode: number, cb: Cb) => status("chmod", path, cb, true, () => fs.chmod(path, mode & 0o7777)),
    chown: (path: string, uid: number, gid: number, cb: Cb) => status("chown", path, cb, true, () => fs.chown(path, uid, gid)),
    utimens: (path: string, atime: number, mtime: number, cb: Cb) => {
      const now = Date.now();
      const a = atime === UTIME_SPECIAL_MS ? now : atime;
      const m = mtime === UTIME_SPECIAL_MS ? now : mtime;
      status("utimens", path, cb, true, () => fs.utimens(path, a, m));
    },
    setxattr: (path: string, name: string, val: Buffer, _position: number, flags: number, cb: Cb) =>
      status("setxattr", path, cb, true, () => fs.setxattr(path, name, Buffer.from(val), flags)),
    getxattr: (path: string, name: string, _position: number, cb: Cb) => value("getxattr", path, cb, () => fs.getxattr(path, name), (v) => Buffer.from(v.buffer, v.byteOffset, v.byteLength)),
    listxattr: (path: string, cb: Cb) => value("listxattr", path, cb, () => fs.listxattr(path)),
    removexattr: (path: string, name: string, cb: Cb) => status("removexattr", path, cb, true, () => fs.removexattr(path, name)),
  };

  const fuse = new Fuse(abs, ops, fuseOptions(opts));
  await new Promise<void>((res, rej) =>
    fuse.mount((err) => (err ? rej(VolumeError.IO(`mount ${abs}`, err, { hint: "check that /dev/fuse exists and the directory is not in use" })) : res())),
  );

  let closing: Promise<void> | undefined;
  return {
    dir: abs,
    unmount() {
      closing ??= (async () => {
        await new Promise<void>((res) => fuse.unmount(() => res()));
        await forceUnmount(abs).catch(() => undefined);
        await fs.close();
      })();
      return closing;
    },
  };
}
