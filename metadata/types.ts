/**
 * The `MetadataStore` seam: the fast index of what the bucket holds.
 *
 * Everything here except a volume's head pointer is immutable and content-addressed (ids are
 * lowercase hex blake3 digests), so every `put*` is idempotent: putting the same id twice is a
 * no-op, never an error. The only mutable state is a volume's head, moved by compare-and-swap.
 * All of it can be rebuilt from the bucket (`strata fsck --rebuild`).
 */

/** A volume: a name inside an environment (tenant) and a head version. */
export interface VolumeRecord {
  /** The environment (tenant) the volume lives in, e.g. "main". */
  env: string;
  /** The volume's name, unique inside its environment. */
  name: string;
  /** The head version id, or null for a volume with no version yet. */
  head: string | null;
  /** The volume it was forked from, or null. */
  forkedFrom: { volume: string; version: string | null } | null;
  /** Creation time, milliseconds since the epoch. */
  createdAt: number;
  /**
   * The number of head moves so far (0 for a new volume). Every head move increments it; it
   * names the ref object in the bucket (`refs/<env>/<name>/<seq>`).
   */
  seq: number;
}

/** One version of a volume: an immutable snapshot named by the blake3 hash of this record. */
export interface VersionRecord {
  /** blake3 hex of the canonical encoding of the other fields. */
  id: string;
  /** The root tree id. */
  root: string;
  /** Parent version ids: none for the first version, two for a merge. */
  parents: string[];
  /** Commit time, milliseconds since the epoch. */
  time: number;
  /** A free-text message. */
  message: string;
  /** Provenance labels: host, mount, sandbox, run id, … */
  labels: Record<string, string>;
  /** Number of files (regular files and symlinks) in the tree. */
  files: number;
  /** Total bytes of the regular files in the tree. */
  bytes: number;
}

/** A pack object in the bucket: many chunks and trees appended into one object. */
export interface PackRecord {
  /** The pack id (blake3 hex of its bytes); the object key is `packs/<id>`. */
  id: string;
  /** Total size of the pack object in bytes. */
  size: number;
  /** When it was written, milliseconds since the epoch. */
  createdAt: number;
}

/** Where a chunk's bytes are: a byte range of a pack. */
export interface ChunkLocation {
  /** The chunk id: blake3 hex of its (uncompressed) bytes. */
  id: string;
  /** The pack that holds it. */
  pack: string;
  /** Byte offset of the chunk inside the pack. */
  offset: number;
  /** Length of the stored bytes in the pack. */
  length: number;
}

/** An encoded tree node: a directory's canonical entries, named by its blake3 hash. */
export interface TreeBlob {
  id: string;
  data: Uint8Array;
}

/** Everything a sync commits, applied in one transaction. */
export interface CommitRequest {
  env: string;
  volume: string;
  /** The head the caller built on; the commit fails (returns ok: false) if the head moved. */
  expectedHead: string | null;
  /** The new version, which becomes the head. */
  version: VersionRecord;
  /** The new trees the version references (idempotent). */
  trees: TreeBlob[];
}

/** The result of a commit: ok, or the head that is there now. */
export type CommitResult =
  | { ok: true; volume: VolumeRecord }
  | { ok: false; head: string | null };

export interface MetadataStore {
  /**
   * Creates a volume; throws MetadataError ALREADY_EXISTS if the name is taken in `env`.
   * `seq` defaults to 0; a rebuild from the bucket passes the seq it found there.
   */
  createVolume(v: Omit<VolumeRecord, "seq"> & { seq?: number }): Promise<VolumeRecord>;
  /** The volume, or undefined when there is none of that name. */
  getVolume(env: string, name: string): Promise<VolumeRecord | undefined>;
  /** All volumes of an environment, sorted by name. */
  listVolumes(env: string): Promise<VolumeRecord[]>;
  /** Deletes a volume's name (its versions stay); true if it existed. Idempotent. */
  deleteVolume(env: string, name: string): Promise<boolean>;
  /**
   * Moves a volume's head from `expected` to `next` atomically and increments its seq.
   * Returns ok: false with the current head when the head is not `expected` (nothing changes).
   * Throws NOT_FOUND for an unknown volume.
   */
  casHead(env: string, name: string, expected: string | null, next: string): Promise<CommitResult>;
  /**
   * One transaction: puts the trees and the version, then compare-and-swaps the head.
   * When the head moved, nothing at all is written and ok: false tells the current head.
   */
  commit(req: CommitRequest): Promise<CommitResult>;

  /** Stores a version record (idempotent). */
  putVersion(v: VersionRecord): Promise<void>;
  /** The version, or undefined. */
  getVersion(id: string): Promise<VersionRecord | undefined>;
  /** Every version, sorted by id, parents in order (for fsck). */
  listVersions(): Promise<VersionRecord[]>;
  /** Ids of all versions whose id starts with `prefix` (at most `limit`, default 10). */
  findVersions(prefix: string, limit?: number): Promise<string[]>;

  /** Stores tree blobs (idempotent), in one transaction. */
  putTrees(trees: TreeBlob[]): Promise<void>;
  /** The tree's bytes, or undefined. */
  getTree(id: string): Promise<Uint8Array | undefined>;

  /** Records a pack and the locations of the chunks (and trees) in it, in one transaction. */
  putPack(pack: PackRecord, chunks: ChunkLocation[]): Promise<void>;
  /** Locations of the given chunk ids that are known; unknown ids are absent from the map. */
  getChunks(ids: readonly string[]): Promise<Map<string, ChunkLocation>>;
  /** All packs, sorted by id. */
  listPacks(): Promise<PackRecord[]>;

  /** Closes the store; idempotent. */
  close(): Promise<void>;
}
