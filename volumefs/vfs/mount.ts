/**
 * A mounted volume: the POSIX surface (MountFs) over a base version plus the durable staging
 * layer (staging.ts), and sync without stalling the mount.
 *
 * State: `overlay` (the live staged tree over `base`), `contents` (the bytes of staged files,
 * by id), open handles. Every change is applied to the overlay, then appended to the staging
 * journal before it is answered; opening the mount replays the journal (so a killed mount loses
 * nothing it answered). Changes run one at a time (`exclusive`); reads do not wait for them.
 *
 * Sync: under `exclusive`, the overlay is cloned and every staged content in it is frozen, and
 * the journal moves to a new layer; then, without holding anything, the clone is uploaded and
 * committed by `Repository.sync`. Writes meanwhile go on: a write to a frozen content makes a new
 * content over it (copy-on-write of the content object, not of the bytes). After the commit, under
 * `exclusive` again: the new version becomes the base and the overlay is rebuilt over it by
 * replaying the journal layers written since the freeze (usually a handful of operations), which
 * is all a sync ever holds the mount for.
 *
 * Files are never copied to be changed: a staged content keeps only the written ranges and reads
 * the rest from the base chunks; sync re-chunks only around the written ranges.
 *
 * A new file's content is direct when the kernel takes backing files (`kernelWrites`): its bytes
 * are its whole data file, which the kernel writes itself for the opens that write it
 * (`backingFd`), so the file is asked for its size and mtime. The one copy ever made of a file's
 * bytes is for a sync that finds such a file still open for writing (see freezeNode).
 */
import { randomBytes } from "node:crypto";
import { closeSync, constants, fstatSync, openSync, readSync } from "node:fs";
import { hostname } from "node:os";
import { DEFAULT_CHUNK_PARAMS, FileCopyCache, type ChunkParams, type ChunkStore, type CopyFill, type CopyReader } from "../chunk/index.js";
import { VolumeError } from "../errors.js";
import { hold, pin, type BufferHold } from "../object/index.js";
import { isCode, type VersionRecord } from "../../metadata/index.js";
import { chunksTag, ControlDir, entryAttr, hasXattrs, type ControlHandle, type VersionFileHandle } from "./control.js";
import { opensToChange, type FileAttr, type MountFs, type MountStatus, type MountSyncOptions, type MountSyncResult } from "./mount-types.js";
import { isPending, Overlay, type OverlayNode, type PendingContent, type PendingFileEntry, type StagedEntry } from "./overlay.js";
import { NAME_MAX, RESERVED_NAME, splitPath } from "./paths.js";
import type { Repository } from "./repo.js";
import { StagedContent, StagingDir, type JournalOp, type Lower } from "./staging.js";
import { EMPTY_TREE, type ChunkRef, type DirEntry, type FileEntry } from "./tree.js";

/** Options of MountedVolume.open. */
export interface MountedVolumeOptions {
  /** The repository the volume lives in. */
  repo: Repository;
  /** The volume's name. */
  volume: string;
  /** A version to mount (read-only); default the head, writable. */
  at?: string;
  /** Refuse every write with READ_ONLY. Default false. */
  readOnly?: boolean;
  /** Where staging directories live (`<stagingRoot>/<env>/<volume>/`), e.g. $STRATA_HOME/staging. */
  stagingRoot: string;
  /** Provenance labels added to every version this mount syncs (e.g. a run id). */
  labels?: Record<string, string>;
  /** The mount point, for the `mount` provenance label (host:pid:mountpoint). */
  mountpoint?: string;
  /** Bytes of recently read chunks kept in memory. Default 64 MiB. */
  cacheBytes?: number;
  /**
   * Most bytes a sequential reader prefetches ahead; default 16 MiB, and at most a quarter of
   * the in-memory chunk cache (prefetched chunks must not evict each other before they are read).
   */
  readaheadBytes?: number;
  /** Chunking parameters used to re-chunk around edits; default the store's. */
  chunkParams?: ChunkParams;
  /**
   * Whole-file copies for the kernel to read itself (`backingFd`): a stored file read from its
   * start is copied as it is read, and later read-only opens of it read the copy.
   */
  copies?: FileCopyCache;
}

/** How far into a file the first read of a handle may start for its reads to make a whole copy. */
const COPY_START_WITHIN = 8 * 2 ** 20;
/** Whole copies kept open for reads the kernel does not make from them itself. */
const COPY_READERS = 8;
/** Runs of a sync that found the head moved and changes made while it ran (see runSync). */
const SYNC_ATTEMPTS = 3;

type UploadPending = Extract<PendingContent, { kind: "upload" }> & { content: StagedContent };

/** Per-handle sequential-read state of ChunkReader.readv. */
export interface ReadAhead {
  /** Where the previous read ended. */
  next: number;
  /** Sequential reads in a row. */
  seq: number;
  /** The file offset up to which prefetches were issued. */
  ahead?: number;
}

interface FileHandle extends ReadAhead {
  kind: "file";
  /** The path the handle follows (renames move it); null once unlinked. */
  segs: string[] | null;
  /** What an unlinked handle still reads and writes. */
  orphan?: StagedEntry;
  flags: number;
  /** The whole-file copy this handle's reads are writing; null: none. */
  fill?: CopyFill | null;
  /** The chunks of the stored file that `fill` is a copy of. */
  copied?: readonly ChunkRef[];
  /** The direct content whose data file the kernel writes for this open (`backingFd`). */
  backedWrites?: StagedContent;
}

type Handle = FileHandle | ControlHandle | VersionFileHandle | { kind: "dir" };

/** Thrown for a name over NAME_MAX bytes (the adapter answers ENAMETOOLONG). */
function nameTooLong(path: string): VolumeError {
  return new VolumeError("INVALID_PATH", `check path ${JSON.stringify(path)}: a name is longer than ${NAME_MAX} bytes`, { path, details: "name-too-long" });
}

/** Path segments of an absolute mount path. */
function segsOf(path: string): string[] {
  for (const seg of path.split("/")) if (seg.length > NAME_MAX / 4 && Buffer.byteLength(seg) > NAME_MAX) throw nameTooLong(path);
  return splitPath(path);
}

function contentOf(e: StagedEntry | null | undefined): StagedContent | undefined {
  return isPending(e) && e.pending.kind === "upload" ? (e.pending as UploadPending).content : undefined;
}

/**
 * Direct contents a replay put under a name by a `cow` line with `x`, per overlay replayed into
 * (see freezeNode, which writes one such line per name of a content).
 */
const cowNamed = new WeakMap<Overlay, Set<string>>();

/** A name of `e` goes (an unlink, or a rename over it): one name fewer for its content. */
function unname(e: StagedEntry | undefined): void {
  const c = contentOf(e);
  if (c && c.names > 1) c.names--;
}

const O_ACCMODE = 3;
const XATTR_CREATE = 1;
const XATTR_REPLACE = 2;

/**
 * The pieces of a read joined into one buffer the caller keeps for good: the piece itself when
 * there is one (its buffer, if leased, then pinned: see buffer-lease.ts), else a new buffer.
 */
function joined(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) {
    pin(parts[0]!);
    return parts[0]!;
  }
  return parts.length === 0 ? new Uint8Array(0) : Buffer.concat(parts);
}

/** A name a sync's freeze said again over the version it made (see freezeNode). */
interface Restated {
  segs: string[];
  /** The id of the content the name shows, which a program writes through a backing file. */
  live: string;
  /** The id of the copy of it the sync stored, and (in the sync itself) the chunks it stored. */
  copy?: string;
  stored?: readonly ChunkRef[];
}

/** Bytes compared at a time when a mount checks a copy's data file against a stored file. */
const COMPARE_BLOCK = 4 * 2 ** 20;

/** Whether two chunk lists name the same bytes. */
function sameChunks(a: readonly ChunkRef[], b: readonly ChunkRef[]): boolean {
  return a.length === b.length && a.every((c, i) => c.id === b[i]!.id);
}

interface CachedChunk {
  p: Promise<Uint8Array>;
  length: number;
  hold?: BufferHold;
}

/**
 * A cache of recently read chunks with per-handle sequential readahead, over the chunk store
 * (host chunk cache, then ranged GETs of packs).
 */
export class ChunkReader {
  /** By chunk id, oldest first; `hold` keeps a leased buffer's bytes as they are (buffer-lease.ts). */
  private readonly cache = new Map<string, CachedChunk>();
  private bytes = 0;
  private readonly offsets = new WeakMap<readonly ChunkRef[], number[]>();

  constructor(
    private readonly store: ChunkStore,
    private readonly maxBytes = 64 << 20,
    maxAheadBytes = 16 << 20,
  ) {
    this.maxAhead = Math.min(maxAheadBytes, maxBytes / 4);
  }

  private readonly maxAhead: number;

  private starts(chunks: readonly ChunkRef[]): number[] {
    let s = this.offsets.get(chunks);
    if (!s) {
      s = new Array<number>(chunks.length + 1);
      let acc = 0;
      for (let i = 0; i < chunks.length; i++) {
        s[i] = acc;
        acc += chunks[i]!.length;
      }
      s[chunks.length] = acc;
      this.offsets.set(chunks, s);
    }
    return s;
  }

  private fetch(chunks: readonly ChunkRef[], from: number, to: number, keep: boolean): void {
    let i = from;
    while (i < to) {
      while (i < to && this.cache.has(chunks[i]!.id)) i++;
      if (i >= to) break;
      let j = i;
      let total = 0;
      // One request of the store per run: as much as one ranged GET takes.
      while (j < to && !this.cache.has(chunks[j]!.id) && total < this.store.maxReadBytes) total += chunks[j++]!.length;
      this.load(chunks.slice(i, j), keep);
      i = j;
    }
  }

  /** Reads `run` from the store into the cache, in one request; its promise of the chunks. */
  private load(run: readonly ChunkRef[], keep: boolean): Promise<Map<string, Uint8Array>> {
    const holds = new Map<string, BufferHold>();
    const all = this.store.readChunks(run, { keep, holds });
    const mine = new Map<string, CachedChunk>();
    for (const c of run) {
      if (this.cache.has(c.id)) continue;
      const p = all.then((m) => m.get(c.id)!);
      p.catch(() => this.drop(c.id, p));
      mine.set(c.id, this.put(c.id, p, c.length));
    }
    // The holds go to the entries still cached; an entry evicted meanwhile has no use for its own.
    all.then(
      () => {
        for (const [id, h] of holds) {
          const e = mine.get(id);
          if (e && this.cache.get(id) === e) e.hold = h;
          else h.release();
        }
      },
      () => undefined,
    );
    return all;
  }

  private put(id: string, p: Promise<Uint8Array>, length: number): CachedChunk {
    const e: CachedChunk = { p, length };
    this.cache.set(id, e);
    this.bytes += length;
    while (this.bytes > this.maxBytes && this.cache.size > 1) {
      const [oldest, old] = this.cache.entries().next().value as [string, CachedChunk];
      this.cache.delete(oldest);
      this.bytes -= old.length;
      old.hold?.release();
    }
    return e;
  }

  /**
   * Bytes [offset, offset+length) of a stored file (shorter at its end), as views of its chunks
   * in order, good until the current task ends (a caller that keeps them longer takes a hold on
   * them, see buffer-lease.ts). With `ra`, a read that
   * starts where the previous one ended counts as sequential and prefetches the next chunks in
   * the background, up to `maxAhead` bytes. Chunks fetched from packs go to the host's chunk
   * cache unless `keep` is false (the caller writes them to a whole-file copy).
   */
  async readv(chunks: readonly ChunkRef[], size: number, offset: number, length: number, ra?: ReadAhead, keep = true): Promise<Uint8Array[]> {
    const end = Math.min(size, offset + length);
    if (end <= offset) return [];
    const s = this.starts(chunks);
    let lo = 0;
    let hi = chunks.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (s[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    let last = lo;
    while (last + 1 < chunks.length && s[last + 1]! < end) last++;
    this.fetch(chunks, lo, last + 1, keep);
    if (ra) {
      ra.seq = offset === ra.next ? ra.seq + 1 : 0;
      ra.next = end;
      if (ra.seq === 0) ra.ahead = undefined;
      else {
        // The window doubles with each sequential read, from 256 KiB up to maxAhead. It is
        // topped up only once less than half of it is left, so that each prefetch is a few
        // large ranged GETs rather than one small GET per read.
        const window = Math.min(this.maxAhead, 2 ** Math.min(ra.seq + 17, 40));
        const issued = Math.max(s[last + 1]!, ra.ahead ?? 0);
        if (issued - end < window / 2 && issued < size) {
          let from = last + 1;
          while (from < chunks.length && s[from]! < issued) from++;
          let to = from;
          while (to < chunks.length && s[to]! < end + window) to++;
          this.fetch(chunks, from, to, keep);
          ra.ahead = s[to]!;
        }
      }
    }
    // Each chunk is held from the task it is here in until this read answers: the cache may
    // evict it meanwhile (for this read's own readahead, or another's), while later chunks come.
    const held: BufferHold[] = [];
    const keepIt = (data: Uint8Array): Uint8Array => {
      const h = hold(data);
      if (h) held.push(h);
      return data;
    };
    try {
      const parts = await Promise.all(Array.from({ length: last - lo + 1 }, (_, k) => this.get(chunks[lo + k]!).then(keepIt)));
      return parts.map((p, k) => {
        const cs = s[lo + k]!;
        return p.subarray(Math.max(offset, cs) - cs, Math.min(end, cs + chunks[lo + k]!.length) - cs);
      });
    } finally {
      // The caller has the views until this task ends: a buffer goes back in a later one.
      for (const h of held) h.release();
    }
  }

  /** Like `readv`, in one buffer, which is the caller's for good. */
  async read(chunks: readonly ChunkRef[], size: number, offset: number, length: number, ra?: ReadAhead): Promise<Uint8Array> {
    return joined(await this.readv(chunks, size, offset, length, ra));
  }

  private get(c: ChunkRef): Promise<Uint8Array> {
    const hit = this.cache.get(c.id);
    if (hit) {
      this.cache.delete(c.id);
      this.cache.set(c.id, hit);
      return hit.p;
    }
    return this.load([c], true).then((m) => m.get(c.id)!);
  }

  private drop(id: string, p: Promise<Uint8Array>): void {
    const cur = this.cache.get(id);
    if (cur && cur.p === p) {
      this.cache.delete(id);
      this.bytes -= cur.length;
      cur.hold?.release();
    }
  }
}

/** The tag (FileAttr.tag) of a staged file's bytes. */
function stagedTag(c: StagedContent): string {
  return `staged:${c.id}`;
}

/**
 * What names a file entry's bytes: a stored file's chunk list, or a staged content (the chunks
 * its sync made of it, once it has them).
 */
function bytesOf(e: StagedEntry | undefined): readonly ChunkRef[] | StagedContent | undefined {
  if (e?.kind !== "file") return undefined;
  const c = contentOf(e);
  return c ? (c.uploaded?.chunks ?? c) : (e as FileEntry).chunks;
}

/** Whether two entries are files with the same bytes, known without reading them. */
function entriesShareBytes(a: StagedEntry | undefined, b: StagedEntry | undefined): boolean {
  const x = bytesOf(a);
  const y = bytesOf(b);
  if (x === undefined || y === undefined) return false;
  if (x === y) return true;
  return Array.isArray(x) && Array.isArray(y) && sameChunks(x, y);
}

/**
 * A volume mounted at its head (writable, with a durable staging layer) or at any version
 * (read-only). Implements MountFs for the FUSE adapter; usable directly in tests and tools.
 */
export class MountedVolume implements MountFs {
  readonly repo: Repository;
  readonly volume: string;
  readonly readOnly: boolean;
  /** The control directory (/.strata). */
  readonly control: ControlDir;
  private base: VersionRecord | null;
  private overlay: Overlay;
  private readonly staging: StagingDir | undefined;
  private readonly contents = new Map<string, StagedContent>();
  private readonly handles = new Map<number, Handle>();
  private readonly changeListeners: (() => Promise<void>)[] = [];
  private nextHandle = 1;
  private lock: Promise<unknown> = Promise.resolve();
  private syncing: Promise<MountSyncResult> | undefined;
  private readonly reader: ChunkReader;
  private copies: FileCopyCache | undefined;
  /** Copy keys of stored files' chunk lists. */
  private readonly copyKeys = new WeakMap<readonly ChunkRef[], string>();
  /** Open readers of whole copies (of stored files, and of staged files' unchanged bytes), by key, least recent first. */
  private readonly copyReaders = new Map<string, CopyReader>();
  private readonly labels: Record<string, string>;
  /** True when mounted `at` a fixed version: read-only, and reload refuses. */
  readonly pinned: boolean;
  private readonly params: ChunkParams;
  private closed = false;
  /** Set when a journal append failed: see `journal`. */
  private journalBroken: VolumeError | undefined;
  /** Set once a file grew large enough to be chunked in workers: their start-up then overlaps the writes, not the sync. */
  private workersWarm = false;
  /** The chunks of the staged files the last sync stored, by their staged tag (see sameBytes). */
  private stored = new Map<string, readonly ChunkRef[]>();
  /** New files get direct contents, which the kernel may write itself (see `kernelWrites`). */
  private direct = false;

  private constructor(opts: MountedVolumeOptions, base: VersionRecord | null, staging: StagingDir | undefined, mountName: string) {
    this.repo = opts.repo;
    this.volume = opts.volume;
    this.readOnly = !!opts.readOnly || opts.at !== undefined;
    this.pinned = opts.at !== undefined;
    this.base = base;
    this.overlay = opts.repo.stage(base);
    this.staging = staging;
    this.reader = new ChunkReader(opts.repo.chunks, opts.cacheBytes, opts.readaheadBytes);
    this.copies = opts.copies;
    this.labels = { mount: mountName, ...(opts.labels ?? {}) };
    this.params = opts.chunkParams ?? (opts.repo.chunks as unknown as { params?: ChunkParams }).params ?? DEFAULT_CHUNK_PARAMS;
    this.control = new ControlDir(this);
  }

  /**
   * Mounts a volume. Writable mounts take the volume's staging directory on this host (throws
   * ALREADY_EXISTS while another live process, or this one, has it mounted) and replay what it
   * holds. Throws UNKNOWN_VOLUME, UNKNOWN_VERSION.
   */
  static async open(opts: MountedVolumeOptions): Promise<MountedVolume> {
    const repo = opts.repo;
    const mountName = `${hostname()}:${process.pid}:${opts.mountpoint ?? "-"}`;
    if (opts.readOnly || opts.at !== undefined) {
      const v = await repo.resolve(opts.volume, opts.at);
      return new MountedVolume(opts, v, undefined, mountName);
    }
    const vol = await repo.volume(opts.volume);
    const staging = StagingDir.open(opts.stagingRoot, repo.env, opts.volume, mountName, vol.head, vol.createdAt);
    try {
      const m = new MountedVolume(opts, null, staging, mountName);
      await m.recover(vol.head);
      return m;
    } catch (err) {
      staging.close();
      throw err;
    }
  }

  // ---- recovery and replay ----

  private async recover(head: string | null): Promise<void> {
    const staging = this.staging!;
    let layers = staging.readLayers();
    let m = staging.manifest;
    if (!layers.some((l) => l.ops.length > 0) && !m.syncing) {
      staging.dropLayers(staging.layer - 1);
      staging.recycleDataLater(staging.listData().map((id) => ({ id })));
      staging.writeManifest({ v: 1, base: head, first: staging.layer }, true);
      this.setBase(head ? await this.repo.version(head) : null);
      return;
    }
    let base = m.base ? await this.repo.version(m.base) : null;
    /** A sync that committed but was not taken in: the names its freeze said again. */
    let restated: Restated[] | undefined;
    if (m.syncing) {
      const committed = await this.findSynced(m.syncing.token, m.base);
      if (committed) {
        restated = [];
        const scratch = this.repo.stage(base);
        for (const l of layers) if (l.layer <= m.syncing.upTo) for (const op of l.ops) await this.replayOp(scratch, op, "recover");
        layers = layers.filter((l) => l.layer > m.syncing!.upTo);
        // The freeze's own lines open the first layer after it.
        for (const op of layers[0]?.ops ?? []) {
          if (op.o !== "cow" || !op.x) break;
          restated.push({ segs: op.p.split("/"), live: op.c, copy: op.s });
        }
        base = committed;
        m = { v: 1, base: committed.id, first: m.syncing.upTo + 1 };
      } else m = { v: 1, base: m.base, first: m.first };
    }
    this.setBase(base);
    for (const l of layers) for (const op of l.ops) await this.replayOp(this.overlay, op, "recover");
    if (restated) await this.unstateTheirs(this.overlay, restated, base);
    if (m !== staging.manifest) {
      // Only once the sync is taken in whole: a mount that fails before (the store down while
      // unstateTheirs reads it) leaves the next one the same decision to make.
      staging.writeManifest(m, true);
      // Only once the manifest no longer needs them (as runSync does).
      staging.dropLayers(m.first - 1);
    }
    const live = this.reachable();
    staging.recycleDataLater(staging.listData().filter((id) => !live.has(id)).map((id) => ({ id })));
    for (const id of [...this.contents.keys()]) if (!live.has(id)) this.contents.delete(id);
    // The kernel may have written direct contents after their last journal line.
    for (const c of this.contents.values()) c.refresh();
  }

  /**
   * The version a sync labelled `token` committed, if it did: searched from the head back to the
   * sync's base (every version since, whoever committed it; not a fixed number of them).
   */
  private async findSynced(token: string, base: string | null): Promise<VersionRecord | null> {
    const vol = await this.repo.volume(this.volume);
    for await (const v of this.repo.history(vol.head, base)) if (v.labels.syncId === token) return v;
    return null;
  }

  private setBase(v: VersionRecord | null): void {
    this.base = v;
    this.overlay = this.repo.stage(v);
  }

  /** Applies one journal operation; in "rebase" mode contents already hold their bytes. */
  private async replayOp(ov: Overlay, op: JournalOp, mode: "recover" | "rebase"): Promise<void> {
    try {
      await this.apply(ov, op, mode);
    } catch (err) {
      if (!(err instanceof VolumeError)) throw err;
    }
  }

  private pendingEntry(name: string, content: StagedContent, like?: StagedEntry): PendingFileEntry {
    const read = this.readChunks;
    const params = this.params;
    const pending: UploadPending = {
      kind: "upload",
      get size() {
        return content.size;
      },
      upload: (writer) => content.upload(writer, read, params),
      content,
    };
    const e: PendingFileEntry = { kind: "file", name, mode: like?.mode ?? 0o644, mtime: content.mtime, size: content.size, pending };
    if (like?.uid) e.uid = like.uid;
    if (like?.gid) e.gid = like.gid;
    if (like?.xattrs) e.xattrs = like.xattrs;
    return e;
  }

  /**
   * Bytes of a stored chunk list (the unchanged part of a staged file, read for the file's reads
   * and its upload): from the list's whole copy when there is one, since a file read whole is
   * kept in its copy and not in the chunk cache; else from the chunks.
   */
  private readonly readChunks = async (chunks: readonly ChunkRef[], size: number, offset: number, length: number, ra?: ReadAhead): Promise<Uint8Array> =>
    (await this.readCopy(chunks, size, offset, length)) ?? this.reader.read(chunks, size, offset, length, ra);

  /**
   * Bytes [offset, offset+length) of a stored chunk list (shorter at its end) from the list's
   * whole copy; undefined when there is none, or it is shorter than the list or unreadable (the
   * caller reads the chunks).
   */
  private async readCopy(chunks: readonly ChunkRef[], size: number, offset: number, length: number): Promise<Uint8Array | undefined> {
    if (!this.copies?.copies(size)) return undefined;
    const key = this.copyKey(chunks);
    const copy = this.copyReader(key);
    if (!copy) return undefined;
    const bytes = await copy.read(offset, Math.max(0, Math.min(length, size - offset)));
    if (bytes) return bytes;
    if (this.copyReaders.get(key) === copy) this.copyReaders.delete(key);
    copy.close();
    return undefined;
  }

  /** A reader of the complete copy of `key`, kept open across reads (the few most recent). */
  private copyReader(key: string): CopyReader | undefined {
    let r = this.copyReaders.get(key);
    if (r) this.copyReaders.delete(key);
    else if (this.copies?.has(key)) r = this.copies.reader(key);
    if (!r) return undefined;
    this.copyReaders.set(key, r);
    if (this.copyReaders.size > COPY_READERS) {
      const [oldest, old] = this.copyReaders.entries().next().value as [string, CopyReader];
      this.copyReaders.delete(oldest);
      old.close();
    }
    return r;
  }

  private newContent(lower: Lower, size: number, mtime: number, id = randomBytes(8).toString("hex")): StagedContent {
    const c = new StagedContent(this.staging!, id, lower, size, mtime);
    this.contents.set(id, c);
    return c;
  }

  /** A new content whose lower layer is what `e` shows now. */
  private cowOf(e: StagedEntry, id?: string): StagedContent {
    const old = contentOf(e);
    if (old) return this.newContent({ kind: "content", content: old }, old.size, old.mtime, id);
    if (e.kind !== "file" || isPending(e)) throw new VolumeError("INVALID_ARGUMENT", `write ${JSON.stringify(e.name)}: not a regular file`);
    const f = e as FileEntry;
    return this.newContent({ kind: "chunks", chunks: f.chunks, size: f.size }, f.size, f.mtime, id);
  }

  private async apply(ov: Overlay, op: JournalOp, mode: "live" | "recover" | "rebase"): Promise<void> {
    // Directories' mtimes take the line's time, live and in a replay alike (lines of older
    // mounts may have none: then now).
    ov.time = "t" in op ? op.t : undefined;
    try {
      await this.applyOp(ov, op, mode);
    } finally {
      ov.time = undefined;
    }
  }

  private async applyOp(ov: Overlay, op: JournalOp, mode: "live" | "recover" | "rebase"): Promise<void> {
    switch (op.o) {
      case "create": {
        const segs = op.p.split("/");
        let c = mode === "rebase" ? this.contents.get(op.c) : undefined;
        if (!c) {
          c = this.newContent(null, 0, op.t, op.c);
          if (op.x) c.makeDirect(mode !== "live");
        }
        const e = this.pendingEntry(segs.at(-1)!, c, { kind: "file", name: "", mode: op.m, mtime: op.t, size: 0, chunks: [], uid: op.u, gid: op.g });
        await ov.put(segs, e);
        return;
      }
      case "cow": {
        const segs = op.p.split("/");
        const cur = await ov.lookup(segs);
        if (!cur) throw VolumeError.NOT_FOUND(op.p);
        // A second such line for one content is another name of it (a hard link), moved to the
        // content with the first (see writable, and freezeNode for `x` lines); or the same name
        // said again, by the freeze of a later sync (when the earlier one failed).
        let named = cowNamed.get(ov);
        if (!named) cowNamed.set(ov, (named = new Set()));
        const again = named.has(op.c) ? this.contents.get(op.c) : undefined;
        if (again) {
          if (contentOf(cur) === again) return;
          again.names++;
          again.linked = true;
          await ov.put(segs, this.pendingEntry(segs.at(-1)!, again, cur));
          return;
        }
        named.add(op.c);
        let c = mode === "rebase" ? this.contents.get(op.c) : undefined;
        if (!c && op.x) {
          // A direct content that stayed open for writing through a sync (see freezeNode): the
          // name shows its data file again, over the version that sync made.
          c = this.newContent(null, 0, cur.mtime, op.c);
          c.makeDirect(true);
        }
        if (!c) {
          const from = op.f ? this.contents.get(op.f) : undefined;
          c = from ? this.newContent({ kind: "content", content: from }, from.size, from.mtime, op.c) : this.cowOf(cur, op.c);
        }
        await ov.put(segs, this.pendingEntry(segs.at(-1)!, c, cur));
        return;
      }
      case "w":
        if (mode === "recover") {
          if (op.d !== undefined) this.contents.get(op.c)?.noteInline(Buffer.from(op.d, "base64"), op.at, op.t);
          else this.contents.get(op.c)?.noteWrite(op.at, op.n, op.t);
        }
        return;
      case "m":
        if (mode === "recover") this.contents.get(op.c)?.noteMoved();
        return;
      case "tr":
        if (mode === "recover") this.contents.get(op.c)?.noteTruncate(op.s, op.t);
        return;
      case "mkdir": {
        const segs = op.p.split("/");
        const e: StagedEntry = { kind: "dir", name: segs.at(-1)!, mode: op.m & 0o7777, mtime: op.t, tree: EMPTY_TREE.id, files: 0, bytes: 0 };
        if (op.u) e.uid = op.u;
        if (op.g) e.gid = op.g;
        await ov.put(segs, e);
        return;
      }
      case "rm":
        unname(await ov.remove(op.p.split("/"), { recursive: true }));
        return;
      case "drop": {
        // The version's own entry shows again (see unstateTheirs).
        const segs = op.p.split("/");
        unname(await ov.lookup(segs).catch(() => undefined));
        ov.drop(segs);
        return;
      }
      case "mv":
        unname(await ov.rename(op.p.split("/"), op.d.split("/")));
        return;
      case "sym": {
        const segs = op.p.split("/");
        const e: StagedEntry = { kind: "symlink", name: segs.at(-1)!, mode: 0o777, mtime: op.t, target: op.target };
        if (op.u) e.uid = op.u;
        if (op.g) e.gid = op.g;
        await ov.put(segs, e);
        return;
      }
      case "link": {
        const e = await ov.lookup(op.p.split("/"));
        if (!e) throw VolumeError.NOT_FOUND(op.p);
        const d = op.d.split("/");
        const c = contentOf(e);
        if (c) {
          c.linked = true;
          c.names++;
        }
        await ov.put(d, { ...e, name: d.at(-1)! });
        return;
      }
      case "attr": {
        const segs = op.p.split("/");
        const c = contentOf(await ov.lookup(segs));
        // One file's attributes, whichever of its hard links names it.
        for (const name of this.linkedNames(ov, segs, c)) await ov.setAttr(name, { mode: op.mode, mtime: op.mtime, uid: op.uid, gid: op.gid });
        // In a replay a direct content's mtime is its file's (`refresh`), later writes included.
        if (op.mtime !== undefined && mode !== "rebase" && c && !c.frozen && !(c.direct && mode === "recover")) c.setMtime(op.mtime);
        return;
      }
      case "xattr": {
        const segs = op.p.split("/");
        const e = await ov.lookup(segs);
        if (!e) throw VolumeError.NOT_FOUND(op.p);
        const x = { ...(e.xattrs ?? {}) };
        if (op.v === null) delete x[op.k];
        else x[op.k] = Buffer.from(op.v, "base64");
        for (const name of this.linkedNames(ov, segs, contentOf(e))) await ov.setAttr(name, { xattrs: x });
        return;
      }
    }
  }

  /**
   * `segs` and every other path of `ov` whose staged entry shows content `c`: the names of one
   * file's hard links, which share its attributes as they share its bytes. A walk of the staged
   * names, only for a content linked under more than one name.
   */
  private linkedNames(ov: Overlay, segs: string[], c: StagedContent | undefined): string[][] {
    if (!c?.linked || c.names < 2) return [segs];
    const out: string[][] = [segs];
    const self = segs.join("/");
    const walk = (n: OverlayNode, at: string[]): void => {
      for (const [name, child] of n.children ?? []) {
        const p = [...at, name];
        if (child.replace && contentOf(child.replace) === c && p.join("/") !== self) out.push(p);
        walk(child, p);
      }
    };
    walk(ov.root, []);
    return out;
  }

  /**
   * Content ids reachable from the overlay and the open handles (with their lower layers). A
   * handle's backing file counts: the kernel writes that data file until the handle is
   * released, whatever became of the file's name.
   */
  private reachable(): Set<string> {
    const out = new Set<string>();
    const add = (c: StagedContent | undefined): void => {
      while (c && !out.has(c.id)) {
        out.add(c.id);
        c = c.lower?.kind === "content" ? c.lower.content : undefined;
      }
    };
    const walk = (n: OverlayNode): void => {
      add(contentOf(n.replace));
      for (const child of n.children?.values() ?? []) walk(child);
    };
    walk(this.overlay.root);
    for (const h of this.handles.values()) {
      if (h.kind !== "file") continue;
      add(contentOf(h.orphan));
      add(h.backedWrites);
    }
    return out;
  }

  // ---- helpers ----

  /** Runs changes one at a time. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => undefined);
    return run;
  }

  /** Takes the lock `exclusive` runs under, until the returned function is called. */
  private async acquire(): Promise<() => void> {
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    const turn = this.lock.then(() => undefined, () => undefined);
    this.lock = turn.then(() => held);
    await turn;
    return release;
  }

  private checkWritable(op: string, path: string): void {
    if (this.closed) throw new VolumeError("BAD_HANDLE", `${op} ${JSON.stringify(path)}: the mount is closed`);
    if (this.journalBroken) throw this.journalBroken;
    if (this.readOnly) {
      throw VolumeError.READ_ONLY(JSON.stringify(path), { op, volume: this.volume, hint: this.pinned ? "this mount shows an old version; mount the head to write" : "the volume is mounted read-only" });
    }
  }

  /** Segments of a path that may be changed (not the root, not /.strata). */
  private writableSegs(op: string, path: string): string[] {
    const segs = segsOf(path);
    this.checkWritable(op, path);
    if (segs.length === 0) throw new VolumeError("PERMISSION", `${op} "/": the root of the mount cannot be changed`, { path });
    if (segs[0] === RESERVED_NAME) {
      if (segs.length === 1 && op === "mkdir") throw VolumeError.ALREADY_EXISTS(JSON.stringify(path), { op });
      throw new VolumeError("PERMISSION", `${op} ${JSON.stringify(path)}: ${RESERVED_NAME} is the mount's control directory`, { path });
    }
    return segs;
  }

  private async mustLookup(segs: string[], op: string): Promise<StagedEntry> {
    const e = await this.overlay.lookup(segs);
    if (!e) throw VolumeError.NOT_FOUND(JSON.stringify("/" + segs.join("/")), { op, path: "/" + segs.join("/") });
    return e;
  }

  private async checkParent(segs: string[], op: string): Promise<void> {
    if (segs.length <= 1) return;
    const p = await this.mustLookup(segs.slice(0, -1), op);
    if (p.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY("/" + segs.slice(0, -1).join("/"), { op });
  }

  /**
   * Appends `op` to the journal. When that fails (a full disk), the change is already in memory
   * but not on disk: from then on the mount refuses changes and syncs (`checkWritable`), so that
   * nothing it answers is lost to a later crash; a remount starts again from the journal.
   */
  private journal(op: JournalOp): void {
    if (this.journalBroken) throw this.journalBroken;
    try {
      this.staging!.append(op);
    } catch (err) {
      this.journalBroken = VolumeError.IO("append to the staging journal", err, {
        volume: this.volume,
        hint: "free disk space, then unmount and mount again: the changes journaled before this one are kept",
      });
      throw this.journalBroken;
    }
  }

  private async change(op: JournalOp): Promise<void> {
    await this.apply(this.overlay, op, "live");
    this.journal(op);
  }

  private attrOf(segs: string[], e: StagedEntry): FileAttr {
    const c = contentOf(e);
    if (c) {
      if (c.backedWriters > 0) c.refresh();
      return { kind: "file", mode: e.mode & 0o7777, size: c.size, mtime: c.mtime, atime: c.mtime, ctime: c.mtime, nlink: c.names, uid: e.uid ?? 0, gid: e.gid ?? 0, immutable: false, tag: stagedTag(c), xattrs: hasXattrs(e), shared: c.linked };
    }
    return entryAttr(e as Exclude<StagedEntry, PendingFileEntry>, this.readOnly || !this.touched(segs));
  }

  /** True when the overlay has a node on the path (the entry may differ from the base). */
  private touched(segs: string[]): boolean {
    let n: OverlayNode | undefined = this.overlay.root;
    for (const s of segs) {
      n = n.children?.get(s);
      if (!n) return false;
      if (n.replace !== undefined) return true;
    }
    return true;
  }

  private handle(fh: number): Handle {
    const h = this.handles.get(fh);
    if (!h) throw new VolumeError("BAD_HANDLE", `use file handle ${fh}: not open`);
    return h;
  }

  private async entryOf(h: FileHandle): Promise<StagedEntry> {
    if (!h.segs) return h.orphan!;
    const e = await this.overlay.lookup(h.segs);
    if (!e) throw new VolumeError("BAD_HANDLE", `use file handle: ${JSON.stringify("/" + h.segs.join("/"))} is gone`);
    return e;
  }

  /** The content a write through `h` (or to `segs`) goes to, made (copy-on-write) if needed. Call inside exclusive. */
  private async writable(target: { h?: FileHandle; segs?: string[] }): Promise<StagedContent> {
    const segs = target.h ? target.h.segs : target.segs!;
    const e = segs ? await this.mustLookup(segs, "write") : target.h!.orphan!;
    if (e.kind === "dir") throw VolumeError.IS_A_DIRECTORY("/" + (segs ?? []).join("/"), { op: "write" });
    if (e.kind === "symlink") throw new VolumeError("INVALID_ARGUMENT", `write ${JSON.stringify("/" + (segs ?? []).join("/"))}: a symbolic link`);
    const cur = contentOf(e);
    if (cur && !cur.frozen) return cur;
    const id = randomBytes(8).toString("hex");
    const c = this.cowOf(e, id);
    if (segs) {
      // A frozen content's other names (hard links) move to the copy with this one: one file,
      // as it was before a sync froze it (which may have failed, or be running).
      const others = cur ? this.linkedNames(this.overlay, segs, cur).slice(1) : [];
      await this.overlay.put(segs, this.pendingEntry(segs.at(-1)!, c, e));
      this.journal({ o: "cow", p: segs.join("/"), c: id, ...(cur ? { f: cur.id } : {}) });
      for (const o of others) {
        await this.overlay.put(o, this.pendingEntry(o.at(-1)!, c, await this.overlay.lookup(o)));
        this.journal({ o: "cow", p: o.join("/"), c: id, f: cur!.id });
      }
      if (others.length > 0) {
        c.names = others.length + 1;
        c.linked = true;
      }
    } else target.h!.orphan = this.pendingEntry(e.name, c, e);
    return c;
  }

  /**
   * After a base move from `was` (a reload, or a sync that may have taken in other writers'
   * changes): a read-only handle whose file the move changed or removed keeps reading the bytes
   * it opened (as an open the kernel reads through a backing file does), where it would follow
   * its path into the new version's file, part way through a read of it. A staged file that the
   * sync stored as it was is not a change. Not when the file is also open for writing (the
   * kernel mount renodes it only when its opens all read).
   */
  private async keepOpenReads(was: Overlay): Promise<void> {
    // A file also open for writing is one file for all its handles: they follow its path.
    const written = new Set<string>();
    for (const h of this.handles.values()) if (h.kind === "file" && h.segs && (h.flags & O_ACCMODE) !== constants.O_RDONLY) written.add(h.segs.join("/"));
    for (const h of this.handles.values()) {
      if (h.kind !== "file" || !h.segs || (h.flags & O_ACCMODE) !== constants.O_RDONLY || written.has(h.segs.join("/"))) continue;
      const old = await was.lookup(h.segs).catch(() => undefined);
      if (old?.kind !== "file") continue;
      const now = await this.overlay.lookup(h.segs).catch(() => undefined);
      if (entriesShareBytes(old, now)) continue;
      h.segs = null;
      h.orphan = old;
    }
  }

  private orphanHandles(segs: string[], e: StagedEntry): void {
    const key = segs.join("/");
    for (const h of this.handles.values()) {
      if (h.kind === "file" && h.segs && h.segs.join("/") === key) {
        h.segs = null;
        h.orphan = e;
      }
    }
  }

  // ---- MountFs: reading ----

  /** Attributes of a path. Throws NOT_FOUND, NOT_A_DIRECTORY. */
  async getattr(path: string): Promise<FileAttr> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME) return this.control.getattr(segs.slice(1));
    if (segs.length === 0) {
      const r = (await this.overlay.lookup([])) as DirEntry; // with the time a name in it last changed
      return { ...entryAttr(r, false), mode: this.readOnly ? 0o555 : 0o755 };
    }
    return this.attrOf(segs, await this.mustLookup(segs, "stat"));
  }

  /** Attributes of a path, or undefined when nothing is there. */
  async lookup(path: string): Promise<FileAttr | undefined> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME || segs.length === 0) return this.getattr(path).catch((err) => (isCode(err, "NOT_FOUND") ? undefined : Promise.reject(err)));
    const e = await this.overlay.lookup(segs);
    return e ? this.attrOf(segs, e) : undefined;
  }

  /** Attributes of an open file, also after its name was removed. */
  async fgetattr(fh: number): Promise<FileAttr> {
    const h = this.handle(fh);
    if (h.kind !== "file") throw new VolumeError("BAD_HANDLE", `stat file handle ${fh}: not a regular file`);
    return this.attrOf(h.segs ?? [], await this.entryOf(h));
  }

  /** See MountFs.sameBytes. */
  sameBytes(before: string, after: string): boolean {
    const chunks = this.stored.get(before);
    return chunks !== undefined && chunksTag(chunks) === after;
  }

  /** See MountFs.onExternalChange: called after a reload and after a sync that took in other writers' versions. */
  onExternalChange(listener: () => Promise<void>): void {
    this.changeListeners.push(listener);
  }

  private async externalChange(): Promise<void> {
    for (const l of this.changeListeners) await l().catch(() => undefined);
  }

  /** Names in a directory, sorted; "/" does not list `.strata`. */
  async readdir(path: string): Promise<string[]> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME) return this.control.readdir(segs.slice(1));
    const entries = await this.overlay.readdir(segs);
    const names = entries.map((e) => e.name);
    return segs.length === 0 ? names.filter((n) => n !== RESERVED_NAME) : names;
  }

  /** The target of a symbolic link; INVALID_ARGUMENT (EINVAL) for anything else. */
  async readlink(path: string): Promise<string> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME) return this.control.readlink(segs.slice(1));
    const e = await this.mustLookup(segs, "read link");
    if (e.kind !== "symlink") throw new VolumeError("INVALID_ARGUMENT", `read link ${JSON.stringify(path)}: not a symbolic link`, { path });
    return e.target;
  }

  /** Opens a file (O_TRUNC truncates it, whatever the access mode). Directories open for reading only. */
  async open(path: string, flags: number): Promise<number> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME) return this.addHandle(await this.control.open(segs.slice(1), (flags & O_ACCMODE) !== constants.O_RDONLY));
    const e = await this.mustLookup(segs, "open");
    const changes = opensToChange(flags);
    if (e.kind === "dir") {
      if (changes) throw VolumeError.IS_A_DIRECTORY(path, { op: "open" });
      return this.addHandle({ kind: "dir" });
    }
    if (changes) this.checkWritable("open", path);
    if (flags & constants.O_TRUNC) await this.exclusive(() => this.truncateOpened(segs));
    return this.addHandle({ kind: "file", segs, flags, next: 0, seq: 0 });
  }

  /** O_TRUNC of an open or create that found the file: its size becomes 0 (a change only when it was not). */
  private async truncateOpened(segs: string[]): Promise<void> {
    const c = await this.writable({ segs });
    if (c.size === 0) return;
    const t = Date.now();
    c.truncate(0, t);
    this.journal({ o: "tr", c: c.id, s: 0, t });
  }

  private addHandle(h: Handle): number {
    const fh = this.nextHandle++;
    this.handles.set(fh, h);
    return fh;
  }

  /** Creates a regular file and opens it; EEXIST with O_EXCL, else opens what is there. */
  async create(path: string, mode: number, flags: number): Promise<number> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME && segs.length > 1) {
      const fh = await this.open(path, flags & ~(constants.O_CREAT | constants.O_EXCL));
      return fh;
    }
    this.writableSegs("create", path);
    return this.exclusive(async () => {
      await this.checkParent(segs, "create");
      const cur = await this.overlay.lookup(segs);
      if (cur) {
        if (flags & constants.O_EXCL) throw VolumeError.ALREADY_EXISTS(JSON.stringify(path), { op: "create", path });
        if (cur.kind === "dir") throw VolumeError.IS_A_DIRECTORY(path, { op: "create" });
      } else {
        const t = Date.now();
        // A direct content's data file is made now: a spare one when there is one.
        const id = (this.direct && this.staging?.takeSpare(t)) || randomBytes(8).toString("hex");
        await this.change({ o: "create", p: segs.join("/"), c: id, m: mode & 0o7777, t, ...(this.direct ? { x: 1 as const } : {}) });
        return this.addHandle({ kind: "file", segs, flags, next: 0, seq: 0 });
      }
      if (flags & constants.O_TRUNC) await this.truncateOpened(segs);
      return this.addHandle({ kind: "file", segs, flags, next: 0, seq: 0 });
    });
  }

  /** Up to `length` bytes at `position` of an open file; the caller's for good. */
  async read(fh: number, length: number, position: number): Promise<Uint8Array> {
    return joined(await this.readv(fh, length, position));
  }

  /**
   * The bytes `read` gives, as consecutive pieces (views of the chunks read, not a copy), good
   * until the current task ends: the caller writes them out at once.
   */
  async readv(fh: number, length: number, position: number): Promise<Uint8Array[]> {
    const h = this.handle(fh);
    if (h.kind === "control" || h.kind === "version") return [await this.control.read(h, length, position)];
    if (h.kind === "dir") throw VolumeError.IS_A_DIRECTORY("a directory", { op: "read" });
    const e = await this.entryOf(h);
    const c = contentOf(e);
    if (c && c.backedWriters > 0) c.refresh();
    // A handle's sequential reads of a staged file read its unchanged chunks ahead too.
    if (c) return [await c.read(position, length, (chunks, size, off, len) => this.readChunks(chunks, size, off, len, h))];
    if (e.kind !== "file") throw VolumeError.IS_A_DIRECTORY(e.name, { op: "read" });
    const f = e as FileEntry;
    // A reload (or another mount's write) changed the file under the handle: its fill is of
    // other bytes.
    if (h.copied !== undefined && h.copied !== f.chunks) this.dropFill(h);
    // A handle the kernel does not read through a backing file (a write open of an unchanged
    // file, or an open while the node is served) reads the whole copy once there is one; not
    // while its own reads are writing it, but once they handed it every byte (a second pass of
    // the open, after the kernel let go of its pages), it does: the fill's descriptors may be
    // closed by then, and the chunks were kept in the copy alone.
    if (!h.fill || h.fill.whole) {
      const copied = await this.readCopy(f.chunks, f.size, position, length);
      if (copied) return [copied];
    }
    const fill = this.fill(h, f, position);
    // The copy keeps what it is filled with: the host's chunk cache need not write it too.
    const pieces = await this.reader.readv(f.chunks, f.size, position, length, h, !fill);
    if (fill && h.fill === fill && !fill.whole && !fill.write(position, pieces)) h.fill = null;
    return pieces;
  }

  private copyKey(chunks: readonly ChunkRef[]): string {
    let k = this.copyKeys.get(chunks);
    if (!k) {
      k = FileCopyCache.key(chunks.map((c) => c.id));
      this.copyKeys.set(chunks, k);
    }
    return k;
  }

  /**
   * The whole copy of `f` that `h`'s reads fill, if any: one is started for a handle whose first
   * read is near the start (a reader of the whole file: the kernel's parallel readahead may
   * answer the first block after the next ones), so that the file's next opens read the copy
   * (`backingFd`). A copy left incomplete when the handle is released is dropped.
   */
  private fill(h: FileHandle, f: FileEntry, position: number): CopyFill | null {
    if (!this.copies) return null;
    if (h.fill === undefined) {
      h.fill = position < COPY_START_WITHIN && this.copies.copies(f.size) ? (this.copies.startFill(this.copyKey(f.chunks), f.size) ?? null) : null;
      h.copied = f.chunks;
    }
    return h.fill;
  }

  /** Ends `h`'s fill (an incomplete copy is dropped). */
  private dropFill(h: FileHandle): void {
    h.fill?.abandon();
    h.fill = h.copied = undefined;
  }

  /** See MountFs.backingRefused: copies are made for backing files only, and new files' contents need not be direct. */
  backingRefused(fh: number): void {
    this.copies = undefined;
    this.direct = false;
    const h = this.handles.get(fh);
    if (h?.kind === "file" && h.backedWrites) {
      h.backedWrites.kernelReleased();
      h.backedWrites = undefined;
    }
  }

  /**
   * See MountFs.kernelWrites: from now on a new file's content is direct (its whole data file),
   * so that the kernel can write it through a backing file (`backingFd`) with no WRITE requests.
   */
  kernelWrites(): void {
    if (this.staging && !this.readOnly) this.direct = true;
  }

  /**
   * A descriptor of a local file holding exactly the bytes of open file `fh` (the caller owns
   * it), for the kernel to read directly; undefined when the open must be served. With `copies`,
   * for a read-only open of a stored file no change is staged for: its whole copy, once made.
   */
  async backingFd(fh: number): Promise<number | undefined> {
    const h = this.handles.get(fh);
    if (!h || h.kind !== "file") return undefined;
    const e = await this.entryOf(h).catch(() => undefined);
    const c = contentOf(e);
    if (c?.direct && !c.frozen && !c.linked && this.staging && (h.flags & O_ACCMODE) !== constants.O_RDONLY) {
      // The content's own file: what the kernel writes through it is the file's bytes. (Opens
      // that only read are served: they follow the name to whatever a later write makes.)
      const fd = openSync(this.staging.dataPath(c.id), constants.O_RDWR | constants.O_CREAT, 0o600);
      h.backedWrites = c;
      c.kernelOpened();
      return fd;
    }
    if (!this.copies || (h.flags & O_ACCMODE) !== constants.O_RDONLY) return undefined;
    if (!e || e.kind !== "file" || contentOf(e) || !this.copies.copies((e as FileEntry).size)) return undefined;
    return this.copies.open(this.copyKey((e as FileEntry).chunks));
  }

  // ---- MountFs: writing ----

  /** Writes at `position` (at the end with O_APPEND); the bytes go to the staging layer. */
  async write(fh: number, data: Uint8Array, position: number): Promise<number> {
    const h = this.handle(fh);
    if (h.kind === "control" || h.kind === "version") return this.control.write(h, data);
    if (h.kind === "dir") throw new VolumeError("BAD_HANDLE", "write: a directory handle");
    if ((h.flags & O_ACCMODE) === constants.O_RDONLY) throw new VolumeError("BAD_HANDLE", "write: the file is open for reading only");
    this.checkWritable("write", h.segs ? "/" + h.segs.join("/") : "(unlinked)");
    return this.exclusive(async () => {
      const c = await this.writable({ h });
      const at = h.flags & constants.O_APPEND ? c.size : position;
      const t = Date.now();
      const how = c.write(data, at, t);
      if (!this.workersWarm && at + data.length >= this.repo.chunks.workerThresholdBytes) {
        this.workersWarm = true;
        void this.repo.chunks.workersReady();
      }
      if (how.moved) this.journal({ o: "m", c: c.id });
      this.journal({ o: "w", c: c.id, at, n: data.length, t, ...(how.inline ? { d: Buffer.from(data).toString("base64") } : {}) });
      return data.length;
    });
  }

  /** Sets a file's size (zeros when it grows). */
  async truncate(path: string, size: number): Promise<void> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME) {
      await this.control.getattr(segs.slice(1));
      return;
    }
    this.writableSegs("truncate", path);
    if (!Number.isSafeInteger(size) || size < 0) throw new VolumeError("INVALID_ARGUMENT", `truncate ${JSON.stringify(path)}: bad size ${size}`);
    await this.exclusive(async () => {
      const c = await this.writable({ segs });
      const t = Date.now();
      c.truncate(size, t);
      this.journal({ o: "tr", c: c.id, s: size, t });
    });
  }

  /** Sets an open file's size. */
  async ftruncate(fh: number, size: number): Promise<void> {
    const h = this.handle(fh);
    if (h.kind !== "file") return;
    if ((h.flags & O_ACCMODE) === constants.O_RDONLY) throw new VolumeError("BAD_HANDLE", "truncate: the file is open for reading only");
    this.checkWritable("truncate", h.segs ? "/" + h.segs.join("/") : "(unlinked)");
    if (!Number.isSafeInteger(size) || size < 0) throw new VolumeError("INVALID_ARGUMENT", `truncate: bad size ${size}`);
    await this.exclusive(async () => {
      const c = await this.writable({ h });
      const t = Date.now();
      c.truncate(size, t);
      this.journal({ o: "tr", c: c.id, s: size, t });
    });
  }

  /** Nothing to do: every write is in the staging layer's page cache when it is answered. */
  async flush(fh: number): Promise<void> {
    this.handle(fh);
  }

  /** Forces the file's staged bytes and the journal to the disk. */
  async fsync(fh: number, _datasync: boolean): Promise<void> {
    const h = this.handle(fh);
    if (h.kind !== "file" || !this.staging) return;
    const c = contentOf(await this.entryOf(h).catch(() => undefined));
    this.staging.fsync(c && c.hasFile ? [c.id] : []);
  }

  /** Forces every journal layer still to replay, and the staging directory, to the disk: names made, renamed or removed included. */
  async fsyncdir(): Promise<void> {
    this.staging?.fsync();
  }

  /** Closes a handle; idempotent for unknown handles is not given: BAD_HANDLE. */
  async release(fh: number): Promise<void> {
    const h = this.handle(fh);
    this.handles.delete(fh);
    if (h.kind !== "file") return;
    this.dropFill(h);
    const c = h.backedWrites;
    c?.kernelReleased();
  }

  /** Removes a file or symlink; open handles keep reading and writing it. */
  async unlink(path: string): Promise<void> {
    const segs = this.writableSegs("unlink", path);
    await this.exclusive(async () => {
      const e = await this.mustLookup(segs, "unlink");
      if (e.kind === "dir") throw VolumeError.IS_A_DIRECTORY(path, { op: "unlink" });
      this.orphanHandles(segs, e);
      await this.change({ o: "rm", p: segs.join("/"), t: Date.now() });
    });
  }

  /** Creates a directory; EEXIST when something is there. */
  async mkdir(path: string, mode: number): Promise<void> {
    const segs = this.writableSegs("mkdir", path);
    await this.exclusive(async () => {
      await this.checkParent(segs, "mkdir");
      if (await this.overlay.lookup(segs)) throw VolumeError.ALREADY_EXISTS(JSON.stringify(path), { op: "mkdir", path });
      await this.change({ o: "mkdir", p: segs.join("/"), m: mode & 0o7777, t: Date.now() });
    });
  }

  /** Removes an empty directory. */
  async rmdir(path: string): Promise<void> {
    const segs = this.writableSegs("rmdir", path);
    await this.exclusive(async () => {
      const e = await this.mustLookup(segs, "rmdir");
      if (e.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY(path, { op: "rmdir" });
      if ((await this.overlay.readdir(segs)).length > 0) throw new VolumeError("NOT_EMPTY", `rmdir ${JSON.stringify(path)}: directory not empty`, { path });
      await this.change({ o: "rm", p: segs.join("/"), t: Date.now() });
    });
  }

  /** rename(2), atomically: replaces a file, or an empty directory, at `dst`. */
  async rename(src: string, dst: string): Promise<void> {
    const s = this.writableSegs("rename", src);
    const d = this.writableSegs("rename", dst);
    await this.exclusive(async () => {
      await this.checkParent(s, "rename");
      await this.checkParent(d, "rename");
      const e = await this.mustLookup(s, "rename");
      if (s.join("/") === d.join("/")) return;
      const prefix = s.join("/") + "/";
      if ((d.join("/") + "/").startsWith(prefix)) throw new VolumeError("INVALID_ARGUMENT", `rename ${JSON.stringify(src)}: target ${JSON.stringify(dst)} is inside it`, { path: src });
      const target = await this.overlay.lookup(d);
      // Two names of one file (hard links): rename(2) leaves both.
      if (target && contentOf(target) !== undefined && contentOf(target) === contentOf(e)) return;
      if (target && target.kind !== "dir" && e.kind !== "dir") this.orphanHandles(d, target);
      await this.change({ o: "mv", p: s.join("/"), d: d.join("/"), t: Date.now() });
      const sk = s.join("/");
      for (const h of this.handles.values()) {
        if (h.kind !== "file" || !h.segs) continue;
        const hk = h.segs.join("/");
        if (hk === sk) h.segs = [...d];
        else if (hk.startsWith(prefix)) h.segs = [...d, ...h.segs.slice(s.length)];
      }
    });
  }

  /** Creates a symbolic link at `path` pointing to `target` (stored as given). */
  async symlink(target: string, path: string): Promise<void> {
    const segs = this.writableSegs("symlink", path);
    if (Buffer.byteLength(target) > 4096) throw new VolumeError("INVALID_PATH", `symlink ${JSON.stringify(path)}: target longer than 4096 bytes`, { path, details: "name-too-long" });
    await this.exclusive(async () => {
      await this.checkParent(segs, "symlink");
      if (await this.overlay.lookup(segs)) throw VolumeError.ALREADY_EXISTS(JSON.stringify(path), { op: "symlink", path });
      await this.change({ o: "sym", p: segs.join("/"), target, t: Date.now() });
    });
  }

  /**
   * A hard link. A tree has no inodes, so `dst` is a second entry with the same content: until
   * the next sync both names share the staged bytes (a write through one shows in the other);
   * after a sync they are two files with the same chunks, and the next write to one of them
   * changes that name only. nlink stays 1.
   */
  async link(src: string, dst: string): Promise<void> {
    const s = this.writableSegs("link", src);
    const d = this.writableSegs("link", dst);
    await this.exclusive(async () => {
      const e = await this.mustLookup(s, "link");
      if (e.kind === "dir") throw new VolumeError("PERMISSION", `link ${JSON.stringify(src)}: hard links to directories are not allowed`, { path: src });
      await this.checkParent(d, "link");
      if (await this.overlay.lookup(d)) throw VolumeError.ALREADY_EXISTS(JSON.stringify(dst), { op: "link", path: dst });
      // A stored file is staged first (no bytes copied), so that both names show one content: a
      // write through either shows in the other until a sync, as for a staged file's links.
      if (e.kind === "file" && !contentOf(e)) await this.writable({ segs: s });
      await this.change({ o: "link", p: s.join("/"), d: d.join("/"), t: Date.now() });
    });
  }

  private async setAttr(op: string, path: string, patch: { mode?: number; mtime?: number; uid?: number; gid?: number }): Promise<void> {
    const segs = segsOf(path);
    if (segs.length === 0) {
      this.checkWritable(op, path);
      return;
    }
    this.writableSegs(op, path);
    await this.exclusive(async () => {
      const e = await this.mustLookup(segs, op);
      // A chmod or chown to what the entry has (tar's chown of each file it makes, as root)
      // stages nothing: no journal line, and a stored file stays stored.
      const same = (v: number | undefined, cur: number): boolean => v === undefined || v === cur;
      if (patch.mtime === undefined && same(patch.mode, e.mode & 0o7777) && same(patch.uid, e.uid ?? 0) && same(patch.gid, e.gid ?? 0)) return;
      // A staged file's mtime is its content's. A content a sync froze (running, or failed) keeps
      // the sync's: a new time goes on a copy of it, as a write's bytes do (and so in a replay).
      if (patch.mtime !== undefined && contentOf(e)?.frozen) await this.writable({ segs });
      await this.change({ o: "attr", p: segs.join("/"), ...patch });
    });
  }

  /** Sets permission bits. The root's attributes are fixed (accepted, not stored). */
  async chmod(path: string, mode: number): Promise<void> {
    await this.setAttr("chmod", path, { mode: mode & 0o7777 });
  }

  /** Sets owner and group (-1 keeps one); kept in the version's tree entries. */
  async chown(path: string, uid: number, gid: number): Promise<void> {
    const keep = (n: number): boolean => n === -1 || n === 0xffffffff;
    const patch: { uid?: number; gid?: number } = {};
    if (!keep(uid)) patch.uid = uid;
    if (!keep(gid)) patch.gid = gid;
    await this.setAttr("chown", path, patch);
  }

  /** Sets the modification time (ms); access times are not kept (atime reads as mtime). */
  async utimens(path: string, _atime: number, mtime: number): Promise<void> {
    await this.setAttr("utimens", path, { mtime: Math.floor(mtime) });
  }

  /** Sets an extended attribute (kept in the version). flags: XATTR_CREATE 1, XATTR_REPLACE 2. */
  async setxattr(path: string, name: string, value: Uint8Array, flags: number): Promise<void> {
    const segs = this.writableSegs("setxattr", path);
    if (name.length === 0 || Buffer.byteLength(name) > 255) throw new VolumeError("INVALID_ARGUMENT", `setxattr ${JSON.stringify(path)}: bad attribute name`, { path });
    await this.exclusive(async () => {
      const e = await this.mustLookup(segs, "setxattr");
      const has = e.xattrs !== undefined && Object.prototype.hasOwnProperty.call(e.xattrs, name);
      if (flags & XATTR_CREATE && has) throw VolumeError.ALREADY_EXISTS(`attribute ${JSON.stringify(name)} of ${JSON.stringify(path)}`, { op: "setxattr" });
      if (flags & XATTR_REPLACE && !has) throw new VolumeError("NO_ATTRIBUTE", `setxattr ${JSON.stringify(path)}: no attribute ${JSON.stringify(name)}`, { path });
      await this.change({ o: "xattr", p: segs.join("/"), k: name, v: Buffer.from(value).toString("base64") });
    });
  }

  /** An extended attribute's value; NO_ATTRIBUTE when it is not set. */
  async getxattr(path: string, name: string): Promise<Uint8Array> {
    const v = await this.xattr(path, name);
    if (!v) throw new VolumeError("NO_ATTRIBUTE", `getxattr ${JSON.stringify(path)}: no attribute ${JSON.stringify(name)}`, { path });
    return v;
  }

  /** An extended attribute's value, or undefined when the file has none by that name. */
  async xattr(path: string, name: string): Promise<Uint8Array | undefined> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME || segs.length === 0) return undefined;
    const e = await this.mustLookup(segs, "getxattr");
    return e.xattrs && Object.prototype.hasOwnProperty.call(e.xattrs, name) ? e.xattrs[name] : undefined;
  }

  /** Names of the extended attributes, sorted. */
  async listxattr(path: string): Promise<string[]> {
    const segs = segsOf(path);
    if (segs[0] === RESERVED_NAME || segs.length === 0) return [];
    const e = await this.mustLookup(segs, "listxattr");
    return Object.keys(e.xattrs ?? {}).sort();
  }

  /** Removes an extended attribute; NO_ATTRIBUTE when it is not set. */
  async removexattr(path: string, name: string): Promise<void> {
    const segs = this.writableSegs("removexattr", path);
    await this.exclusive(async () => {
      const e = await this.mustLookup(segs, "removexattr");
      if (!e.xattrs || !Object.prototype.hasOwnProperty.call(e.xattrs, name)) throw new VolumeError("NO_ATTRIBUTE", `removexattr ${JSON.stringify(path)}: no attribute ${JSON.stringify(name)}`, { path });
      await this.change({ o: "xattr", p: segs.join("/"), k: name, v: null });
    });
  }

  /** Nominal figures: a volume has no fixed capacity. */
  async statfs(): Promise<{ blocks: number; bfree: number; bavail: number; files: number; ffree: number; bsize: number; namemax: number }> {
    const bsize = 4096;
    const used = Math.ceil((this.overlay.base.rootEntry.bytes ?? 0) / bsize);
    const blocks = 2 ** 40 / bsize;
    return { blocks, bfree: blocks - used, bavail: blocks - used, files: 2 ** 32, ffree: 2 ** 32 - (this.overlay.base.rootEntry.files ?? 0), bsize, namemax: NAME_MAX };
  }

  // ---- sync, reload, status ----

  /** The base version id. */
  baseId(): string | null {
    return this.base?.id ?? null;
  }

  /**
   * Commits the staged changes as one version (upload, CAS, path-by-path rebase) and makes it
   * the base. Reads and writes go on during the upload; changes made meanwhile stay staged on
   * top of the new base. Syncs run one at a time. A failed sync leaves everything staged.
   */
  async sync(opts: MountSyncOptions = {}): Promise<MountSyncResult> {
    this.checkWritable("sync", "/");
    const prev = this.syncing;
    const run = (async () => {
      if (prev) await prev.catch(() => undefined);
      for (let attempt = 1; ; attempt++) {
        try {
          return await this.runSync(opts);
        } catch (err) {
          // Writes made while it ran met a moved head: the next attempt takes them in (see runSync).
          if (!(err instanceof VolumeError && (err.details as { writtenDuringSync?: boolean } | undefined)?.writtenDuringSync) || attempt >= SYNC_ATTEMPTS) throw err;
        }
      }
    })();
    this.syncing = run;
    try {
      const { rebased, ...r } = await run;
      if (rebased) await this.externalChange();
      this.control.recordSync(r);
      return r;
    } catch (err) {
      this.control.recordSync(err as Error);
      throw err;
    } finally {
      if (this.syncing === run) this.syncing = undefined;
    }
  }

  /** Runs one sync; `rebased` when the new base took in versions other writers committed meanwhile. */
  private async runSync(opts: MountSyncOptions): Promise<MountSyncResult & { rebased: boolean }> {
    const staging = this.staging!;
    const frozen = await this.exclusive(async () => {
      // An earlier sync whose outcome could not be learned (see below) is settled first.
      const open = staging.manifest.syncing;
      if (open) {
        if (await this.findSynced(open.token, staging.manifest.base)) {
          throw new VolumeError("CONFLICT", `sync volume ${JSON.stringify(this.volume)}: an earlier sync of this mount went through, but the mount could not take it in`, {
            volume: this.volume,
            hint: "unmount and mount again: the mount then goes on from that version, with the changes made since",
          });
        }
        staging.settleSync();
      }
      if (this.overlay.isEmpty()) return undefined;
      const upTo = staging.rotate();
      const contents = new Set<StagedContent>();
      const clone = this.repo.stage(this.base);
      const snapshots = new Map<string, StagedContent>();
      const restated: Restated[] = [];
      clone.root = this.freezeNode(this.overlay.root, contents, [], snapshots, restated);
      const token = randomBytes(12).toString("hex");
      staging.writeManifest({ ...staging.manifest, syncing: { token, upTo } }, true);
      // The new layer's lines so far are the freeze's own (live files re-stated over the version).
      return { upTo, clone, contents: [...contents], token, base: this.base, snapshots: [...snapshots.values()], restated, lines: staging.appended };
    });
    if (!frozen) return { version: this.base?.id ?? null, changed: false, conflicts: [], rebased: false };
    let res: { version: VersionRecord | null; changed: boolean; conflicts: string[] };
    // Changes made while the sync runs are journalled over the mount's view before it; replayed
    // over a version that took in another writer's, they would overwrite it unchecked. So the
    // head may be rebased onto only when none were made, and none can be until the replay below:
    // the lock is held from the first rebase to the end. Else the sync ends with nothing
    // committed and runs again, the changes then among those it rebases path by path.
    let release: (() => void) | undefined;
    const beforeRebase = async (): Promise<void> => {
      release ??= await this.acquire();
      if (staging.appended > frozen.lines) {
        throw new VolumeError("CONFLICT", `sync volume ${JSON.stringify(this.volume)}: the head moved, and files changed while the sync ran`, {
          volume: this.volume,
          details: { writtenDuringSync: true },
          hint: "sync again once the writers pause",
        });
      }
    };
    try {
      res = await this.repo.sync(this.volume, frozen.base, frozen.clone, {
        message: opts.message,
        onConflict: opts.onConflict,
        labels: { ...this.labels, ...(opts.labels ?? {}), syncId: frozen.token },
        beforeRebase,
      });
    } catch (err) {
      // undefined: whether the commit went through cannot be learned now (the store is down):
      // the token stays in the manifest for the next sync, or the next mount, to settle.
      const committed = await this.findSynced(frozen.token, frozen.base?.id ?? null).catch(() => undefined);
      if (!committed) {
        release?.();
        release = undefined;
        for (const c of frozen.contents) c.resetUpload();
        if (committed === null) staging.settleSync();
        // The copies of files still open for writing: the next sync copies them again. Unless
        // this one may have committed: whoever settles it then compares them with what it stored
        // (see holdsCopy); they go with the other unreachable data files after that.
        if (committed === null) {
          await this.exclusive(async () => {
            staging.recycleDataLater(frozen.snapshots.map((c) => ({ id: c.id, size: c.size })));
            for (const c of frozen.snapshots) this.contents.delete(c.id);
          });
        }
        throw err;
      }
      res = { version: committed, changed: true, conflicts: [] as string[] };
    }
    const settle = async (): Promise<void> => {
      this.stored = new Map(frozen.contents.filter((c) => c.uploaded).map((c) => [stagedTag(c), c.uploaded!.chunks]));
      for (const c of this.contents.values()) {
        if (c.lower?.kind === "content" && c.lower.content.uploaded) {
          const up = c.lower.content.uploaded;
          c.lower = { kind: "chunks", chunks: up.chunks, size: up.size };
        }
      }
      const next = this.repo.stage(res.version);
      // The replay counts the names of the contents again (the stored ones are plain files now).
      for (const c of this.contents.values()) c.names = 1;
      for (const l of staging.readLayers()) if (l.layer > frozen.upTo) for (const op of l.ops) await this.replayOp(next, op, "rebase");
      for (const r of frozen.restated) r.stored = this.contents.get(r.copy!)?.uploaded?.chunks;
      await this.unstateTheirs(next, frozen.restated, res.version);
      const was = this.overlay;
      this.base = res.version;
      this.overlay = next;
      await this.keepOpenReads(was);
      staging.writeManifest({ v: 1, base: res.version?.id ?? null, first: frozen.upTo + 1 }, true);
      staging.dropLayers(frozen.upTo);
      const live = this.reachable();
      const dead = [...this.contents.keys()].filter((id) => !live.has(id));
      // After the commit, off the sync's path: a sync of many new files stored as many data files.
      staging.recycleDataLater(dead.map((id) => ({ id, size: this.contents.get(id)?.size })));
      for (const id of dead) this.contents.delete(id);
    };
    if (release) {
      try {
        await settle();
      } finally {
        release();
      }
    } else await this.exclusive(settle);
    const parents = res.version?.parents ?? [];
    const ours = frozen.base ? parents.length === 1 && parents[0] === frozen.base.id : parents.length === 0;
    const rebased = res.version !== null && res.version.id !== frozen.base?.id && !ours;
    return { version: res.version?.id ?? null, changed: res.changed, conflicts: res.conflicts, rebased };
  }

  /**
   * The sync's copy of the overlay below `n` (at `segs`), its staged contents frozen (and added
   * to `frozen`). A direct content the kernel may still be writing (an open with a backing file)
   * cannot be frozen: the sync takes a copy of its file instead (`snapshots`, by content), and the
   * name keeps the live content, which the new journal layer says again (a `cow` line with `x`),
   * so that it shows over the version the sync makes.
   */
  private freezeNode(n: OverlayNode, frozen: Set<StagedContent>, segs: string[], snapshots: Map<string, StagedContent>, restated: Restated[]): OverlayNode {
    const out: OverlayNode = {};
    if (n.replace === null) out.replace = null;
    else if (n.replace !== undefined) {
      let c = contentOf(n.replace);
      if (c?.direct && !c.frozen && c.backedWriters > 0) {
        let copy = snapshots.get(c.id);
        if (!copy) {
          const live: StagedContent = c;
          copy = this.newContent(null, 0, live.mtime);
          this.staging!.copyData(live.id, copy.id);
          copy.makeDirect(true);
          copy.refresh();
          copy.frozen = true;
          frozen.add(copy);
          snapshots.set(live.id, copy);
        }
        this.journal({ o: "cow", p: segs.join("/"), c: c.id, x: 1, s: copy.id });
        restated.push({ segs, live: c.id, copy: copy.id });
        c = copy;
      }
      if (c) {
        // Frozen already by a sync that failed, it is still this sync's: its upload is reset with
        // the others' if this one fails too (the chunks an upload names are stored only by a
        // sync that goes through).
        c.frozen = true;
        frozen.add(c);
        out.replace = { ...this.pendingEntry(n.replace.name, c, n.replace), mtime: c.mtime, size: c.size };
      } else out.replace = { ...n.replace };
    }
    if (n.implicit) out.implicit = true;
    if (n.mtime !== undefined) out.mtime = n.mtime;
    if (n.children) {
      out.children = new Map();
      for (const [k, child] of n.children) out.children.set(k, this.freezeNode(child, frozen, [...segs, k], snapshots, restated));
    }
    return out;
  }

  /**
   * The names a sync's freeze said again over the version it made (files open for kernel writes,
   * see freezeNode), where that version does not hold the copy the sync stored of the file: the
   * sync took the other writer's entry there (the "theirs" policy). Those names show the
   * version's entry, as any other path the policy gave to theirs, and the open file writes on
   * unnamed, as after a reload that discards it. A `drop` line says so to a later replay.
   */
  private async unstateTheirs(ov: Overlay, restated: readonly Restated[], version: VersionRecord | null): Promise<void> {
    if (restated.length === 0 || !version) return;
    const snap = this.repo.snapshot(version);
    for (const r of restated) {
      // A lookup that fails (the store down) fails the sync's settle, or the mount: neither
      // decides on what it could not read. A path through their file is no entry.
      const entry = await snap.lookupSegments(r.segs).catch((err: unknown) => {
        if (err instanceof VolumeError && err.code === "NOT_A_DIRECTORY") return undefined;
        throw err;
      });
      if (entry?.kind === "file" && (await this.holdsCopy(entry as FileEntry, r)) !== false) continue;
      const cur = await ov.lookup(r.segs).catch(() => undefined);
      if (!cur || contentOf(cur)?.id !== r.live) continue;
      const op: JournalOp = { o: "drop", p: r.segs.join("/"), t: Date.now() };
      this.journal(op);
      await this.apply(ov, op, "rebase");
    }
  }

  /**
   * Whether a version's `file` is the copy a sync stored for `r` (or the same bytes): by its
   * chunks in the sync itself, else by the copy's data file, byte for byte (a mount taking in a
   * sync that committed before its mount ended; or the same bytes chunked otherwise, by another
   * writer). Undefined when it cannot be told (the copy's file is gone): the name then stays.
   */
  private async holdsCopy(file: FileEntry, r: Restated): Promise<boolean | undefined> {
    if (r.stored && sameChunks(file.chunks, r.stored)) return true;
    if (r.stored && r.stored.reduce((n, c) => n + c.length, 0) !== file.size) return false;
    if (!r.copy || !this.staging) return r.stored ? false : undefined;
    let fd: number;
    try {
      fd = openSync(this.staging.dataPath(r.copy), constants.O_RDONLY);
    } catch {
      return r.stored ? false : undefined;
    }
    try {
      if (fstatSync(fd).size !== file.size) return false;
      const buf = Buffer.allocUnsafe(Math.min(COMPARE_BLOCK, file.size));
      for (let at = 0; at < file.size; at += COMPARE_BLOCK) {
        const n = Math.min(COMPARE_BLOCK, file.size - at);
        const stored = await this.repo.chunks.readRange(file.chunks, at, n);
        if (readSync(fd, buf, 0, n, at) !== n || !buf.subarray(0, n).equals(stored)) return false;
      }
      return true;
    } finally {
      closeSync(fd);
    }
  }

  /**
   * Moves the base to the volume's head. Refuses with NOT_EMPTY while changes are staged, unless
   * `discard` (which drops them). Returns the new base id. A mount at a fixed version refuses.
   */
  async reload(opts: { discard?: boolean } = {}): Promise<string | null> {
    if (this.pinned) throw new VolumeError("INVALID_ARGUMENT", `reload volume ${JSON.stringify(this.volume)}: mounted at a fixed version`, { volume: this.volume });
    if (this.syncing) await this.syncing.catch(() => undefined);
    const id = await this.exclusive(async () => {
      if (!this.overlay.isEmpty() && !opts.discard) {
        throw new VolumeError("NOT_EMPTY", `reload volume ${JSON.stringify(this.volume)}: ${this.overlay.changedPaths().length} staged change(s)`, {
          volume: this.volume,
          hint: "sync them first, or reload with discard to drop them",
        });
      }
      const vol = await this.repo.volume(this.volume);
      const head = vol.head ? await this.repo.version(vol.head) : null;
      const was = this.overlay;
      this.setBase(head);
      await this.keepOpenReads(was);
      if (this.staging) {
        const ended = this.staging.rotate();
        this.staging.writeManifest({ v: 1, base: head?.id ?? null, first: ended + 1 }, true);
        this.staging.dropLayers(ended);
        const live = this.reachable();
        const dead = [...this.contents.keys()].filter((id) => !live.has(id));
        this.staging.recycleDataLater(dead.map((id) => ({ id, size: this.contents.get(id)?.size })));
        for (const id of dead) this.contents.delete(id);
      }
      return head?.id ?? null;
    });
    await this.externalChange();
    return id;
  }

  /** The base and the staged changes relative to it (paths without a leading slash; dirs end in "/"). */
  async status(): Promise<MountStatus> {
    const out: MountStatus = { volume: this.volume, base: this.base?.id ?? null, readOnly: this.readOnly, staged: { added: [], modified: [], removed: [] } };
    const base = this.overlay.base;
    for (const p of this.overlay.changedPaths()) {
      const segs = p.split("/");
      const was = await base.lookupSegments(segs).catch(() => undefined);
      const now = await this.overlay.lookup(segs).catch(() => undefined);
      const name = (now ?? was)?.kind === "dir" ? p + "/" : p;
      if (!was && now) out.staged.added.push(name);
      else if (was && !now) out.staged.removed.push(name);
      else if (was && now) out.staged.modified.push(name);
    }
    return out;
  }

  /** Releases the staging lock (staged changes stay on disk for the next mount); idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    if (this.syncing) await this.syncing.catch(() => undefined);
    await this.lock.catch(() => undefined);
    this.closed = true;
    // Files the kernel writes through whose release never came (the session was aborted, or
    // the process is going down with them open): their writers may outlive this mount.
    const keptOpen: string[] = [];
    for (const h of this.handles.values()) {
      if (h.kind !== "file") continue;
      this.dropFill(h);
      if (h.backedWrites) keptOpen.push(h.backedWrites.id);
    }
    for (const r of this.copyReaders.values()) r.close();
    this.copyReaders.clear();
    this.handles.clear();
    this.staging?.close(keptOpen);
  }
}
