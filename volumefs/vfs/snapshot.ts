import { VolumeError } from "../errors.js";
import { splitPath, joinPath } from "./paths.js";
import type { ChunkRef } from "../chunk/index.js";
import { decodeChunkList, decodeTree, findEntry, type DirEntry, type Entry, type Tree } from "./tree.js";

/**
 * Where a snapshot's bytes come from: the chunk store (cache, then ranged GETs of packs).
 * Both methods verify hashes and throw VolumeError CORRUPT or NOT_FOUND.
 */
export interface ContentSource {
  /** The encoded tree with that id. */
  readTree(id: string): Promise<Uint8Array>;
  /** Bytes [offset, offset + length) of a file made of `chunks`; shorter at end of file. */
  readRange(chunks: readonly ChunkRef[], offset: number, length: number): Promise<Uint8Array>;
}

/** A bounded cache of decoded trees by id; trees are immutable, so entries never go stale. */
export class TreeCache {
  private readonly map = new Map<string, Tree>();
  constructor(private readonly maxTrees = 20_000) {}

  get(id: string): Tree | undefined {
    const t = this.map.get(id);
    if (t) {
      this.map.delete(id);
      this.map.set(id, t);
    }
    return t;
  }

  set(t: Tree): void {
    this.map.set(t.id, t);
    if (this.map.size > this.maxTrees) {
      const oldest = this.map.keys().next().value;
      if (oldest !== undefined) this.map.delete(oldest);
    }
  }
}

/** A path and its entry, as `walk` yields them. */
export interface WalkItem {
  /** Normalized path from the volume root, no leading slash. */
  path: string;
  entry: Entry;
}

/**
 * A read-only view of one version's tree. Cheap to make: trees are read and decoded on demand
 * and shared through a TreeCache.
 */
export class Snapshot {
  constructor(
    readonly source: ContentSource,
    /** The root directory entry: its `tree` is the version's root tree. */
    readonly rootEntry: DirEntry,
    private readonly cache: TreeCache = new TreeCache(),
  ) {}

  /** The root tree id. */
  get root(): string {
    return this.rootEntry.tree;
  }

  /** The decoded tree; verifies its hash. */
  async tree(id: string): Promise<Tree> {
    const hit = this.cache.get(id);
    if (hit) return hit;
    const t = decodeTree(await this.source.readTree(id), id);
    await Promise.all(
      t.entries.map(async (e) => {
        if (e.kind !== "file" || e.list === undefined) return;
        e.chunks = decodeChunkList(await this.source.readTree(e.list), e.list);
        delete e.list;
      }),
    );
    this.cache.set(t);
    return t;
  }

  /** The entry at the path segments, or undefined. Throws NOT_A_DIRECTORY if a parent is not a dir. */
  async lookupSegments(segs: readonly string[]): Promise<Entry | undefined> {
    let cur: Entry = this.rootEntry;
    for (let i = 0; i < segs.length; i++) {
      if (cur.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY(segs.slice(0, i).join("/"));
      const t = await this.tree(cur.tree);
      const next = findEntry(t.entries, segs[i]!);
      if (!next) return undefined;
      cur = next;
    }
    return cur;
  }

  /** The entry at a path, or undefined when nothing is there. */
  async lookup(path: string): Promise<Entry | undefined> {
    return this.lookupSegments(splitPath(path));
  }

  /** The entry at a path; throws NOT_FOUND. */
  async stat(path: string): Promise<Entry> {
    const e = await this.lookup(path);
    if (!e) throw VolumeError.NOT_FOUND(JSON.stringify(path), { op: "stat", path, hint: "list what is there with `strata ls NAME [DIR]`" });
    return e;
  }

  /** The entries of a directory, sorted by name. Throws NOT_FOUND or NOT_A_DIRECTORY. */
  async readdir(path: string): Promise<Entry[]> {
    const e = await this.stat(path);
    if (e.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY(path, { op: "list" });
    return (await this.tree(e.tree)).entries;
  }

  /** A whole regular file. Throws NOT_FOUND, IS_A_DIRECTORY, CORRUPT. */
  async readFile(path: string): Promise<Uint8Array> {
    const e = await this.stat(path);
    if (e.kind === "dir") throw VolumeError.IS_A_DIRECTORY(path, { op: "read" });
    if (e.kind === "symlink") return Buffer.from(e.target);
    return this.source.readRange(e.chunks, 0, e.size);
  }

  /** A byte range of a file entry. */
  async read(entry: Entry, offset: number, length: number): Promise<Uint8Array> {
    if (entry.kind !== "file") throw VolumeError.IS_A_DIRECTORY(entry.name, { op: "read" });
    if (offset >= entry.size || length <= 0) return new Uint8Array(0);
    return this.source.readRange(entry.chunks, offset, Math.min(length, entry.size - offset));
  }

  /** Every entry below `path` (not `path` itself), depth first, parents before children. */
  async *walk(path = ""): AsyncGenerator<WalkItem> {
    const start = await this.stat(path);
    if (start.kind !== "dir") return;
    yield* this.walkTree(start.tree, splitPath(path).join("/"));
  }

  private async *walkTree(treeId: string, prefix: string): AsyncGenerator<WalkItem> {
    const t = await this.tree(treeId);
    for (const entry of t.entries) {
      const p = joinPath(prefix, entry.name);
      yield { path: p, entry };
      if (entry.kind === "dir") yield* this.walkTree(entry.tree, p);
    }
  }
}

/** The changes between two trees, as lists of paths. */
export interface TreeDiff {
  added: string[];
  modified: string[];
  removed: string[];
}

/**
 * Compares two snapshots: files (and symlinks, and empty dirs) added, modified or removed.
 * Identical subtrees are skipped by id, so the cost follows the size of the change.
 */
export async function diffSnapshots(a: Snapshot, b: Snapshot): Promise<TreeDiff> {
  const out: TreeDiff = { added: [], modified: [], removed: [] };
  const leaves = async (s: Snapshot, e: Entry, p: string, into: string[]): Promise<void> => {
    if (e.kind !== "dir") {
      into.push(p);
      return;
    }
    const t = await s.tree(e.tree);
    if (t.entries.length === 0) into.push(p + "/");
    for (const c of t.entries) await leaves(s, c, joinPath(p, c.name), into);
  };
  const walk = async (ta: string, tb: string, prefix: string): Promise<void> => {
    if (ta === tb) return;
    const [A, B] = await Promise.all([a.tree(ta), b.tree(tb)]);
    const names = new Set<string>();
    for (const e of A.entries) names.add(e.name);
    for (const e of B.entries) names.add(e.name);
    for (const name of [...names].sort()) {
      const ea = findEntry(A.entries, name);
      const eb = findEntry(B.entries, name);
      const p = joinPath(prefix, name);
      if (ea && eb && ea.kind === "dir" && eb.kind === "dir") {
        await walk(ea.tree, eb.tree, p);
        if (ea.mode !== eb.mode && ea.tree === eb.tree) out.modified.push(p + "/");
      } else if (ea && eb && ea.kind !== "dir" && eb.kind !== "dir") {
        if (!contentEqual(ea, eb) || ea.mode !== eb.mode || !sameXattrs(ea, eb)) out.modified.push(p);
      } else {
        if (ea) await leaves(a, ea, p, out.removed);
        if (eb) await leaves(b, eb, p, out.added);
      }
    }
  };
  await walk(a.root, b.root, "");
  return out;
}

function contentEqual(a: Entry, b: Entry): boolean {
  if (a.kind === "file" && b.kind === "file") {
    if (a.size !== b.size || a.chunks.length !== b.chunks.length) return false;
    return a.chunks.every((c, i) => c.id === b.chunks[i]!.id);
  }
  if (a.kind === "symlink" && b.kind === "symlink") return a.target === b.target;
  return false;
}

function sameXattrs(a: Entry, b: Entry): boolean {
  const ka = Object.keys(a.xattrs ?? {}).sort();
  const kb = Object.keys(b.xattrs ?? {}).sort();
  if (ka.join("\0") !== kb.join("\0")) return false;
  return ka.every((k) => Buffer.compare(Buffer.from(a.xattrs![k]!), Buffer.from(b.xattrs![k]!)) === 0);
}
