import { lstat } from "node:fs/promises";
import type { VersionRecord, VolumeRecord } from "../metadata/index.js";
import {
  splitPath,
  splitWritablePath,
  VolumeError,
  type ConflictPolicy,
  type Entry,
  type Overlay,
  type Snapshot,
  type SyncResult,
  type TreeDiff,
} from "../volumefs/index.js";
import { Strata } from "./client.js";

/** A version as the SDK shows it. */
export interface VersionInfo {
  id: string;
  parents: string[];
  time: Date;
  message: string;
  labels: Record<string, string>;
  /** Files (and symlinks) in the version. */
  files: number;
  /** Bytes of regular files in the version. */
  bytes: number;
}

/** A volume as the SDK lists it. */
export interface VolumeInfo {
  name: string;
  head: string | null;
  forkedFrom: { volume: string; version: string | null } | null;
  createdAt: Date;
}

/** One entry of a listing. */
export interface FileInfo {
  /** Path from the volume root, no leading slash. */
  path: string;
  kind: "file" | "dir" | "symlink";
  /** Bytes for a file, bytes of the subtree for a dir, length of the target for a symlink. */
  size: number;
  /** Permission bits, e.g. 0o644. */
  mode: number;
  mtime: Date;
  /** The target, for a symlink. */
  target?: string;
}

/** Options shared by the read methods. */
export interface ReadOptions {
  /** A version: id or unique prefix, "head", or "head~N". Default the head. */
  at?: string;
}

/** Options of Volume.open and friends. */
export interface VolumeOptions {
  /** The client; default `Strata.default()`, configured from the environment. */
  client?: Strata;
  /** Create the volume when missing (default true for open). */
  create?: boolean;
}

function versionInfo(v: VersionRecord): VersionInfo {
  return { id: v.id, parents: v.parents, time: new Date(v.time), message: v.message, labels: v.labels, files: v.files, bytes: v.bytes };
}

function volumeInfo(v: VolumeRecord): VolumeInfo {
  return { name: v.name, head: v.head, forkedFrom: v.forkedFrom, createdAt: new Date(v.createdAt) };
}

/** A listing entry from a tree entry. */
export function fileInfo(path: string, e: Entry): FileInfo {
  const size = e.kind === "file" ? e.size : e.kind === "dir" ? e.bytes : Buffer.byteLength(e.target);
  const out: FileInfo = { path, kind: e.kind, size, mode: e.mode, mtime: new Date(e.mtime) };
  if (e.kind === "symlink") out.target = e.target;
  return out;
}

/** The read methods, shared by a volume (at its head) and a read-only view of a version. */
abstract class Readable {
  protected abstract snapshotFor(at?: string): Promise<Snapshot>;

  /** A whole file's bytes. Throws NOT_FOUND, IS_A_DIRECTORY, CORRUPT. */
  async readFile(path: string, opts: ReadOptions = {}): Promise<Buffer> {
    const snap = await this.snapshotFor(opts.at);
    return Buffer.from(await snap.readFile(splitPath(path).join("/")));
  }

  /** A whole file as UTF-8 text. */
  async readText(path: string, opts: ReadOptions = {}): Promise<string> {
    return (await this.readFile(path, opts)).toString("utf8");
  }

  /** The entry at a path. Throws NOT_FOUND. */
  async stat(path: string, opts: ReadOptions = {}): Promise<FileInfo> {
    const p = splitPath(path).join("/");
    return fileInfo(p, await (await this.snapshotFor(opts.at)).stat(p));
  }

  /** True when something is at the path. */
  async exists(path: string, opts: ReadOptions = {}): Promise<boolean> {
    try {
      return (await (await this.snapshotFor(opts.at)).lookup(path)) !== undefined;
    } catch (err) {
      if (err instanceof VolumeError && err.code === "NOT_A_DIRECTORY") return false;
      throw err;
    }
  }

  /** A directory's entries (or, recursively, everything below it), sorted by path. */
  async listDir(path = "", opts: ReadOptions & { recursive?: boolean } = {}): Promise<FileInfo[]> {
    const snap = await this.snapshotFor(opts.at);
    const p = splitPath(path).join("/");
    const e = await snap.stat(p);
    if (e.kind !== "dir") return [fileInfo(p, e)];
    if (!opts.recursive) return (await snap.readdir(p)).map((c) => fileInfo(p === "" ? c.name : `${p}/${c.name}`, c));
    const out: FileInfo[] = [];
    for await (const item of snap.walk(p)) out.push(fileInfo(item.path, item.entry));
    return out;
  }
}

/** A read-only view of one version of a volume: the same read methods, nothing to write. */
export class VolumeView extends Readable {
  constructor(
    readonly volume: string,
    readonly version: VersionInfo | null,
    private readonly snap: Snapshot,
  ) {
    super();
  }

  protected async snapshotFor(at?: string): Promise<Snapshot> {
    if (at !== undefined) throw new VolumeError("INVALID_ARGUMENT", "read view: a view is already at a version", { hint: "call volume.at(version) for another version" });
    return this.snap;
  }
}

type BatchOp = (o: Overlay) => Promise<unknown>;

/**
 * Changes to a volume that become one version on `sync()`. Methods check paths at once and
 * queue the change; the changes apply in order at sync, on the head as it was when the batch was
 * made (then rebased if the head moved meanwhile).
 */
export class VolumeBatch {
  private readonly ops: BatchOp[] = [];
  private done = false;

  constructor(
    private readonly vol: Volume,
    private readonly base: Promise<VersionRecord | null>,
  ) {
    base.catch(() => undefined);
  }

  private push(op: BatchOp): this {
    if (this.done) throw new VolumeError("INVALID_ARGUMENT", "change batch: already synced", { hint: "start a new batch with volume.batch()" });
    this.ops.push(op);
    return this;
  }

  /** Writes a file (parents are created). */
  putFile(path: string, data: string | Uint8Array, opts: { mode?: number; mtime?: number } = {}): this {
    const segs = splitWritablePath(path);
    const bytes = typeof data === "string" ? Buffer.from(data) : data;
    return this.push((o) =>
      o.put(segs, { kind: "file", name: segs.at(-1)!, mode: opts.mode ?? 0o644, mtime: opts.mtime ?? Date.now(), size: bytes.length, pending: { kind: "bytes", data: bytes } }),
    );
  }

  /**
   * Writes a file from a local file, read at sync (it must not change until then). A caller that
   * has already stat'ed the file passes `size`, `mode` and `mtime` to save a second stat.
   */
  putLocalFile(path: string, localPath: string, opts: { mode?: number; mtime?: number; size?: number } = {}): this {
    const segs = splitWritablePath(path);
    return this.push(async (o) => {
      let { mode, mtime, size } = opts;
      if (mode === undefined || mtime === undefined || size === undefined) {
        const st = await lstat(localPath).catch((err) => {
          throw VolumeError.IO(`read ${localPath}`, err, { hint: "check that the local file exists and is readable" });
        });
        mode ??= st.mode & 0o7777;
        mtime ??= Math.floor(st.mtimeMs);
        size ??= st.size;
      }
      await o.put(segs, { kind: "file", name: segs.at(-1)!, mode, mtime, size, pending: { kind: "file", path: localPath, size } });
    });
  }

  /** Removes a file or, with `recursive`, a directory. */
  remove(path: string, opts: { recursive?: boolean } = {}): this {
    const segs = splitWritablePath(path);
    return this.push((o) => o.remove(segs, opts));
  }

  /** Renames a file or directory (replacing a file or empty directory at `to`). */
  rename(from: string, to: string): this {
    const a = splitWritablePath(from);
    const b = splitWritablePath(to);
    return this.push((o) => o.rename(a, b));
  }

  /** Creates a directory and its parents; no-op if it exists. */
  mkdir(path: string, opts: { mode?: number } = {}): this {
    const segs = splitWritablePath(path);
    return this.push((o) => o.mkdir(segs, opts.mode));
  }

  /** Creates a symbolic link at `path` pointing to `target` (stored as given, never followed). */
  symlink(path: string, target: string): this {
    const segs = splitWritablePath(path);
    if (target.length === 0 || target.includes("\u0000")) throw VolumeError.INVALID_PATH(target, "not a valid symlink target");
    return this.push((o) => o.put(segs, { kind: "symlink", name: segs.at(-1)!, mode: 0o777, mtime: Date.now(), target }));
  }

  /** Sets permission bits. */
  chmod(path: string, mode: number): this {
    const segs = splitWritablePath(path);
    return this.push((o) => o.setAttr(segs, { mode }));
  }

  /** Sets the modification time (ms since the epoch, or a Date). */
  setMtime(path: string, mtime: number | Date): this {
    const segs = splitWritablePath(path);
    return this.push((o) => o.setAttr(segs, { mtime: typeof mtime === "number" ? mtime : mtime.getTime() }));
  }

  /** Number of queued changes. */
  get size(): number {
    return this.ops.length;
  }

  /**
   * Applies the changes and commits them as one version; returns the volume's head afterwards
   * (unchanged when the changes made no difference). Conflicts with a concurrent writer follow
   * `onConflict` (default "fail": VolumeError CONFLICT listing the paths).
   */
  async sync(opts: { message?: string; onConflict?: ConflictPolicy; labels?: Record<string, string>; onProgress?: (done: number, total: number) => void } = {}): Promise<VersionInfo | null> {
    return (await this.syncDetailed(opts)).version;
  }

  /** Like sync, and tells what happened (rebased, conflicts settled, upload figures). */
  async syncDetailed(opts: { message?: string; onConflict?: ConflictPolicy; labels?: Record<string, string>; onProgress?: (done: number, total: number) => void } = {}): Promise<Omit<SyncResult, "version"> & { version: VersionInfo | null }> {
    if (this.done) throw new VolumeError("INVALID_ARGUMENT", "change batch: already synced", { hint: "start a new batch with volume.batch()" });
    this.done = true;
    const repo = this.vol.client.repo;
    const base = await this.base;
    const overlay = repo.stage(base);
    for (const op of this.ops) await op(overlay);
    const res = await repo.sync(this.vol.name, base, overlay, opts);
    return { ...res, version: res.version ? versionInfo(res.version) : null };
  }
}

/**
 * A volume: a directory tree with every past version kept, forkable in constant time.
 *
 * ```ts
 * const vol = await Volume.open("training-data");
 * await vol.putFile("inputs/example.txt", "hello\n");
 * const copy = await vol.fork("attempt-1");
 * ```
 */
export class Volume extends Readable {
  private constructor(
    readonly name: string,
    readonly client: Strata,
  ) {
    super();
  }

  /** Opens a volume, creating it empty on first use (unless `create: false`: UNKNOWN_VOLUME). */
  static async open(name: string, opts: VolumeOptions = {}): Promise<Volume> {
    const client = opts.client ?? Strata.default();
    if (opts.create === false) await client.repo.volume(name);
    else await client.repo.openOrCreate(name);
    return new Volume(name, client);
  }

  /** Creates a new empty volume; throws ALREADY_EXISTS. */
  static async create(name: string, opts: VolumeOptions = {}): Promise<Volume> {
    const client = opts.client ?? Strata.default();
    await client.repo.createVolume(name);
    return new Volume(name, client);
  }

  /** All volumes, by name. */
  static async list(opts: VolumeOptions = {}): Promise<VolumeInfo[]> {
    return (await (opts.client ?? Strata.default()).repo.listVolumes()).map(volumeInfo);
  }

  /**
   * Removes a volume (its versions stay reachable from forks) and its staged changes on this
   * host. Throws UNKNOWN_VOLUME; ALREADY_EXISTS while it is mounted on this host; CONFLICT while
   * changes are staged for it here, unless `discard`.
   */
  static async delete(name: string, opts: VolumeOptions & { discard?: boolean } = {}): Promise<void> {
    await (opts.client ?? Strata.default()).deleteVolume(name, { discard: opts.discard });
  }

  protected async snapshotFor(at?: string): Promise<Snapshot> {
    const repo = this.client.repo;
    return repo.snapshot(await repo.resolve(this.name, at));
  }

  /** The head version, or null for an empty volume. */
  async head(): Promise<VersionInfo | null> {
    const v = await this.client.repo.resolve(this.name);
    return v ? versionInfo(v) : null;
  }

  /** Information about the volume. */
  async info(): Promise<VolumeInfo> {
    return volumeInfo(await this.client.repo.volume(this.name));
  }

  /** Writes one file and commits it as one version; returns that version. */
  async putFile(path: string, data: string | Uint8Array, opts: { mode?: number; message?: string } = {}): Promise<VersionInfo> {
    const v = await this.batch().putFile(path, data, opts).sync({ message: opts.message ?? `put ${splitPath(path).join("/")}` });
    return v!;
  }

  /** A batch of changes that becomes one version on `sync()`. */
  batch(): VolumeBatch {
    return new VolumeBatch(this, this.client.repo.resolve(this.name));
  }

  /** Every version, newest first. */
  async versions(): Promise<VersionInfo[]> {
    return (await this.client.repo.log(this.name)).map(versionInfo);
  }

  /** A new volume whose head is this one's head (or `at`); constant time. */
  async fork(name: string, opts: ReadOptions = {}): Promise<Volume> {
    await this.client.repo.fork(this.name, name, opts);
    return new Volume(name, this.client);
  }

  /** What changed from version `a` to `b` (default the head). */
  diff(a: string, b?: string): Promise<TreeDiff> {
    return this.client.repo.diff(this.name, a, b);
  }

  /** A new head version whose tree is that of `version`. */
  async revert(version: string): Promise<VersionInfo> {
    return versionInfo(await this.client.repo.revert(this.name, version));
  }

  /** A read-only view of one version, with the same read methods. */
  async at(version: string): Promise<VolumeView> {
    const repo = this.client.repo;
    const v = await repo.resolve(this.name, version);
    return new VolumeView(this.name, v ? versionInfo(v) : null, repo.snapshot(v));
  }
}
