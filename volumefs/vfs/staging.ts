/**
 * The durable staging layer of a mount: the writes not yet synced, on local disk.
 *
 * Layout under `<stagingRoot>/<env>/<volume>/`:
 *   lock             {"pid","host","mount","time"}: the process that has the volume mounted;
 *                    removed when it closes, so one found by an opener was left by a holder that died
 *   manifest.json    {"v":1,"base":id|null,"first":N,"syncing"?:{"token","upTo"},"volume"?:T},
 *                    replaced atomically (write to a temp file, rename); T is the creation time
 *                    of the volume the directory belongs to (a volume removed and made again
 *                    under the same name is another volume: see `open`)
 *   journal-<N>.log  layer N: JSON lines, one metadata operation each (JournalOp), appended
 *                    with one write(2) before the operation is answered
 *   data/<content>   one sparse file per staged content: byte p of the file is byte p of the
 *                    content wherever a `w` operation of the journal says it was written; a
 *                    small content (all writes below INLINE_MAX) has no file: its `w` lines
 *                    carry the bytes (`d`, base64) until an `m` line says they moved to the file;
 *                    a direct content (`x` on its `create` or `cow` line) is its whole data file,
 *                    which the kernel may write itself (a backing file): its size and mtime are
 *                    the file's; empty files no content names are spares for new contents
 *                    (StagingDir.takeSpare)
 *   kept-open        ids of data files that may still be open for writing in another process:
 *                    those the kernel had opened as backing files for a mount that did not end
 *                    cleanly (killed, or ended with files open). The kernel goes on writing
 *                    through such a file without any mount, so it is never made a spare (a new
 *                    file would get the old writer's bytes), only unlinked once no name reaches it
 *
 * Invariants:
 * - data bytes are written before the journal line that names them, and a journal line before
 *   the operation is answered; both sit in the page cache, which outlives a killed process, so
 *   only fsync(2) of a file (or a sync) forces them to the disk;
 * - the staged state is the manifest's `base` version with layers `first`, `first`+1, … replayed
 *   in order; a sync freezes the layers up to some N and starts layer N+1 for later writes;
 *   layers up to N are deleted only after the manifest names a base that contains them;
 * - `syncing` is written before a sync commits: if the process dies after the commit but before
 *   the manifest moved, the next mount finds the version by its `syncId` label and replays only
 *   the later layers on top of it.
 * Offsets are plain numbers (exact to 2^53), so files over 4 GiB work everywhere.
 */
import { randomBytes } from "node:crypto";
import { close as closeAsync, closeSync, constants, copyFileSync, fstatSync, fsyncSync, ftruncateSync, futimesSync, mkdirSync, open as openAsync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, unlinkSync, writeFileSync, writeSync, existsSync } from "node:fs";
import { rename, unlink } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { Readable } from "node:stream";
import { Chunker, DEFAULT_CHUNK_PARAMS, type ChunkParams } from "../chunk/index.js";
import { VolumeError } from "../errors.js";
import { tryLockExclusive } from "../native.js";
import type { PendingWriter } from "./overlay.js";
import type { ChunkRef } from "./tree.js";

/** One metadata operation of the journal. Paths are normalized (no leading slash). */
export type JournalOp =
  | { o: "create"; p: string; c: string; m: number; t: number; u?: number; g?: number; x?: 1 }
  /** With `x`: a direct content said again over a sync's version; `s` then names the copy that sync stored of it. */
  | { o: "cow"; p: string; c: string; f?: string; x?: 1; s?: string }
  | { o: "w"; c: string; at: number; n: number; t: number; d?: string }
  | { o: "m"; c: string }
  | { o: "tr"; c: string; s: number; t: number }
  | { o: "mkdir"; p: string; m: number; t: number; u?: number; g?: number }
  | { o: "rm"; p: string; t?: number }
  /** The change at `p` goes and the base's entry shows again (a sync took the other writer's file there). */
  | { o: "drop"; p: string; t?: number }
  | { o: "mv"; p: string; d: string; t?: number }
  | { o: "sym"; p: string; target: string; t: number; u?: number; g?: number }
  | { o: "link"; p: string; d: string; t?: number }
  | { o: "attr"; p: string; mode?: number; mtime?: number; uid?: number; gid?: number }
  | { o: "xattr"; p: string; k: string; v: string | null };

/** Contents whose writes all end below this many bytes keep their bytes in the journal. */
export const INLINE_MAX = 16 * 1024;

/** Contents below this many bytes are read whole and handed to a sync's writer in one piece. */
const SMALL_UPLOAD_BYTES = 1024 * 1024;

/** Spare data files a staging directory keeps at most (StagingDir.takeSpare). */
const SPARES_MAX = 16384;
/**
 * Spare data files of at most this many bytes are emptied when taken, not before, as long as
 * such spares hold at most SPARE_BYTES_MAX bytes in all (disk a volume's staging keeps in use).
 */
const SMALL_SPARE_BYTES = 1024 * 1024;
const SPARE_BYTES_MAX = 64 * 1024 * 1024;

/** A sync reads a staged file in blocks of this size, each handed over whole to the chunk writer. */
const UPLOAD_BLOCK_BYTES = 8 * 1024 * 1024;

/** The staging manifest. */
export interface StagingManifest {
  v: 1;
  /** The version the layers apply to (null: the empty volume). */
  base: string | null;
  /** The oldest layer still to replay. */
  first: number;
  /** A sync in flight: its token (the version's `syncId` label) and the last layer it holds. */
  syncing?: { token: string; upTo: number };
  /** The creation time of the volume these layers belong to (absent in directories of earlier releases). */
  volume?: number;
}

/** Who holds a staging directory. */
export interface StagingOwner {
  pid: number;
  host: string;
  /** The mount's name for provenance (host:pid:mountpoint). */
  mount: string;
  time: number;
}

const locallyLocked = new Set<string>();

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * One volume's staging directory, locked by this process while open. Journal appends are
 * synchronous write(2) calls (page cache, no fsync) so that they are ordered with the replies.
 */
export class StagingDir {
  readonly dir: string;
  readonly dataDir: string;
  manifest: StagingManifest;
  /** The layer new operations are appended to. */
  layer: number;
  private journalFd: number | undefined;
  private closed = false;
  private readonly fds = new Map<string, number>();
  /** The creation time of the volume, written into every manifest (see `open`). */
  private incarnation: number | undefined;
  /** The open lock file whose flock(2) this process holds (see takeLock). */
  private lockFd: number | undefined;
  /** Data files another process may still write through (the `kept-open` file): never spares. */
  private readonly keptOpen = new Set<string>();

  private constructor(dir: string, manifest: StagingManifest, layer: number) {
    this.dir = dir;
    this.dataDir = join(dir, "data");
    this.manifest = manifest;
    this.layer = layer;
  }

  /**
   * Opens (creating) `<root>/<env>/<volume>/` and takes its lock. Throws ALREADY_EXISTS when a
   * live process (this one included) holds it; a lock left by a dead process is taken over.
   *
   * `incarnation` is the volume's creation time. A directory that names another was left by an
   * earlier volume of the same name (removed, then made again): its changes are not this
   * volume's, so it is set aside as `<root>-removed/<env>/<its time>/<volume>` (nothing in it is
   * deleted) and a fresh directory is opened.
   */
  static open(root: string, env: string, volume: string, mount: string, initialBase: string | null, incarnation?: number): StagingDir {
    const dir = join(root, env, volume);
    mkdirSync(join(dir, "data"), { recursive: true });
    const lockPath = join(dir, "lock");
    if (locallyLocked.has(dir)) throw alreadyMounted(volume, { pid: process.pid, host: hostname(), mount, time: 0 });
    const me: StagingOwner = { pid: process.pid, host: hostname(), mount, time: Date.now() };
    // A clean close removes the lock file: one still there is a holder that died or left files open.
    const unclean = existsSync(lockPath);
    const lockFd = takeLock(lockPath, volume, me);
    locallyLocked.add(dir);
    let manifest: StagingManifest;
    try {
      manifest = JSON.parse(readFileSync(join(dir, "manifest.json"), "utf8")) as StagingManifest;
    } catch {
      manifest = { v: 1, base: initialBase, first: 1 };
    }
    if (incarnation !== undefined && manifest.volume !== undefined && manifest.volume !== incarnation) {
      // Set aside under the lock (it moves along, and is then dropped), so no other mount replays it.
      const aside = join(asideRoot(root, env), String(manifest.volume), volume);
      mkdirSync(join(aside, ".."), { recursive: true });
      rmSync(aside, { recursive: true, force: true });
      renameSync(dir, aside);
      rmSync(join(aside, "lock"), { force: true });
      if (lockFd !== undefined) closeSync(lockFd);
      locallyLocked.delete(dir);
      return StagingDir.open(root, env, volume, mount, initialBase, incarnation);
    }
    const layers = listLayers(dir);
    const layer = Math.max(manifest.first, ...layers) + (layers.length > 0 ? 1 : 0);
    const s = new StagingDir(dir, manifest, layer);
    s.lockFd = lockFd;
    s.incarnation = incarnation ?? manifest.volume;
    s.loadKeptOpen(unclean);
    s.writeManifest(manifest, true);
    s.openJournal();
    return s;
  }

  /**
   * Reads the `kept-open` ids still naming data files. After a holder died (its lock file is
   * still there), every data file joins them: the dead mount's backing files are among them.
   * Written durably before any file could be made a spare.
   */
  private loadKeptOpen(unclean: boolean): void {
    let listed: string[] = [];
    try {
      listed = readFileSync(join(this.dir, "kept-open"), "utf8").split("\n").filter((id) => id !== "");
    } catch {
      // none
    }
    if (listed.length === 0 && !unclean) return; // the common case: no data directory listing at start-up
    const present = new Set(this.listData());
    for (const id of listed) if (present.has(id)) this.keptOpen.add(id);
    if (unclean) for (const id of present) this.keptOpen.add(id);
    if (this.keptOpen.size !== listed.length || unclean) this.saveKeptOpen();
  }

  /** Writes `kept-open` durably (removes it when it lists nothing). */
  private saveKeptOpen(): void {
    if (this.keptOpen.size === 0) rmSync(join(this.dir, "kept-open"), { force: true });
    else this.replaceFile("kept-open", [...this.keptOpen].join("\n"), true);
  }

  private openJournal(): void {
    this.journalFd = openSync(join(this.dir, `journal-${this.layer}.log`), constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND, 0o600);
  }

  /** The layers on disk from `manifest.first` on, in order, with their operations. A torn last line is skipped. */
  readLayers(): { layer: number; ops: JournalOp[] }[] {
    const out: { layer: number; ops: JournalOp[] }[] = [];
    for (const n of listLayers(this.dir)) {
      if (n < this.manifest.first) continue;
      const text = readFileSync(join(this.dir, `journal-${n}.log`), "utf8");
      const ops: JournalOp[] = [];
      for (const line of text.split("\n")) {
        if (line === "") continue;
        try {
          ops.push(JSON.parse(line) as JournalOp);
        } catch {
          break;
        }
      }
      out.push({ layer: n, ops });
    }
    return out;
  }

  /** True when some layer from `manifest.first` on holds an operation. */
  hasOps(): boolean {
    return this.readLayers().some((l) => l.ops.length > 0);
  }

  /** Appends one operation to the current layer. */
  append(op: JournalOp): void {
    if (this.journalFd === undefined) throw new VolumeError("BAD_HANDLE", "append journal: staging is closed");
    // Whole, or it throws: a short write (a nearly full disk) would glue the next line onto a
    // torn one, and replay stops at the first line it cannot read.
    const line = Buffer.from(JSON.stringify(op) + "\n");
    for (let at = 0; at < line.length; ) at += writeSync(this.journalFd, line, at, line.length - at);
    this.appended++;
  }

  /** Lines appended to the current layer. */
  appended = 0;

  /** Ends the current layer and starts the next; returns the ended layer's number. */
  rotate(): number {
    const ended = this.layer;
    const old = this.journalFd;
    // Not kept while the next layer's file opens (it may fail): a closed number may name another file.
    this.journalFd = undefined;
    if (old !== undefined) closeSync(old);
    this.layer++;
    this.openJournal();
    this.appended = 0;
    return ended;
  }

  /** Replaces the manifest atomically; `durable` fsyncs it (and the directory) first. */
  writeManifest(m: StagingManifest, durable = false): void {
    if (this.incarnation !== undefined) m = { ...m, volume: this.incarnation };
    this.replaceFile("manifest.json", JSON.stringify(m), durable);
    this.manifest = m;
  }

  /** Replaces file `name` of the directory atomically (a temp file, then a rename). */
  private replaceFile(name: string, text: string, durable: boolean): void {
    const path = join(this.dir, name);
    const tmp = `${path}.tmp`;
    const fd = openSync(tmp, "w", 0o600);
    writeSync(fd, text);
    if (durable) fsyncSync(fd);
    closeSync(fd);
    renameSync(tmp, path);
    if (durable) fsyncDir(this.dir);
  }

  /** Drops the manifest's `syncing` (a sync known not to have committed), durably. */
  settleSync(): void {
    const { syncing: _drop, ...rest } = this.manifest;
    this.writeManifest(rest, true);
  }

  /** Deletes the journals of layers up to `upTo`. */
  dropLayers(upTo: number): void {
    for (const n of listLayers(this.dir)) if (n <= upTo) rmSync(join(this.dir, `journal-${n}.log`), { force: true });
  }

  /** The path of a content's data file. */
  dataPath(id: string): string {
    return join(this.dataDir, id);
  }

  /** An open read-write descriptor of a content's data file (created on first use unless not `create`: ENOENT); at most 128 stay open. */
  fd(id: string, create = true): number {
    let fd = this.fds.get(id);
    if (fd !== undefined) {
      this.fds.delete(id);
      this.fds.set(id, fd);
      return fd;
    }
    fd = openSync(this.dataPath(id), constants.O_RDWR | (create ? constants.O_CREAT : 0), 0o600);
    this.keepFd(id, fd);
    return fd;
  }

  /** Keeps `fd` open as content `id`'s data file's descriptor; at most 128 stay open. */
  private keepFd(id: string, fd: number): void {
    this.fds.set(id, fd);
    if (this.fds.size > 128) {
      const [oldId, oldFd] = this.fds.entries().next().value as [string, number];
      this.fds.delete(oldId);
      closeSync(oldFd);
    }
  }

  /** Copies a content's data file to another content's (which must not exist yet); a missing one copies as ENOENT. */
  copyData(from: string, to: string): void {
    // A reflink where the file system has them (XFS, btrfs): then the copy costs no bytes.
    copyFileSync(this.dataPath(from), this.dataPath(to), constants.COPYFILE_EXCL | constants.COPYFILE_FICLONE);
  }

  /** Closes the kept descriptor of a content's data file, if one is open. */
  private closeFd(id: string): void {
    const fd = this.fds.get(id);
    if (fd === undefined) return;
    closeSync(fd);
    this.fds.delete(id);
  }

  /**
   * Lets go of the data files of contents no name reaches any more (the many files of contents a
   * sync stored), in the background, a few at a time on the thread pool: each is renamed to a
   * new id, a spare for a later new content to take (`takeSpare`), up to SPARES_MAX of them; the
   * rest are unlinked. Their ids are never used again (journal layers still on disk may name
   * them). A file whose content `size` says it is small is emptied when it is taken (O_TRUNC),
   * up to SPARE_BYTES_MAX held so in all; a larger one, or one of unknown size, is emptied here
   * first, since freeing many blocks can take long. Files a crash or an unmount leaves behind, spares among them, are not reachable:
   * the next mount gives them here again.
   */
  recycleDataLater(files: Iterable<{ id: string; size?: number }>): void {
    const gone: { id: string; size?: number }[] = [];
    for (const f of files) {
      this.closeFd(f.id);
      gone.push(f);
    }
    if (gone.length === 0) return;
    this.recycling = this.recycling.then(async () => {
      for (let i = 0; i < gone.length; i += 32) {
        const batch = gone.slice(i, i + 32);
        const fresh = randomBytes(8 * batch.length);
        await Promise.all(batch.map((f, k) => this.recycleOne(f, fresh.toString("hex", 8 * k, 8 * k + 8))));
      }
    });
  }

  private async recycleOne(file: { id: string; size?: number }, fresh: string): Promise<void> {
    // Once closed, a file is left for the next mount (which finds it unreachable).
    if (this.closed) return;
    const path = this.dataPath(file.id);
    if (this.spares.length < SPARES_MAX && !this.keptOpen.has(file.id)) {
      const bytes = file.size !== undefined && file.size <= SMALL_SPARE_BYTES && this.spareBytes + file.size <= SPARE_BYTES_MAX ? file.size : 0;
      this.spareBytes += bytes;
      try {
        if (bytes === 0) await emptyFile(path);
        await rename(path, this.dataPath(fresh));
        if (!this.closed) this.spares.push({ id: fresh, bytes });
        return;
      } catch (err) {
        this.spareBytes -= bytes;
        if ((err as NodeJS.ErrnoException).code === "ENOENT") return;
      }
    }
    await unlink(path).catch(() => undefined);
  }

  private recycling: Promise<void> = Promise.resolve();

  /** Data files no content names, for new contents (see takeSpare); `bytes`: what it may still hold. */
  private readonly spares: { id: string; bytes: number }[] = [];
  /** The bytes spares may still hold, in all. */
  private spareBytes = 0;

  /**
   * An id for a new content whose empty data file exists already (open, its mtime set to
   * `mtimeMs`): a spare (see recycleDataLater), or undefined when there is none (the caller then
   * makes the file). Making a file costs the local file system an inode, and ext4 without a
   * journal steps over every inode freed in the last minutes to find one: after a sync let go of
   * tens of thousands of files, each create of the next few minutes would wait for that.
   */
  takeSpare(mtimeMs: number): string | undefined {
    while (this.spares.length > 0) {
      const s = this.spares.pop()!;
      this.spareBytes -= s.bytes;
      let fd: number;
      try {
        fd = openSync(this.dataPath(s.id), constants.O_RDWR | (s.bytes > 0 ? constants.O_TRUNC : 0));
      } catch {
        continue;
      }
      futimesSync(fd, mtimeMs / 1000, mtimeMs / 1000);
      this.keepFd(s.id, fd);
      return s.id;
    }
    return undefined;
  }

  /** Ids of every data file on disk. */
  listData(): string[] {
    return existsSync(this.dataDir) ? readdirSync(this.dataDir) : [];
  }

  /** Forces the journal layers still to replay, the given data files and their names to the disk (an fsync(2) of a staged file). */
  fsync(ids: Iterable<string> = []): void {
    for (const id of ids) fsyncSync(this.fd(id));
    // Every layer still to replay: the file's create line may sit in one before the current.
    for (const n of listLayers(this.dir)) {
      if (n < this.manifest.first || n === this.layer) continue;
      const fd = openSync(join(this.dir, `journal-${n}.log`), "r");
      try {
        fsyncSync(fd);
      } finally {
        closeSync(fd);
      }
    }
    if (this.journalFd !== undefined) fsyncSync(this.journalFd);
    // And the names of new journal and data files.
    fsyncDir(this.dataDir);
    fsyncDir(this.dir);
  }

  /**
   * Removes `<root>/<env>/<volume>/` (the volume is being removed): refused with ALREADY_EXISTS
   * while a live process has it mounted, and with CONFLICT while it holds staged changes, unless
   * `discard`. The directory is renamed away under its lock before it is deleted, so a mount that
   * starts meanwhile finds nothing of it.
   */
  static remove(root: string, env: string, volume: string, discard: boolean): void {
    const dir = join(root, env, volume);
    if (!existsSync(dir)) return;
    let s: StagingDir;
    try {
      s = StagingDir.open(root, env, volume, "volume rm", null);
    } catch (err) {
      if (err instanceof VolumeError && err.code === "ALREADY_EXISTS") {
        throw new VolumeError("ALREADY_EXISTS", `remove volume ${JSON.stringify(volume)}: it is mounted on this host`, { volume, cause: err, hint: "unmount it first (`strata unmount DIR`)" });
      }
      throw err;
    }
    const gone = join(asideRoot(root, env), `rm-${randomBytes(8).toString("hex")}`);
    try {
      if (!discard && s.hasOps()) {
        throw new VolumeError("CONFLICT", `remove volume ${JSON.stringify(volume)}: changes staged for it on this host would be lost`, {
          volume,
          hint: `mount it and sync them (\`strata sync DIR\`), or remove it with \`strata volume rm ${volume} --discard\``,
        });
      }
      s.closeFiles();
      mkdirSync(join(gone, ".."), { recursive: true });
      renameSync(dir, gone);
    } finally {
      s.close();
    }
    rmSync(gone, { recursive: true, force: true });
  }

  private closeFiles(): void {
    for (const fd of this.fds.values()) closeSync(fd);
    this.fds.clear();
    if (this.journalFd !== undefined) closeSync(this.journalFd);
    this.journalFd = undefined;
  }

  /**
   * Closes descriptors and lets go of the lock; idempotent. `keptOpen`: data files the kernel
   * opened as backing files for writing whose release never came (the session ended with them
   * open): other processes may go on writing them, so they are added to `kept-open`.
   */
  close(keptOpen: Iterable<string> = []): void {
    if (this.closed) return;
    const n = this.keptOpen.size;
    for (const id of keptOpen) this.keptOpen.add(id);
    if (this.keptOpen.size > n) this.saveKeptOpen();
    this.closed = true;
    this.closeFiles();
    try {
      const holder = JSON.parse(readFileSync(join(this.dir, "lock"), "utf8")) as StagingOwner;
      if (holder.pid === process.pid) unlinkSync(join(this.dir, "lock"));
    } catch {
      // already gone
    }
    // Let go of the flock only now: an opener still holding the unlinked file then sees that
    // the path no longer names it, and tries again (see takeLock).
    if (this.lockFd !== undefined) closeSync(this.lockFd);
    this.lockFd = undefined;
    locallyLocked.delete(this.dir);
  }
}

/**
 * Where staging directories of removed volumes go, beside the root: not under it, where any
 * name could be a volume's.
 */
function asideRoot(root: string, env: string): string {
  return join(`${root}-removed`, env);
}

/**
 * Takes the lock of a staging directory: an exclusive flock(2) on `lockPath`, which the kernel
 * lets go of when the holder closes it or dies, so two processes can never both hold it and a
 * killed one leaves nothing to take over. The file then says who holds it (`me`). Returns the
 * descriptor to keep open; throws ALREADY_EXISTS when a live process holds it. Where flock is
 * not to be had (no koffi), an exclusively created file stands in, taken over from a dead pid.
 */
function takeLock(lockPath: string, volume: string, me: StagingOwner): number | undefined {
  for (let attempt = 0; attempt < 5; attempt++) {
    const fd = openSync(lockPath, constants.O_RDWR | constants.O_CREAT, 0o600);
    let taken: boolean | undefined;
    try {
      taken = tryLockExclusive(fd);
    } catch (err) {
      closeSync(fd);
      throw lockError(volume, err);
    }
    if (taken === undefined) {
      closeSync(fd);
      return takeLockFile(lockPath, volume, me);
    }
    if (!taken) {
      closeSync(fd);
      throw alreadyMounted(volume, readOwner(lockPath) ?? { pid: 0, host: me.host, mount: "", time: 0 });
    }
    // The holder we waited behind may have unlinked the path (or a remove renamed the directory)
    // since we opened it: a lock on a file the path no longer names locks nothing.
    if (statSync(lockPath, { throwIfNoEntry: false })?.ino !== fstatSync(fd).ino) {
      closeSync(fd);
      continue;
    }
    ftruncateSync(fd, 0);
    writeSync(fd, JSON.stringify(me), 0);
    return fd;
  }
  throw lockError(volume, new Error("the lock file kept changing"));
}

function lockError(volume: string, err: unknown): VolumeError {
  return VolumeError.IO(`lock staging of volume ${JSON.stringify(volume)}`, err);
}

/** Who a lock file says holds it, if it says. */
function readOwner(lockPath: string): StagingOwner | undefined {
  try {
    return JSON.parse(readFileSync(lockPath, "utf8")) as StagingOwner;
  } catch {
    return undefined;
  }
}

/** takeLock without flock: an exclusively created file, taken over from a dead holder. */
function takeLockFile(lockPath: string, volume: string, me: StagingOwner): undefined {
  for (let attempt = 0; ; attempt++) {
    try {
      const fd = openSync(lockPath, "wx");
      writeSync(fd, JSON.stringify(me));
      closeSync(fd);
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST" || attempt > 3) throw lockError(volume, err);
    }
    const holder = readOwner(lockPath);
    if (holder && holder.host === me.host && pidAlive(holder.pid) && holder.pid !== process.pid) throw alreadyMounted(volume, holder);
    const tmp = `${lockPath}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(me));
    renameSync(tmp, lockPath);
    const now = readOwner(lockPath);
    if (now?.pid === me.pid && now.time === me.time) return;
  }
}

function alreadyMounted(volume: string, holder: StagingOwner): VolumeError {
  return new VolumeError("ALREADY_EXISTS", `mount volume ${JSON.stringify(volume)}: already mounted on this host by pid ${holder.pid}${holder.mount ? ` (${holder.mount})` : ""}`, {
    volume,
    hint: "unmount it first (`strata unmount DIR`), or mount it read-only",
  });
}

/** Empties a file (open with O_TRUNC, on the thread pool). */
function emptyFile(path: string): Promise<void> {
  return new Promise((resolve, reject) =>
    openAsync(path, constants.O_WRONLY | constants.O_TRUNC, (err, fd) => {
      if (err) reject(err);
      else closeAsync(fd, () => resolve());
    }),
  );
}

function listLayers(dir: string): number[] {
  const out: number[] = [];
  for (const name of readdirSync(dir)) {
    const m = /^journal-(\d+)\.log$/.exec(name);
    if (m) out.push(Number(m[1]));
  }
  return out.sort((a, b) => a - b);
}

function fsyncDir(dir: string): void {
  try {
    const fd = openSync(dir, "r");
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    // some file systems refuse fsync on directories
  }
}

function writeAll(fd: number, data: Uint8Array, at: number): void {
  let off = 0;
  while (off < data.length) off += writeSync(fd, data, off, data.length - off, at + off);
}

/** Reads `n` bytes at `at` into `into` from `off`, fewer at end of file; returns how many. */
function readAll(fd: number, into: Uint8Array, off: number, n: number, at: number): number {
  let got = 0;
  while (got < n) {
    const r = readSync(fd, into, off + got, n - got, at + got);
    if (r === 0) break;
    got += r;
  }
  return got;
}

/** A set of disjoint, non-adjacent byte ranges [start, end), sorted. */
export class Extents {
  readonly starts: number[] = [];
  readonly ends: number[] = [];

  /** Adds [a, b), merging with neighbours. */
  add(a: number, b: number): void {
    if (b <= a) return;
    const s = this.starts;
    const e = this.ends;
    let i = lowerBound(e, a);
    let j = i;
    while (j < s.length && s[j]! <= b) j++;
    if (i < j) {
      a = Math.min(a, s[i]!);
      b = Math.max(b, e[j - 1]!);
    }
    s.splice(i, j - i, a);
    e.splice(i, j - i, b);
  }

  /** Drops everything at or past `n`. */
  clip(n: number): void {
    const s = this.starts;
    const e = this.ends;
    while (s.length > 0 && s[s.length - 1]! >= n) {
      s.pop();
      e.pop();
    }
    if (e.length > 0 && e[e.length - 1]! > n) e[e.length - 1] = n;
  }

  /** The covered pieces inside [a, b). */
  pieces(a: number, b: number): [number, number][] {
    const out: [number, number][] = [];
    for (let i = lowerBound(this.ends, a + 1); i < this.starts.length && this.starts[i]! < b; i++) {
      out.push([Math.max(a, this.starts[i]!), Math.min(b, this.ends[i]!)]);
    }
    return out;
  }

  /** True when some byte of [a, b) is covered. */
  overlaps(a: number, b: number): boolean {
    const i = lowerBound(this.ends, a + 1);
    return i < this.starts.length && this.starts[i]! < b;
  }

  /** Bytes covered. */
  get bytes(): number {
    let n = 0;
    for (let i = 0; i < this.starts.length; i++) n += this.ends[i]! - this.starts[i]!;
    return n;
  }
}

/** First index with arr[i] >= x. */
function lowerBound(arr: readonly number[], x: number): number {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid]! < x) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Reads bytes of a stored file from its chunk list: [offset, offset+length), shorter at the end. */
export type ChunkRangeReader = (chunks: readonly ChunkRef[], size: number, offset: number, length: number) => Promise<Uint8Array>;

/** What a staged content shows below its own writes. */
export type Lower = { kind: "chunks"; chunks: ChunkRef[]; size: number } | { kind: "content"; content: StagedContent } | null;

/** Upload figures of one content. */
export interface ContentUploadStats {
  /** Bytes read and re-chunked. */
  rechunked: number;
  /** Bytes kept as the base's chunks without reading them. */
  reused: number;
}

/**
 * The bytes of one staged file: its own writes in a sparse data file (ranges in `extents`),
 * over a lower layer (the chunks of a stored file, or another staged content that a sync froze)
 * of which the first `lowerLimit` bytes still show; everything else reads as zeros.
 * Once `frozen`, a content never changes again: a write makes a new content over it.
 */
export class StagedContent {
  readonly extents = new Extents();
  /** Set when a sync took it: never written again. */
  frozen = false;
  /** The chunks a sync made of it (set once uploaded). */
  uploaded: { chunks: ChunkRef[]; size: number } | undefined;
  /** Figures of the last upload. */
  uploadStats: ContentUploadStats | undefined;
  private uploading: Promise<{ chunks: ChunkRef[]; size: number }> | undefined;
  /** The bytes of a small content that has no data file (yet). */
  private inline: Buffer | undefined;
  /** True once the content's bytes live in its data file. */
  hasFile = false;
  /** True once a hard link gave it a second name: a change through one name shows in the other. */
  linked = false;
  /** Names in the staged tree that show this content (its link count): hard links add, unlinks and replacing renames take away. */
  names = 1;
  /**
   * The bytes are the whole data file, [0, file size), with no lower layer: the kernel may write
   * the file itself (a backing file of an open), so the file, not this object, knows the size and
   * mtime (`refresh`). Only a new file's content is direct: a change to a stored file stages the
   * changed ranges only.
   */
  direct = false;
  /** Opens that may write the data file without us (backing files of writable opens): see `kernelOpened`. */
  backedWriters = 0;

  /** An open the kernel may write the data file through begins: what is known of the bytes may go stale. */
  kernelOpened(): void {
    this.backedWriters++;
    this.inline = undefined;
  }

  /** Such an open ended: the bytes are read back from the file (`refresh`) unless a sync froze them. */
  kernelReleased(): void {
    this.backedWriters--;
    if (!this.frozen) this.refresh();
  }

  constructor(
    private readonly staging: StagingDir,
    readonly id: string,
    public lower: Lower,
    /** The logical size in bytes. */
    public size: number,
    /** Modification time, ms since the epoch. */
    public mtime: number,
    /** Bytes of `lower` that show through. */
    public lowerLimit = size,
  ) {}

  /** Makes a new, empty content direct (see `direct`), its data file created now unless `replay`. */
  makeDirect(replay = false): void {
    if (this.lower || this.size > 0 || this.frozen) throw new VolumeError("INVALID_ARGUMENT", `make content ${this.id} direct: not a new empty content`);
    this.direct = true;
    this.hasFile = true;
    if (!replay) this.staging.fd(this.id);
  }

  /**
   * A direct content's size and mtime from its data file (which the kernel may have written),
   * all of it showing. Call where the bytes may have changed without us: after an open that may
   * have written it is released, while one is open, and after a replay. A missing file is empty.
   * While no such open is left, a small file's bytes are kept in memory too (as a small content's
   * are), read now while the file is in the page cache: a sync of many small files then reads
   * none of them.
   */
  refresh(): void {
    if (!this.direct) return;
    let size = 0;
    let mtime = this.mtime;
    this.inline = undefined;
    try {
      const fd = this.staging.fd(this.id, false);
      const st = fstatSync(fd);
      size = st.size;
      // Rounded: a time set as whole milliseconds goes through futimes as float seconds and can
      // come back a nanosecond short (…233.999 for …234).
      mtime = Math.round(st.mtimeMs);
      if (this.backedWriters === 0 && size > 0 && size <= INLINE_MAX) {
        const bytes = Buffer.allocUnsafe(size);
        if (readAll(fd, bytes, 0, size, 0) === size) this.inline = bytes;
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
    this.extents.clip(0);
    this.extents.add(0, size);
    this.size = size;
    this.mtime = mtime;
  }

  /** Sets the modification time; a direct content's data file takes it too (its mtime is the file's). */
  setMtime(mtime: number): void {
    this.mtime = mtime;
    if (this.direct && !this.frozen) futimesSync(this.staging.fd(this.id), mtime / 1000, mtime / 1000);
  }

  /** The lower layer's size. */
  get lowerSize(): number {
    if (!this.lower) return 0;
    return this.lower.kind === "chunks" ? this.lower.size : this.lower.content.size;
  }

  /**
   * Writes bytes at `at` (data first, in the page cache); extends the size as needed. Returns
   * what the journal must record, in order: `moved` (the inline bytes went to the data file:
   * an `m` line) and `inline` (the bytes stay in memory: the `w` line carries them).
   */
  write(data: Uint8Array, at: number, mtime: number): { moved: boolean; inline: boolean } {
    if (this.frozen) throw new VolumeError("INVALID_ARGUMENT", `write content ${this.id}: frozen by a sync`);
    if (!this.hasFile && at + data.length <= INLINE_MAX) {
      this.writeInline(data, at);
      this.noteWrite(at, data.length, mtime);
      return { moved: false, inline: true };
    }
    const fd = this.staging.fd(this.id);
    // A direct content's bytes in memory are a copy of its file's: the file is written below.
    if (this.direct) this.inline = undefined;
    let moved = false;
    if (!this.hasFile) {
      if (this.inline) writeAll(fd, this.inline, 0);
      this.inline = undefined;
      this.hasFile = true;
      moved = true;
    }
    writeAll(fd, data, at);
    this.noteWrite(at, data.length, mtime);
    return { moved, inline: false };
  }

  /** Replays a write whose bytes the journal carries. */
  noteInline(data: Uint8Array, at: number, mtime: number): void {
    this.writeInline(data, at);
    this.noteWrite(at, data.length, mtime);
  }

  /** Replays an `m` line: the bytes are in the data file from here on. */
  noteMoved(): void {
    this.inline = undefined;
    this.hasFile = true;
  }

  private writeInline(data: Uint8Array, at: number): void {
    const need = at + data.length;
    if (!this.inline || this.inline.length < need) {
      const next = Buffer.alloc(Math.min(INLINE_MAX, Math.max(need, (this.inline?.length ?? 0) * 2, 256)));
      if (this.inline) this.inline.copy(next);
      this.inline = next;
    }
    this.inline.set(data, at);
  }

  /** Records a write whose bytes are already in the data file (journal replay). */
  noteWrite(at: number, n: number, mtime: number): void {
    if (!this.inline && n > 0) this.hasFile = true;
    if (n <= 0) return;
    if (at > this.size) this.cutLower(this.size);
    this.extents.add(at, at + n);
    this.size = Math.max(this.size, at + n);
    this.mtime = mtime;
  }

  /** Sets the size; bytes past a shrink read as zeros if the file grows again. */
  truncate(size: number, mtime: number): void {
    if (this.frozen) throw new VolumeError("INVALID_ARGUMENT", `truncate content ${this.id}: frozen by a sync`);
    // A direct content's file is its bytes: it shrinks and grows with it (holes read as zeros).
    if (this.direct) {
      ftruncateSync(this.staging.fd(this.id), size);
      this.inline = undefined;
    }
    this.noteTruncate(size, mtime);
  }

  /** Applies a truncate (journal replay). */
  noteTruncate(size: number, mtime: number): void {
    if (size < this.size) {
      this.extents.clip(size);
      this.cutLower(size);
    } else this.cutLower(this.size);
    this.size = size;
    this.mtime = mtime;
  }

  private cutLower(n: number): void {
    if (n < this.lowerLimit) this.lowerLimit = n;
  }

  /**
   * Bytes [offset, offset+length), shorter at end of file: in a new buffer, or at the start of
   * `into` (whose old contents do not matter) when it is long enough.
   */
  async read(offset: number, length: number, readChunks: ChunkRangeReader, into?: Uint8Array): Promise<Uint8Array> {
    const end = Math.min(this.size, offset + length);
    if (end <= offset) return new Uint8Array(0);
    const out = into && into.length >= end - offset ? into.subarray(0, end - offset).fill(0) : Buffer.alloc(end - offset);
    const pieces = this.extents.pieces(offset, end);
    if (pieces.length > 0 && this.inline) {
      for (const [a, b] of pieces) out.set(this.inline.subarray(a, b), a - offset);
    } else if (pieces.length > 0) {
      const fd = this.staging.fd(this.id);
      for (const [a, b] of pieces) readAll(fd, out, a - offset, b - a, a);
    }
    const lowerEnd = Math.min(end, this.lowerLimit, this.lowerSize);
    if (this.lower && offset < lowerEnd) {
      let cur = offset;
      const gaps: [number, number][] = [];
      for (const [a, b] of this.extents.pieces(offset, lowerEnd)) {
        if (a > cur) gaps.push([cur, a]);
        cur = b;
      }
      if (cur < lowerEnd) gaps.push([cur, lowerEnd]);
      await Promise.all(
        gaps.map(async ([a, b]) => {
          const lower = this.lower!;
          const bytes = lower.kind === "chunks" ? await readChunks(lower.chunks, lower.size, a, b - a) : await lower.content.read(a, b - a, readChunks);
          out.set(bytes.subarray(0, b - a), a - offset);
        }),
      );
    }
    return out;
  }

  /** The chunks below this content, when they are known (a stored file, or an uploaded lower). */
  lowerChunks(): { chunks: ChunkRef[]; size: number } | undefined {
    if (!this.lower) return undefined;
    if (this.lower.kind === "chunks") return this.lower;
    return this.lower.content.uploaded;
  }

  /**
   * Chunks and uploads the content through a sync's writer; the same result when called again.
   * Over known lower chunks, only the chunks around the changed ranges are re-chunked: the
   * lower's chunks before the first changed byte are kept, and so are those after the point
   * where a new cut falls on a lower cut again (content-defined cuts depend only on the bytes
   * since the previous cut, and writes never shift bytes).
   */
  upload(writer: PendingWriter, readChunks: ChunkRangeReader, params: ChunkParams = DEFAULT_CHUNK_PARAMS): Promise<{ chunks: ChunkRef[]; size: number }> {
    if (this.uploaded) return Promise.resolve(this.uploaded);
    this.uploading ??= this.doUpload(writer, readChunks, params).catch((err: unknown) => {
      this.uploading = undefined;
      throw err;
    });
    return this.uploading;
  }

  /** Forgets an upload (its chunks may not have reached the store): the next sync uploads again. */
  resetUpload(): void {
    this.uploaded = undefined;
    this.uploading = undefined;
  }

  /** Bytes that differ from the lower layer (own writes, and what a shrink cut off). */
  get dirtyBytes(): number {
    const valid = Math.min(this.lowerLimit, this.lowerSize);
    return this.extents.bytes + Math.max(0, this.size - valid);
  }

  private async doUpload(writer: PendingWriter, readChunks: ChunkRangeReader, params: ChunkParams): Promise<{ chunks: ChunkRef[]; size: number }> {
    const base = this.lowerChunks();
    const size = this.size;
    let res: { chunks: ChunkRef[]; size: number };
    if (!base || base.chunks.length === 0 || Math.min(this.lowerLimit, base.size) === 0 || this.dirtyBytes > size / 2) {
      const spare: Uint8Array[] = [];
      // A small content in one piece: a stream per file costs more than the bytes of a small one,
      // and a sync of a source tree uploads tens of thousands.
      res =
        size < SMALL_UPLOAD_BYTES
          ? await writer.writeBuffer(await this.read(0, size, readChunks))
          : await writer.writeStream(this.stream(readChunks, UPLOAD_BLOCK_BYTES, spare), { transfer: true, recycle: (b) => spare.push(b) });
      this.uploadStats = { rechunked: size, reused: 0 };
    } else {
      res = await this.rechunk(writer, base, readChunks, params);
    }
    this.uploaded = { chunks: res.chunks, size: res.size };
    return this.uploaded;
  }

  private async rechunk(writer: PendingWriter, base: { chunks: ChunkRef[]; size: number }, readChunks: ChunkRangeReader, params: ChunkParams): Promise<{ chunks: ChunkRef[]; size: number }> {
    const size = this.size;
    const valid = Math.min(this.lowerLimit, base.size);
    const starts: number[] = [];
    const startIndex = new Map<number, number>();
    let acc = 0;
    for (let i = 0; i < base.chunks.length; i++) {
      starts.push(acc);
      startIndex.set(acc, i);
      acc += base.chunks[i]!.length;
    }
    const out: ChunkRef[] = [];
    const stats: ContentUploadStats = { rechunked: 0, reused: 0 };
    let pos = 0;
    let i = 0;
    const window = 1 << 20;
    while (pos < size) {
      while (i >= 0 && i < base.chunks.length) {
        const c = base.chunks[i]!;
        const end = starts[i]! + c.length;
        if (end > valid || end > size || (end === base.size && size !== base.size) || this.extents.overlaps(starts[i]!, end)) break;
        out.push(c);
        stats.reused += c.length;
        pos = end;
        i++;
      }
      if (pos >= size) break;
      const chunker = new Chunker(params);
      let cur = pos;
      let resynced = false;
      while (!resynced && cur < size) {
        const n = Math.min(window, size - cur);
        const buf = await this.read(cur, n, readChunks);
        cur += n;
        stats.rechunked += n;
        const pieces = chunker.push(buf);
        if (cur >= size) {
          const last = chunker.finish();
          if (last) pieces.push(last);
        }
        for (const piece of pieces) {
          const r = await writer.writeBuffer(piece);
          out.push(...r.chunks);
          pos += piece.length;
          const j = startIndex.get(pos);
          if (j !== undefined && pos < size) {
            i = j;
            resynced = true;
            break;
          }
        }
      }
      if (!resynced) break;
    }
    this.uploadStats = stats;
    return { chunks: out, size };
  }

  /**
   * The whole content as a stream of `blockBytes` buffers (default 1 MiB), each a buffer of its
   * own that the consumer may keep or transfer: taken from `spare` when one is there (the
   * consumer may put buffers it is done with back), else new.
   */
  stream(readChunks: ChunkRangeReader, blockBytes = 1 << 20, spare: Uint8Array[] = []): Readable {
    const self = this;
    const size = this.size;
    return Readable.from(
      (async function* () {
        for (let off = 0; off < size; off += blockBytes) yield await self.read(off, Math.min(blockBytes, size - off), readChunks, spare.pop());
      })(),
    );
  }
}
