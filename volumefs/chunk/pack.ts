/**
 * The pack object format: many chunks and trees appended into one object `packs/<id>`.
 *
 * Layout (all integers little-endian):
 *
 *   data     entry bytes, back to back, in index order, from offset 0
 *   index    count × 48-byte records:
 *              id       32 bytes   raw blake3 digest of the entry's bytes
 *              kind      1 byte    0 = chunk, 1 = tree
 *              zero      3 bytes
 *              offset    8 bytes   u64, offset of the entry in the pack
 *              length    4 bytes   u32
 *   trailer  40 bytes:
 *              indexHash 16 bytes  first 16 bytes of blake3(index)
 *              indexLen   4 bytes  u32, = count × 48
 *              count      4 bytes  u32
 *              version    4 bytes  u32, PACK_FORMAT_VERSION
 *              zero       4 bytes
 *              magic      8 bytes  "STRATPAK"
 *
 * Invariants: entries are contiguous from 0 in index order (entry k starts where k-1 ends and the
 * data area ends where the index starts); ids are unique within a pack; every entry's bytes hash
 * to its id; the pack id is blake3 hex of the whole pack. The index is read from the tail with
 * ranged GETs (head for the size, then the last bytes), so `fsck --rebuild` can rebuild the chunk
 * index and the trees from the bucket alone. Entries are stored uncompressed (format version 1).
 */
import { hash } from "blake3";
import { VolumeError } from "../errors.js";
import type { ObjectStore } from "../object/types.js";
import type { PackEntryKind } from "./types.js";

/** Version written into every pack's trailer; readers reject other versions. */
export const PACK_FORMAT_VERSION = 1;
/** Size of the fixed trailer at the end of every pack. */
export const PACK_TRAILER_BYTES = 40;
/** Size of one index record. */
export const PACK_INDEX_ENTRY_BYTES = 48;
const MAGIC = Buffer.from("STRATPAK", "latin1");

/** One entry of a pack. */
export interface PackEntry {
  /** blake3 hex of the entry's bytes. */
  id: string;
  kind: PackEntryKind;
  /** Byte offset in the pack. */
  offset: number;
  /** Length in bytes. */
  length: number;
}

/** A finished pack, ready to upload under `packKey(id)`. */
export interface BuiltPack {
  /** blake3 hex of `bytes`. */
  id: string;
  bytes: Uint8Array;
  entries: PackEntry[];
}

/** A pack's index as read from the store. */
export interface PackIndex {
  id: string;
  /** Size of the whole pack object. */
  size: number;
  entries: PackEntry[];
}

/** The object key of a pack: `packs/<id>`. */
export function packKey(id: string): string {
  return `packs/${id}`;
}

/**
 * Builds one pack in memory. `add` copies the entry's bytes into the pack's buffer at once (the
 * caller may reuse them when it returns); `finish` appends the index and the trailer. The caller
 * gives the id of each entry (its blake3 hex).
 */
export class PackBuilder {
  private buf: Uint8Array = new Uint8Array(0);
  private readonly list: PackEntry[] = [];
  private readonly ids = new Set<string>();
  private bytes = 0;

  /**
   * `alloc(min)` gives the buffer the pack is laid out in: at least `min` bytes, any old contents
   * (a larger one saves growing it later). Default: a new buffer.
   */
  constructor(private readonly alloc: (min: number) => Uint8Array = (min) => new Uint8Array(Math.max(min, 64 * 1024))) {}

  /** Bytes of entry data added so far (the pack is larger by the index and trailer). */
  get size(): number {
    return this.bytes;
  }

  /** Number of entries added. */
  get count(): number {
    return this.list.length;
  }

  /** Size of the pack `finish` lays out: entries, index and trailer. */
  get packBytes(): number {
    return this.bytes + this.list.length * PACK_INDEX_ENTRY_BYTES + PACK_TRAILER_BYTES;
  }

  /** True when an entry with this id was added. */
  has(id: string): boolean {
    return this.ids.has(id);
  }

  /** Appends a copy of an entry; returns false (and adds nothing) when the id is already in this pack. */
  add(id: string, kind: PackEntryKind, data: Uint8Array): boolean {
    if (this.ids.has(id)) return false;
    if (!/^[0-9a-f]{64}$/.test(id)) throw new VolumeError("INVALID_ARGUMENT", `add pack entry: bad id ${JSON.stringify(id)}`);
    this.ids.add(id);
    this.list.push({ id, kind, offset: this.bytes, length: data.length });
    this.reserve(this.bytes + data.length + PACK_INDEX_ENTRY_BYTES * this.list.length + PACK_TRAILER_BYTES);
    this.buf.set(data, this.bytes);
    this.bytes += data.length;
    return true;
  }

  private reserve(n: number): void {
    if (n <= this.buf.length) return;
    const next = this.buf.length === 0 ? this.alloc(n) : new Uint8Array(Math.max(n, 2 * this.buf.length));
    if (next.length < n) throw new VolumeError("INVALID_ARGUMENT", `build pack: buffer of ${next.length} bytes, need ${n}`);
    next.set(this.buf.subarray(0, this.bytes));
    this.buf = next;
  }

  /** Lays out the index and trailer after the entries and names the pack. The builder must not be used afterwards. */
  finish(): BuiltPack {
    const indexLen = this.list.length * PACK_INDEX_ENTRY_BYTES;
    const total = this.bytes + indexLen + PACK_TRAILER_BYTES;
    this.reserve(total);
    const out = this.buf.subarray(0, total);
    let at = this.bytes;
    const view = new DataView(out.buffer, out.byteOffset, out.byteLength);
    for (const e of this.list) {
      out.set(Buffer.from(e.id, "hex"), at);
      out[at + 32] = e.kind === "tree" ? 1 : 0;
      out.fill(0, at + 33, at + 36);
      view.setBigUint64(at + 36, BigInt(e.offset), true);
      view.setUint32(at + 44, e.length, true);
      at += PACK_INDEX_ENTRY_BYTES;
    }
    const index = out.subarray(this.bytes, this.bytes + indexLen);
    out.set(hash(index).subarray(0, 16), at);
    view.setUint32(at + 16, indexLen, true);
    view.setUint32(at + 20, this.list.length, true);
    view.setUint32(at + 24, PACK_FORMAT_VERSION, true);
    view.setUint32(at + 28, 0, true);
    out.set(MAGIC, at + 32);
    this.buf = new Uint8Array(0);
    return { id: hash(out).toString("hex"), bytes: out, entries: this.list.slice() };
  }
}

interface Trailer {
  indexHash: Uint8Array;
  indexLen: number;
  count: number;
}

function corrupt(packId: string, why: string): VolumeError {
  return new VolumeError("CORRUPT", `read pack ${packId}: ${why}`, {
    op: "read pack",
    path: packKey(packId),
    hint: "run `strata fsck` to find damaged objects",
  });
}

function parseTrailer(packId: string, t: Uint8Array, size: number): Trailer {
  if (t.length !== PACK_TRAILER_BYTES) throw corrupt(packId, "short trailer");
  const view = new DataView(t.buffer, t.byteOffset, t.byteLength);
  if (Buffer.compare(Buffer.from(t.subarray(32, 40)), MAGIC) !== 0) throw corrupt(packId, "bad magic");
  const version = view.getUint32(24, true);
  if (version !== PACK_FORMAT_VERSION) {
    throw new VolumeError("CORRUPT", `read pack ${packId}: unsupported format version ${version}`, {
      hint: "upgrade strata to read this pack",
    });
  }
  const indexLen = view.getUint32(16, true);
  const count = view.getUint32(20, true);
  if (indexLen !== count * PACK_INDEX_ENTRY_BYTES || indexLen + PACK_TRAILER_BYTES > size) {
    throw corrupt(packId, "index length out of range");
  }
  return { indexHash: t.slice(0, 16), indexLen, count };
}

function parseIndex(packId: string, index: Uint8Array, tr: Trailer, size: number): PackEntry[] {
  if (Buffer.compare(hash(index).subarray(0, 16), Buffer.from(tr.indexHash)) !== 0) throw corrupt(packId, "index hash mismatch");
  const dataEnd = size - PACK_TRAILER_BYTES - tr.indexLen;
  const view = new DataView(index.buffer, index.byteOffset, index.byteLength);
  const entries: PackEntry[] = [];
  let expect = 0;
  for (let k = 0; k < tr.count; k++) {
    const at = k * PACK_INDEX_ENTRY_BYTES;
    const kindByte = index[at + 32];
    if (kindByte !== 0 && kindByte !== 1) throw corrupt(packId, `entry ${k}: unknown kind ${kindByte}`);
    const offset = Number(view.getBigUint64(at + 36, true));
    const length = view.getUint32(at + 44, true);
    if (offset !== expect || offset + length > dataEnd) throw corrupt(packId, `entry ${k}: range out of order or out of bounds`);
    expect = offset + length;
    entries.push({ id: Buffer.from(index.subarray(at, at + 32)).toString("hex"), kind: kindByte === 1 ? "tree" : "chunk", offset, length });
  }
  if (expect !== dataEnd) throw corrupt(packId, "entries do not cover the data area");
  return entries;
}

/**
 * Parses a whole pack held in memory: checks that it hashes to `expectId` (when given), the
 * trailer, the index, and every entry's hash. Throws VolumeError CORRUPT on any mismatch.
 */
export function parsePack(bytes: Uint8Array, expectId?: string): PackIndex {
  const id = hash(bytes).toString("hex");
  if (expectId !== undefined && id !== expectId) throw corrupt(expectId, "content does not match its hash");
  const size = bytes.length;
  if (size < PACK_TRAILER_BYTES) throw corrupt(id, "shorter than its trailer");
  const tr = parseTrailer(id, bytes.subarray(size - PACK_TRAILER_BYTES), size);
  const entries = parseIndex(id, bytes.subarray(size - PACK_TRAILER_BYTES - tr.indexLen, size - PACK_TRAILER_BYTES), tr, size);
  for (const e of entries) {
    if (hash(bytes.subarray(e.offset, e.offset + e.length)).toString("hex") !== e.id) throw corrupt(id, `entry ${e.id} does not match its hash`);
  }
  return { id, size, entries };
}

/**
 * Reads a pack's index from the store with ranged GETs of its tail (one GET when the index is
 * within `tailGuess` bytes, else two). Throws VolumeError NOT_FOUND when the pack is missing and
 * CORRUPT when its trailer or index is damaged. Entry bytes are not verified here.
 */
export async function readPackIndex(store: ObjectStore, packId: string, tailGuess = 64 * 1024): Promise<PackIndex> {
  const key = packKey(packId);
  const head = await store.head(key);
  if (!head) throw VolumeError.NOT_FOUND(key, { op: "read pack index", path: key });
  const size = head.size;
  if (size < PACK_TRAILER_BYTES) throw corrupt(packId, "shorter than its trailer");
  const firstLen = Math.min(size, Math.max(tailGuess, PACK_TRAILER_BYTES));
  let tail = await store.get(key, { offset: size - firstLen, length: firstLen });
  if (tail.length !== firstLen) throw corrupt(packId, "short read of its tail");
  const tr = parseTrailer(packId, tail.subarray(firstLen - PACK_TRAILER_BYTES), size);
  const need = tr.indexLen + PACK_TRAILER_BYTES;
  if (need > firstLen) {
    const rest = await store.get(key, { offset: size - need, length: need - firstLen });
    if (rest.length !== need - firstLen) throw corrupt(packId, "short read of its index");
    tail = Buffer.concat([rest, tail]);
  }
  const index = tail.subarray(tail.length - need, tail.length - PACK_TRAILER_BYTES);
  return { id: packId, size, entries: parseIndex(packId, index, tr, size) };
}
