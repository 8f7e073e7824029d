/**
 * Trees: a directory's entries, encoded canonically and named by the blake3 hash of the encoding.
 *
 * Encoding (format 1), UTF-8 JSON with no white space:
 *   {"v":1,"e":[ENTRY,...]}   entries sorted by name, compared as UTF-8 bytes
 *   file:    [name, "f", mode, mtimeMs, size, [[chunkId, length], ...], extras?]   (≤ 16 chunks)
 *            [name, "f", mode, mtimeMs, size, listId, extras?]                   (more chunks)
 *   symlink: [name, "l", mode, mtimeMs, target, extras?]
 *   dir:     [name, "d", mode, mtimeMs, treeId, files, bytes, extras?]
 * extras, present only when something is in it: {"g":gid,"u":uid,"x":{name: base64 value}}
 * with keys sorted (uid/gid only when not 0, xattrs only when there are some).
 * `files` and `bytes` of a dir entry are the totals of its subtree (files and symlinks counted),
 * so a version knows its size without walking. Equal directories encode to equal bytes, so an
 * unchanged subtree keeps its id and a change rewrites only the trees on its path to the root.
 * A file of more than LIST_THRESHOLD chunks keeps its chunk list in an object of its own,
 * {"v":1,"c":[[chunkId, length], ...]} named by its blake3 hash and stored like a tree, so that
 * editing one large file does not rewrite the chunk lists of its siblings (a directory of 64
 * files of 16 MiB would otherwise be a 1 MiB tree). Decoded entries carry `list` until a
 * Snapshot resolves it into `chunks`.
 */
import { hash } from "blake3";
import type { ChunkRef } from "../chunk/index.js";
export type { ChunkRef } from "../chunk/index.js";
import { VolumeError } from "../errors.js";


interface EntryBase {
  /** The entry's name inside its directory. */
  name: string;
  /** Permission bits (e.g. 0o644), without the file type. */
  mode: number;
  /** Modification time, milliseconds since the epoch. */
  mtime: number;
  /** Extended attributes: name → value. */
  xattrs?: Record<string, Uint8Array>;
  /** Owner user id; absent means 0. */
  uid?: number;
  /** Owner group id; absent means 0. */
  gid?: number;
}

/** A regular file: its bytes are the concatenation of its chunks. */
export interface FileEntry extends EntryBase {
  kind: "file";
  size: number;
  chunks: ChunkRef[];
  /**
   * Set only on an entry fresh from `decodeTree` whose chunk list is stored apart: the list's
   * object id; `chunks` is empty until resolved (Snapshot does it before handing entries out).
   */
  list?: string;
}

/** Files with more chunks than this keep their chunk list in an object of its own. */
export const LIST_THRESHOLD = 16;

/** A symbolic link. */
export interface SymlinkEntry extends EntryBase {
  kind: "symlink";
  target: string;
}

/** A directory: its entries are in the tree `tree`. */
export interface DirEntry extends EntryBase {
  kind: "dir";
  tree: string;
  /** Files and symlinks in the subtree. */
  files: number;
  /** Bytes of the regular files in the subtree. */
  bytes: number;
}

export type Entry = FileEntry | SymlinkEntry | DirEntry;
export type EntryKind = Entry["kind"];

/** A decoded tree: entries sorted by name. */
export interface Tree {
  id: string;
  entries: Entry[];
}

/** An encoded tree ready to store. */
export interface EncodedTree {
  id: string;
  data: Uint8Array;
  /** Chunk-list objects of the tree's large files, to store with it. */
  lists: { id: string; data: Uint8Array }[];
  /** Files and symlinks in the whole subtree. */
  files: number;
  /** Bytes of regular files in the whole subtree. */
  bytes: number;
}

/** Compares two names as UTF-8 byte strings (the canonical order). */
export function compareNames(a: string, b: string): number {
  if (a === b) return 0;
  // UTF-16 code-unit order equals UTF-8 byte order except around surrogates (U+D800..U+FFFF).
  if (!NON_BMP_ORDER.test(a) && !NON_BMP_ORDER.test(b)) return a < b ? -1 : 1;
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

const NON_BMP_ORDER = /[\ud800-\uffff]/;

function encodeXattrs(x: Record<string, Uint8Array> | undefined): Record<string, string> | undefined {
  if (!x) return undefined;
  const keys = Object.keys(x).sort();
  if (keys.length === 0) return undefined;
  const out: Record<string, string> = {};
  for (const k of keys) out[k] = Buffer.from(x[k]!).toString("base64");
  return out;
}

function decodeXattrs(x: unknown): Record<string, Uint8Array> | undefined {
  if (x === undefined || x === null) return undefined;
  const out: Record<string, Uint8Array> = {};
  for (const [k, v] of Object.entries(x as Record<string, string>)) out[k] = Buffer.from(v, "base64");
  return out;
}

function encodeExtras(e: Entry): Record<string, unknown> | undefined {
  const out: Record<string, unknown> = {};
  if (e.gid) out.g = e.gid;
  if (e.uid) out.u = e.uid;
  const x = encodeXattrs(e.xattrs);
  if (x) out.x = x;
  return Object.keys(out).length > 0 ? out : undefined;
}

function applyExtras<T extends Entry>(e: T, extras: unknown): T {
  if (extras === undefined || extras === null) return e;
  const o = extras as { g?: number; u?: number; x?: unknown };
  if (o.g) e.gid = o.g;
  if (o.u) e.uid = o.u;
  const x = decodeXattrs(o.x);
  if (x) e.xattrs = x;
  return e;
}

/** Encodes a chunk list object. */
export function encodeChunkList(chunks: readonly ChunkRef[]): { id: string; data: Uint8Array } {
  const data = Buffer.from(JSON.stringify({ v: 1, c: chunks.map((c) => [c.id, c.length]) }));
  return { id: blake3Hex(data), data };
}

/** Decodes a chunk list object and checks its id. Throws CORRUPT. */
export function decodeChunkList(data: Uint8Array, id: string): ChunkRef[] {
  if (blake3Hex(data) !== id) throw VolumeError.CORRUPT(`chunk list ${id}`);
  try {
    const doc = JSON.parse(Buffer.from(data).toString("utf8")) as { v: number; c: [string, number][] };
    if (doc.v !== 1 || !Array.isArray(doc.c)) throw new Error("unknown chunk list format");
    return doc.c.map(([cid, length]) => ({ id: cid, length }));
  } catch (err) {
    throw VolumeError.CORRUPT(`chunk list ${id}`, { cause: err });
  }
}

function encodeEntry(e: Entry, lists?: { id: string; data: Uint8Array }[]): unknown[] {
  const x = encodeExtras(e);
  let row: unknown[];
  switch (e.kind) {
    case "file":
      if (e.list !== undefined && e.chunks.length === 0) throw new VolumeError("INVALID_ARGUMENT", `encode tree: file ${JSON.stringify(e.name)} has an unresolved chunk list`);
      if (e.chunks.length > LIST_THRESHOLD) {
        const l = encodeChunkList(e.chunks);
        lists?.push(l);
        row = [e.name, "f", e.mode, e.mtime, e.size, l.id];
      } else row = [e.name, "f", e.mode, e.mtime, e.size, e.chunks.map((c) => [c.id, c.length])];
      break;
    case "symlink":
      row = [e.name, "l", e.mode, e.mtime, e.target];
      break;
    case "dir":
      row = [e.name, "d", e.mode, e.mtime, e.tree, e.files, e.bytes];
      break;
  }
  if (x) row.push(x);
  return row;
}

/** The blake3 hex digest of bytes. */
export function blake3Hex(data: Uint8Array): string {
  return hash(data).toString("hex");
}

/** Encodes entries (sorted here) into a tree blob with its id and subtree totals. */
export function encodeTree(entries: readonly Entry[]): EncodedTree {
  const sorted = [...entries].sort((a, b) => compareNames(a.name, b.name));
  let files = 0;
  let bytes = 0;
  for (let i = 0; i < sorted.length; i++) {
    const e = sorted[i]!;
    if (i > 0 && sorted[i - 1]!.name === e.name) throw new VolumeError("INVALID_ARGUMENT", `encode tree: duplicate name ${JSON.stringify(e.name)}`);
    if (e.kind === "dir") {
      files += e.files;
      bytes += e.bytes;
    } else {
      files += 1;
      if (e.kind === "file") bytes += e.size;
    }
  }
  const lists: { id: string; data: Uint8Array }[] = [];
  const data = Buffer.from(JSON.stringify({ v: 1, e: sorted.map((e) => encodeEntry(e, lists)) }));
  return { id: blake3Hex(data), data, lists, files, bytes };
}

/** Decodes a tree blob; verifies its id unless `id` is omitted. Throws CORRUPT. */
export function decodeTree(data: Uint8Array, id?: string): Tree {
  const actual = blake3Hex(data);
  if (id !== undefined && actual !== id) throw VolumeError.CORRUPT(`tree ${id}`);
  let doc: { v: number; e: unknown[][] };
  try {
    doc = JSON.parse(Buffer.from(data).toString("utf8"));
  } catch (err) {
    throw VolumeError.CORRUPT(`tree ${actual}`, { cause: err });
  }
  if (doc.v !== 1 || !Array.isArray(doc.e)) throw VolumeError.CORRUPT(`tree ${actual}`, { details: "unknown tree format" });
  const entries: Entry[] = doc.e.map((r) => {
    const [name, k, mode, mtime] = r as [string, string, number, number];
    switch (k) {
      case "f":
        if (typeof r[5] === "string") return applyExtras<FileEntry>({ kind: "file", name, mode, mtime, size: r[4] as number, chunks: [], list: r[5] }, r[6]);
        return applyExtras<FileEntry>({ kind: "file", name, mode, mtime, size: r[4] as number, chunks: (r[5] as [string, number][]).map(([cid, length]) => ({ id: cid, length })) }, r[6]);
      case "l":
        return applyExtras<SymlinkEntry>({ kind: "symlink", name, mode, mtime, target: r[4] as string }, r[5]);
      case "d":
        return applyExtras<DirEntry>({ kind: "dir", name, mode, mtime, tree: r[4] as string, files: r[5] as number, bytes: r[6] as number }, r[7]);
      default:
        throw VolumeError.CORRUPT(`tree ${actual}`, { details: `unknown entry kind ${String(k)}` });
    }
  });
  return { id: actual, entries };
}

/** The empty tree, the root of a volume with no files. */
export const EMPTY_TREE: EncodedTree = encodeTree([]);

/** True when two entries are the same in every recorded field (name aside). */
export function sameEntry(a: Entry | undefined, b: Entry | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  const ea = encodeEntry({ ...a, name: "" });
  const eb = encodeEntry({ ...b, name: "" });
  return JSON.stringify(ea) === JSON.stringify(eb);
}

/** Binary search of a sorted entry list by name. */
export function findEntry(entries: readonly Entry[], name: string): Entry | undefined {
  let lo = 0;
  let hi = entries.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const c = compareNames(entries[mid]!.name, name);
    if (c === 0) return entries[mid];
    if (c < 0) lo = mid + 1;
    else hi = mid - 1;
  }
  return undefined;
}
