/**
 * The repository: volumes, their version DAG and sync, over a MetadataStore and an ObjectStore.
 *
 * Layout in the bucket (so that the bucket alone describes every volume):
 *   packs/<id>                                  chunks and trees (see ../chunk/pack.ts)
 *   versions/<id>                               a version record, canonical JSON, id = blake3 of it
 *   refs/<env>/<volume>/<createdAt:13>-<seq:10> a volume's state after its seq-th head move:
 *                                               {"head","forkedFrom","createdAt","seq","deleted"?}
 * Invariants: a pack is uploaded before any tree names its chunks, a tree before any version
 * names it, a version object before the head moves to it. The head moves by compare-and-swap in
 * SQLite (the commit point on a host); the ref object follows. The newest ref key of a volume is
 * its state (keys sort by incarnation, then seq), so `fsck --rebuild` needs nothing but the bucket.
 */
import { open, readFile } from "node:fs/promises";
import { hostname } from "node:os";
import { isCode, type MetadataStore, type VersionRecord, type VolumeRecord } from "../../metadata/index.js";
import { ChunkStore, type ChunkCache, type ChunkParams, type WriteStats } from "../chunk/index.js";
import { VolumeError } from "../errors.js";
import type { ObjectStore } from "../object/index.js";
import { buildDir, findConflicts, type ConflictPolicy } from "./build.js";
import { Overlay, type StagedEntry } from "./overlay.js";
import { checkVolumeName } from "./paths.js";
import { Snapshot, TreeCache, diffSnapshots, type ContentSource, type TreeDiff } from "./snapshot.js";
import { blake3Hex, EMPTY_TREE, type DirEntry, type EncodedTree, type FileEntry } from "./tree.js";

/** Options of a Repository. */
export interface RepositoryOptions {
  /** The metadata index (SQLite). */
  meta: MetadataStore;
  /** The bucket (or local object directory). */
  objects: ObjectStore;
  /** The host-wide chunk cache; none by default. */
  cache?: ChunkCache;
  /** The environment (tenant) volumes live in. Default "main". */
  env?: string;
  /** Chunking parameters; default DEFAULT_CHUNK_PARAMS. */
  chunkParams?: ChunkParams;
  /** Provenance labels added to every version this repository commits. */
  labels?: Record<string, string>;
  /** Files chunked and uploaded at once during a sync. Default 16. */
  fileConcurrency?: number;
}

/** Options of a sync. */
export interface SyncOptions {
  /** The version's message. */
  message?: string;
  /** Provenance labels for this version (merged over the repository's). */
  labels?: Record<string, string>;
  /** What to do with paths changed on both sides when the head moved. Default "fail". */
  onConflict?: ConflictPolicy;
  /** How many times to rebase onto a moving head before giving up. Default 10. */
  maxRebases?: number;
  /** Called as files are uploaded: files done, files in all. */
  onProgress?: (done: number, total: number) => void;
  /**
   * Called each time the head is found to have moved, before the overlay is rebased onto it; a
   * throw ends the sync with nothing committed (a mount refuses to rebase over writes made while
   * the sync ran: see MountedVolume.sync).
   */
  beforeRebase?: () => Promise<void>;
}

/** What a sync did. */
export interface SyncResult {
  /** The volume's head after the sync (the new version, or the unchanged head). */
  version: VersionRecord | null;
  /** False when the staged changes made no difference, so no version was made. */
  changed: boolean;
  /** Paths changed on both sides and settled by the policy ("ours" or "theirs"). */
  conflicts: string[];
  /** True when the head had moved and the changes were rebased onto it. */
  rebased: boolean;
  /** Upload statistics. */
  stats: WriteStats;
}

const REF_WIDTH_TIME = 13;
/** Local files up to this size are read whole rather than streamed during a sync. */
const SMALL_FILE_BYTES = 4 << 20;
/** Larger local files are read in blocks of this size, each handed over whole to the chunk writer. */
const LOCAL_READ_BYTES = 8 << 20;
const REF_WIDTH_SEQ = 10;

/**
 * Streams a local file into `writer` in LOCAL_READ_BYTES blocks that the writer takes over and
 * hands back for the next reads.
 */
async function writeLocalFile(writer: ReturnType<ChunkStore["writer"]>, path: string): Promise<{ chunks: FileEntry["chunks"]; size: number }> {
  const fh = await open(path, "r");
  const spare: Uint8Array[] = [];
  async function* blocks(): AsyncGenerator<Uint8Array> {
    for (;;) {
      const buf = spare.pop() ?? new Uint8Array(LOCAL_READ_BYTES);
      let n = 0;
      while (n < buf.length) {
        const { bytesRead } = await fh.read(buf, n, buf.length - n, null);
        if (bytesRead === 0) break;
        n += bytesRead;
      }
      if (n > 0) yield n === buf.length ? buf : buf.subarray(0, n);
      if (n < buf.length) return;
    }
  }
  try {
    return await writer.writeStream(blocks(), { transfer: true, recycle: (b) => spare.push(b) });
  } finally {
    await fh.close();
  }
}

/** The bucket key of a volume's ref after a head move. */
export function refKey(env: string, v: Pick<VolumeRecord, "name" | "createdAt" | "seq">): string {
  return `refs/${env}/${v.name}/${String(v.createdAt).padStart(REF_WIDTH_TIME, "0")}-${String(v.seq).padStart(REF_WIDTH_SEQ, "0")}`;
}

/** The canonical bytes of a version record without its id, and the id they hash to. */
export function encodeVersion(v: Omit<VersionRecord, "id">): { id: string; data: Uint8Array } {
  const labels: Record<string, string> = {};
  for (const k of Object.keys(v.labels).sort()) labels[k] = v.labels[k]!;
  const body = { root: v.root, parents: v.parents, time: v.time, message: v.message, labels, files: v.files, bytes: v.bytes };
  const data = Buffer.from(JSON.stringify(body));
  return { id: blake3Hex(data), data };
}

/** Parses a version object from the bucket and checks its id. Throws CORRUPT. */
export function decodeVersion(id: string, data: Uint8Array): VersionRecord {
  if (blake3Hex(data) !== id) throw VolumeError.CORRUPT(`version ${id}`);
  const v = JSON.parse(Buffer.from(data).toString("utf8")) as Omit<VersionRecord, "id">;
  return { id, ...v };
}

const EMPTY_SOURCE_TREE = EMPTY_TREE;

/** Volumes, versions and sync over one metadata store and one object store. */
export class Repository {
  readonly meta: MetadataStore;
  readonly objects: ObjectStore;
  readonly chunks: ChunkStore;
  readonly env: string;
  private readonly labels: Record<string, string>;
  private readonly trees = new TreeCache();
  private readonly fileConcurrency: number;
  private readonly source: ContentSource;

  constructor(opts: RepositoryOptions) {
    this.meta = opts.meta;
    this.objects = opts.objects;
    this.env = opts.env ?? "main";
    this.labels = { host: hostname(), ...(opts.labels ?? {}) };
    this.fileConcurrency = opts.fileConcurrency ?? 16;
    this.chunks = new ChunkStore({ objects: opts.objects, meta: opts.meta, cache: opts.cache, params: opts.chunkParams });
    const chunks = this.chunks;
    this.source = {
      readTree: (id) => (id === EMPTY_SOURCE_TREE.id ? Promise.resolve(EMPTY_SOURCE_TREE.data) : chunks.readTree(id)),
      readRange: (c, off, len) => chunks.readRange(c, off, len),
    };
  }

  // ---- volumes ----

  /** The volume; throws UNKNOWN_VOLUME. */
  async volume(name: string): Promise<VolumeRecord> {
    checkVolumeName(name);
    const v = await this.meta.getVolume(this.env, name);
    if (!v) throw VolumeError.UNKNOWN_VOLUME(name);
    return v;
  }

  /** Creates an empty volume; throws ALREADY_EXISTS. */
  async createVolume(name: string): Promise<VolumeRecord> {
    checkVolumeName(name);
    return this.insertVolume({ env: this.env, name, head: null, forkedFrom: null, createdAt: Date.now() });
  }

  /** The volume, created empty if missing. */
  async openOrCreate(name: string): Promise<VolumeRecord> {
    checkVolumeName(name);
    const v = await this.meta.getVolume(this.env, name);
    if (v) return v;
    try {
      return await this.createVolume(name);
    } catch (err) {
      if (isCode(err, "ALREADY_EXISTS")) return this.volume(name);
      throw err;
    }
  }

  /** The ref goes to the bucket first, so that a volume never exists only in the metadata. */
  private async insertVolume(v: Omit<VolumeRecord, "seq">): Promise<VolumeRecord> {
    const exists = (): VolumeError =>
      VolumeError.ALREADY_EXISTS(`volume ${JSON.stringify(v.name)}`, { volume: v.name, hint: "pick another name or remove it with `strata volume rm`" });
    if (await this.meta.getVolume(v.env, v.name)) throw exists();
    const rec: VolumeRecord = { ...v, seq: 0 };
    await this.writeRef(rec);
    try {
      return await this.meta.createVolume(v);
    } catch (err) {
      await this.objects.delete([refKey(this.env, rec)]).catch(() => undefined);
      if (isCode(err, "ALREADY_EXISTS")) throw exists();
      throw err;
    }
  }

  /** All volumes of the environment, by name. */
  listVolumes(): Promise<VolumeRecord[]> {
    return this.meta.listVolumes(this.env);
  }

  /** Removes a volume's name; its versions stay (other volumes may share them). */
  async deleteVolume(name: string): Promise<void> {
    const v = await this.volume(name);
    await this.writeRef({ ...v, seq: v.seq + 1 }, true);
    await this.meta.deleteVolume(this.env, name);
  }

  /** Forks `src` (at its head or `at`) into a new volume `dst`, in constant time. */
  async fork(src: string, dst: string, opts: { at?: string } = {}): Promise<VolumeRecord> {
    checkVolumeName(dst);
    const version = await this.resolve(src, opts.at);
    return this.insertVolume({
      env: this.env,
      name: dst,
      head: version?.id ?? null,
      forkedFrom: { volume: src, version: version?.id ?? null },
      createdAt: Date.now(),
    });
  }

  private async writeRef(v: VolumeRecord, deleted = false): Promise<void> {
    const body = Buffer.from(JSON.stringify({ head: v.head, forkedFrom: v.forkedFrom, createdAt: v.createdAt, seq: v.seq, ...(deleted ? { deleted: true } : {}) }));
    const key = refKey(this.env, v);
    try {
      // Create-only: each head move has its own key, so a second writer of the same move (another
      // host sharing the bucket) is caught here instead of silently overwriting the first.
      await this.objects.put(key, body, { ifNoneMatch: "*" });
    } catch (err) {
      if (err instanceof VolumeError && err.code === "PRECONDITION_FAILED") {
        const there = await this.objects.get(key).catch(() => undefined);
        if (there && Buffer.compare(Buffer.from(there), body) === 0) return;
        throw new VolumeError("CONFLICT", `write ref of volume ${JSON.stringify(v.name)}: head move ${v.seq} was written by another writer`, {
          volume: v.name,
          cause: err,
          hint: "another host commits to this volume through the same bucket; run `strata fsck --rebuild` on this host to catch up",
        });
      }
      if (deleted || v.seq === 0) throw err;
      throw new VolumeError("IO", `write ref of volume ${JSON.stringify(v.name)}: ${(err as Error).message}`, {
        volume: v.name,
        cause: err,
        hint: "the change is committed locally; run `strata fsck` to bring the bucket's refs up to date",
      });
    }
  }

  // ---- versions ----

  /** The version record; throws UNKNOWN_VERSION. */
  async version(id: string): Promise<VersionRecord> {
    const v = await this.meta.getVersion(id);
    if (!v) throw VolumeError.UNKNOWN_VERSION(id);
    return v;
  }

  /**
   * Resolves a version reference for a volume: undefined or "head" (null when the volume has no
   * version yet), "head~N" (N first parents back), or a unique prefix (4+ hex) of a version id.
   */
  async resolve(volume: string, ref?: string): Promise<VersionRecord | null> {
    const vol = await this.volume(volume);
    if (ref === undefined || ref === "" || /^head$/i.test(ref)) return vol.head ? this.version(vol.head) : null;
    const back = /^head~(\d+)$/i.exec(ref);
    if (back) {
      let cur = vol.head ? await this.version(vol.head) : null;
      for (let n = Number(back[1]); n > 0 && cur; n--) cur = cur.parents[0] ? await this.version(cur.parents[0]) : null;
      if (!cur) throw VolumeError.UNKNOWN_VERSION(ref, volume);
      return cur;
    }
    const hex = ref.toLowerCase();
    if (/^[0-9a-f]{1,3}$/.test(hex)) {
      throw new VolumeError("INVALID_ARGUMENT", `resolve version ${JSON.stringify(ref)}: too short a prefix`, { volume, hint: "give at least 4 hex characters of the version id (`strata log NAME` lists them)" });
    }
    if (!/^[0-9a-f]{4,64}$/.test(hex)) throw VolumeError.UNKNOWN_VERSION(ref, volume);
    // Only versions of this volume: the store holds every volume's, and another's id (or a prefix
    // that also starts one of them) must not stand for one of this volume's.
    const ids = await this.inHistory(vol, await this.meta.findVersions(hex));
    if (ids.length === 0) throw VolumeError.UNKNOWN_VERSION(ref, volume);
    if (ids.length > 1) {
      throw new VolumeError("AMBIGUOUS_VERSION", `resolve version ${JSON.stringify(ref)}: more than one version starts with it`, {
        volume,
        hint: "give more characters of the version id",
      });
    }
    return this.version(ids[0]!);
  }

  /** Those of `ids` in `vol`'s history (its head and the head's ancestors), up to two. */
  private async inHistory(vol: VolumeRecord, ids: string[]): Promise<string[]> {
    const want = new Set(ids);
    const found: string[] = [];
    if (want.size === 0) return found;
    for await (const v of this.history(vol.head)) {
      if (want.has(v.id)) found.push(v.id);
      if (found.length === Math.min(2, want.size)) break;
    }
    return found;
  }

  /**
   * The versions from `head` back through all their parents, each once, in no set order; not
   * `stopAt` nor what lies only beyond it. Read lazily: a caller that stops early reads no more.
   */
  async *history(head: string | null, stopAt: string | null = null): AsyncGenerator<VersionRecord> {
    const seen = new Set<string>();
    const queue = head ? [head] : [];
    while (queue.length > 0) {
      const id = queue.pop()!;
      if (id === stopAt || seen.has(id)) continue;
      seen.add(id);
      const v = await this.version(id);
      yield v;
      queue.push(...v.parents);
    }
  }

  /** A read-only view of a version (the empty tree for null). */
  snapshot(v: VersionRecord | null): Snapshot {
    const root: DirEntry = {
      kind: "dir",
      name: "",
      mode: 0o755,
      mtime: v?.time ?? 0,
      tree: v?.root ?? EMPTY_TREE.id,
      files: v?.files ?? 0,
      bytes: v?.bytes ?? 0,
    };
    return new Snapshot(this.source, root, this.trees);
  }

  /**
   * Every version in a volume's history, newest first: a version always comes before its parents
   * (clocks may tie or step back), and among versions ready at once the later one comes first.
   */
  async log(volume: string): Promise<VersionRecord[]> {
    const vol = await this.volume(volume);
    const all = new Map<string, VersionRecord>();
    const children = new Map<string, number>();
    for await (const v of this.history(vol.head)) {
      all.set(v.id, v);
      for (const p of v.parents) children.set(p, (children.get(p) ?? 0) + 1);
    }
    const out: VersionRecord[] = [];
    const ready = vol.head ? [all.get(vol.head)!] : [];
    while (ready.length > 0) {
      ready.sort((a, b) => a.time - b.time || (a.id < b.id ? 1 : -1));
      const v = ready.pop()!;
      out.push(v);
      for (const p of v.parents) {
        const left = children.get(p)! - 1;
        children.set(p, left);
        if (left === 0) ready.push(all.get(p)!);
      }
    }
    return out;
  }

  /** What changed from version `a` to version `b` (default: the head). */
  async diff(volume: string, a: string, b?: string): Promise<TreeDiff> {
    const va = await this.resolve(volume, a);
    const vb = await this.resolve(volume, b);
    return diffSnapshots(this.snapshot(va), this.snapshot(vb));
  }

  /** A new head version whose tree is that of `ref`. */
  async revert(volume: string, ref: string, opts: { message?: string; labels?: Record<string, string> } = {}): Promise<VersionRecord> {
    const target = await this.resolve(volume, ref);
    if (!target) throw VolumeError.UNKNOWN_VERSION(ref, volume);
    for (let attempt = 0; attempt < 20; attempt++) {
      const vol = await this.volume(volume);
      if (vol.head) {
        // The head has the tree already: a version would change nothing, so none is made.
        const head = vol.head === target.id ? target : await this.version(vol.head);
        if (head.root === target.root) return head;
      }
      const version = await this.putVersion({
        root: target.root,
        parents: vol.head ? [vol.head] : [],
        message: opts.message ?? `revert to ${target.id.slice(0, 12)}`,
        labels: { ...this.labels, ...(opts.labels ?? {}), revertedTo: target.id },
        files: target.files,
        bytes: target.bytes,
      });
      const res = await this.meta.commit({ env: this.env, volume, expectedHead: vol.head, version, trees: [] });
      if (res.ok) {
        await this.writeRef(res.volume);
        return version;
      }
    }
    throw new VolumeError("CONFLICT", `revert volume ${JSON.stringify(volume)}: the head kept moving`, { volume, hint: "retry" });
  }

  private async putVersion(v: Omit<VersionRecord, "id" | "time">): Promise<VersionRecord> {
    const labels: Record<string, string> = {};
    for (const k of Object.keys(v.labels).sort()) labels[k] = v.labels[k]!;
    const full = { ...v, labels, time: Date.now() };
    const { id, data } = encodeVersion(full);
    await this.objects.put(`versions/${id}`, data);
    return { id, ...full };
  }

  // ---- sync ----

  /** An empty overlay over a version, to stage changes in. */
  stage(base: VersionRecord | null): Overlay {
    return new Overlay(this.snapshot(base));
  }

  /**
   * Makes the overlay one new version of `volume`: uploads new chunks in packs, builds the trees
   * bottom-up, commits with compare-and-swap on the head. If the head moved since `base`, the
   * overlay is rebased onto it path by path; paths changed on both sides are settled by
   * `onConflict` ("fail" throws CONFLICT listing them). A failure at any point leaves the head as
   * it was. The overlay's pending files are resolved in place (so a retry does not re-upload).
   */
  async sync(volume: string, base: VersionRecord | null, overlay: Overlay, opts: SyncOptions = {}): Promise<SyncResult> {
    const policy = opts.onConflict ?? "fail";
    const writer = this.chunks.writer();
    try {
      await this.uploadPending(overlay, writer, opts.onProgress);
      let head = base;
      let onto = overlay.base;
      const settled: string[] = [];
      for (let attempt = 0; attempt <= (opts.maxRebases ?? 10); attempt++) {
        const trees: EncodedTree[] = [];
        const root = await buildDir(onto, onto.rootEntry, overlay.root, (t) => trees.push(t));
        if (root.tree === onto.root) {
          const stats = await writer.flush();
          return { version: head, changed: false, conflicts: settled, rebased: head?.id !== base?.id, stats };
        }
        const blobs = trees.flatMap((t) => [{ id: t.id, data: t.data }, ...t.lists]);
        for (const b of blobs) writer.addTree(b.id, b.data);
        const stats = await writer.flush();
        const version = await this.putVersion({
          root: root.tree,
          parents: head ? [head.id] : [],
          message: opts.message ?? "",
          labels: { ...this.labels, ...(opts.labels ?? {}), ...(head?.id !== base?.id ? { rebasedFrom: base?.id ?? "" } : {}) },
          files: root.files,
          bytes: root.bytes,
        });
        const res = await this.meta.commit({
          env: this.env,
          volume,
          expectedHead: head?.id ?? null,
          version,
          trees: blobs,
        });
        if (res.ok) {
          await this.writeRef(res.volume);
          return { version, changed: true, conflicts: settled, rebased: head?.id !== base?.id, stats };
        }
        await opts.beforeRebase?.();
        head = res.head ? await this.version(res.head) : null;
        onto = this.snapshot(head);
        const { conflicts, merged, unchanged } = await findConflicts(overlay, overlay.base, onto);
        for (const p of unchanged) overlay.drop(p.split("/"));
        for (const p of merged) overlay.mergeDir(p.split("/"));
        if (conflicts.length > 0) {
          if (policy === "fail") {
            throw new VolumeError("CONFLICT", `sync volume ${JSON.stringify(volume)}: ${conflicts.length} path(s) changed on both sides: ${conflicts.slice(0, 5).join(", ")}${conflicts.length > 5 ? ", …" : ""}`, {
              volume,
              details: { paths: conflicts, head: head?.id ?? null },
              hint: "sync again with --on-conflict ours or theirs, or reload and redo the change",
            });
          }
          if (policy === "theirs") for (const p of conflicts) overlay.drop(p.split("/"));
          settled.push(...conflicts.filter((p) => !settled.includes(p)));
        }
      }
      throw new VolumeError("CONFLICT", `sync volume ${JSON.stringify(volume)}: the head kept moving`, { volume, hint: "retry the sync" });
    } catch (err) {
      await writer.abort().catch(() => undefined);
      throw err;
    }
  }

  private async uploadPending(overlay: Overlay, writer: ReturnType<ChunkStore["writer"]>, onProgress?: (done: number, total: number) => void): Promise<void> {
    const pending = overlay.pendingNodes();
    let next = 0;
    let done = 0;
    const work = async (): Promise<void> => {
      while (next < pending.length) {
        const { node } = pending[next++]!;
        const p = node.replace;
        let res: { chunks: FileEntry["chunks"]; size: number };
        if (p.pending.kind === "bytes") res = await writer.writeBuffer(p.pending.data);
        else if (p.pending.kind === "upload") res = await p.pending.upload(writer);
        else {
          const local = p.pending.path;
          try {
            // Small files in one read (open, read, close); large ones streamed with bounded memory.
            res = p.pending.size <= SMALL_FILE_BYTES
              ? await writer.writeBuffer(await readFile(local))
              : await writeLocalFile(writer, local);
          } catch (err) {
            if (err instanceof VolumeError) throw err;
            throw VolumeError.IO(`read ${local}`, err, { hint: "check that the local file exists and is readable" });
          }
        }
        const { pending: _drop, ...rest } = p;
        const entry: FileEntry = { ...rest, kind: "file", size: res.size, chunks: res.chunks };
        (node as { replace: StagedEntry }).replace = entry;
        onProgress?.(++done, pending.length);
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.fileConcurrency, pending.length) }, work));
  }

  /** Closes the metadata store and the cache. */
  async close(): Promise<void> {
    await this.meta.close();
  }
}
