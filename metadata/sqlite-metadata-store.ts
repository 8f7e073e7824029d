/**
 * `SqliteMetadataStore`: the `MetadataStore` on one SQLite file (better-sqlite3).
 *
 * Concurrency: the file is shared by every Strata process of a host (the CLI, mounts, the SDK).
 * It runs in WAL mode, so readers never wait for the writer. Every write is one
 * `BEGIN IMMEDIATE` transaction: the write lock is taken before the first read, so a
 * read-modify-write (compare-and-swap of a head) never has to upgrade a read snapshot, which is
 * what makes SQLite fail with "database is locked" without waiting. A writer that finds the lock
 * taken waits up to `busyTimeoutMs` inside SQLite, then this class retries with backoff
 * `busyRetries` times, then throws MetadataError BUSY.
 *
 * better-sqlite3 is synchronous; the async methods run each statement on the caller's thread and
 * only ever await between retries. Schema: see migrations.ts.
 */
import { existsSync, mkdirSync, renameSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type Database from "better-sqlite3";
import { MetadataError } from "./errors.js";
import { migrate } from "./migrations.js";
import { isBusy, toMetadataError } from "./sqlite-errors.js";
import type {
  ChunkLocation,
  CommitRequest,
  CommitResult,
  MetadataStore,
  PackRecord,
  TreeBlob,
  VersionRecord,
  VolumeRecord,
} from "./types.js";

/** Options of `SqliteMetadataStore.open`. */
export interface SqliteMetadataStoreOptions {
  /** The database file; its parent directories are created. ":memory:" for a private in-memory database. */
  path: string;
  /** How long SQLite itself waits for a lock before reporting busy, in milliseconds. Default 5000. */
  busyTimeoutMs?: number;
  /** How many times a busy operation is retried, with backoff, before MetadataError BUSY. Default 8. */
  busyRetries?: number;
}

/** Ids per `IN (…)` list in `getChunks`; well below SQLite's limit on bound parameters. */
const IN_BATCH = 500;

const BACKOFF_BASE_MS = 5;
const BACKOFF_MAX_MS = 250;

interface VolumeRow {
  env: string;
  name: string;
  head: string | null;
  forked_from_volume: string | null;
  forked_from_version: string | null;
  created_at: number;
  seq: number;
}

interface VersionRow {
  id: string;
  root: string;
  time: number;
  message: string;
  labels: string;
  files: number;
  bytes: number;
}

interface ChunkRow {
  id: string;
  pack: string;
  offset: number;
  length: number;
}

let sqliteModule: typeof Database | undefined;

/**
 * better-sqlite3, loaded on the first open rather than with this module: every layer's errors
 * come through metadata/index.ts, and commands that never open a database (`strata run`) should
 * not load the native addon. The agent's sandbox store loads it through here too.
 */
export function loadSqlite(): typeof Database {
  sqliteModule ??= createRequire(import.meta.url)("better-sqlite3") as typeof Database;
  return sqliteModule;
}

function prepareAll(db: Database.Database) {
  return {
    insertEnv: db.prepare("INSERT OR IGNORE INTO environments (name, created_at) VALUES (?, ?)"),
    insertVolume: db.prepare(
      `INSERT OR IGNORE INTO volumes (env, name, head, forked_from_volume, forked_from_version, created_at, seq)
       VALUES (@env, @name, @head, @forkedFromVolume, @forkedFromVersion, @createdAt, @seq)`,
    ),
    getVolume: db.prepare("SELECT * FROM volumes WHERE env = ? AND name = ?"),
    listVolumes: db.prepare("SELECT * FROM volumes WHERE env = ? ORDER BY name"),
    deleteVolume: db.prepare("DELETE FROM volumes WHERE env = ? AND name = ?"),
    moveHead: db.prepare("UPDATE volumes SET head = ?, seq = seq + 1 WHERE env = ? AND name = ?"),
    insertVersion: db.prepare(
      `INSERT OR IGNORE INTO versions (id, root, time, message, labels, files, bytes)
       VALUES (@id, @root, @time, @message, @labels, @files, @bytes)`,
    ),
    insertParent: db.prepare("INSERT OR IGNORE INTO version_parents (version, idx, parent) VALUES (?, ?, ?)"),
    getVersion: db.prepare("SELECT * FROM versions WHERE id = ?"),
    getParents: db.prepare("SELECT parent FROM version_parents WHERE version = ? ORDER BY idx"),
    listVersions: db.prepare("SELECT * FROM versions ORDER BY id"),
    listParents: db.prepare("SELECT version, parent FROM version_parents ORDER BY version, idx"),
    findVersionsFrom: db.prepare("SELECT id FROM versions WHERE id >= ? ORDER BY id LIMIT ?"),
    findVersionsRange: db.prepare("SELECT id FROM versions WHERE id >= ? AND id < ? ORDER BY id LIMIT ?"),
    insertTree: db.prepare("INSERT OR IGNORE INTO trees (id, data) VALUES (?, ?)"),
    getTree: db.prepare("SELECT data FROM trees WHERE id = ?"),
    insertPack: db.prepare("INSERT OR IGNORE INTO packs (id, size, created_at) VALUES (?, ?, ?)"),
    insertChunk: db.prepare("INSERT OR IGNORE INTO chunks (id, pack, offset, length) VALUES (?, ?, ?, ?)"),
    listPacks: db.prepare("SELECT id, size, created_at FROM packs ORDER BY id"),
  };
}

type Statements = ReturnType<typeof prepareAll>;

function toVolume(row: VolumeRow): VolumeRecord {
  return {
    env: row.env,
    name: row.name,
    head: row.head,
    forkedFrom:
      row.forked_from_volume === null
        ? null
        : { volume: row.forked_from_volume, version: row.forked_from_version },
    createdAt: row.created_at,
    seq: row.seq,
  };
}

function toVersion(row: VersionRow, parents: string[]): VersionRecord {
  let labels: Record<string, string>;
  try {
    labels = JSON.parse(row.labels) as Record<string, string>;
  } catch (err) {
    throw new MetadataError("CORRUPT", `read version ${row.id}: labels are not json`, { cause: err });
  }
  return {
    id: row.id,
    root: row.root,
    parents,
    time: row.time,
    message: row.message,
    labels,
    files: row.files,
    bytes: row.bytes,
  };
}

function blob(data: Uint8Array): Buffer {
  return Buffer.isBuffer(data) ? data : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
}

/** The smallest string greater than every string that starts with `prefix`, or undefined for "". */
function prefixEnd(prefix: string): string | undefined {
  if (prefix === "") return undefined;
  const last = prefix.charCodeAt(prefix.length - 1);
  return prefix.slice(0, -1) + String.fromCharCode(last + 1);
}

function sleepSync(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

function backoffMs(attempt: number): number {
  const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** attempt);
  return cap / 2 + Math.random() * (cap / 2);
}

/**
 * The `MetadataStore` on a local SQLite file, safe to share between the processes of one host.
 * Construct with `SqliteMetadataStore.open`.
 */
export class SqliteMetadataStore implements MetadataStore {
  readonly #db: Database.Database;
  readonly #st: Statements;
  readonly #retries: number;
  readonly #inBatch = new Map<number, Database.Statement>();
  #closed = false;

  private constructor(db: Database.Database, retries: number) {
    this.#db = db;
    this.#retries = retries;
    this.#st = prepareAll(db);
  }

  /**
   * Opens (creating if needed) the database at `opts.path`, sets WAL mode and applies pending
   * migrations. Throws MetadataError SCHEMA_TOO_NEW for a database written by a newer Strata,
   * CORRUPT for a file that is not a database, BUSY when the file stays locked, IO otherwise.
   */
  static open(opts: SqliteMetadataStoreOptions): SqliteMetadataStore {
    const busyTimeoutMs = opts.busyTimeoutMs ?? 5000;
    const retries = opts.busyRetries ?? 8;
    const op = `open metadata ${opts.path}`;
    let db: Database.Database;
    try {
      if (opts.path !== ":memory:") mkdirSync(dirname(opts.path), { recursive: true });
      db = new (loadSqlite())(opts.path, { timeout: busyTimeoutMs });
    } catch (err) {
      throw toMetadataError(op, err);
    }
    for (let attempt = 0; ; attempt++) {
      try {
        db.pragma("journal_mode = WAL");
        // WAL + synchronous=NORMAL: a commit is durable once it is in the WAL file, which survives
        // a crash of any process; only a power loss can drop the last commits, and after a power
        // loss the bucket, not this file, is the source of truth (`strata fsck --rebuild`).
        db.pragma("synchronous = NORMAL");
        db.pragma("foreign_keys = OFF");
        migrate(db);
        return new SqliteMetadataStore(db, retries);
      } catch (err) {
        const busy = isBusy(err) || (err instanceof MetadataError && err.code === "BUSY");
        if (busy && attempt < retries) {
          sleepSync(backoffMs(attempt));
          continue;
        }
        db.close();
        throw toMetadataError(op, err);
      }
    }
  }

  /**
   * Checkpoints the database at `path` into its file, and refuses with BUSY while another
   * connection has it open (a mount, an agent). A missing or unreadable database passes.
   */
  static checkpointAlone(path: string): void {
    if (!existsSync(path)) return;
    try {
      const db = new (loadSqlite())(path, { fileMustExist: true, timeout: 1000 });
      try {
        db.pragma("wal_checkpoint(TRUNCATE)");
      } finally {
        db.close();
      }
    } catch {
      return; // unreadable: nothing to checkpoint
    }
    // The last connection to close removes the WAL; one that stays means another holder.
    if (existsSync(`${path}-wal`)) {
      const op = `set aside metadata ${path}`;
      throw new MetadataError("BUSY", `${op}: the database is open in another process`, {
        op,
        hint: "unmount this host's volumes and stop its agents (they hold the database), then try again",
      });
    }
  }

  /**
   * Moves the database at `path` to `to`, with its WAL and shared-memory files, so that another
   * database can take the path (`strata fsck --rebuild`). Nothing is deleted: commits still in the
   * WAL are first checkpointed into the file, and a database SQLite cannot open is moved as found.
   * Refuses with BUSY while another connection has the database open (a mount, an agent): it
   * would go on writing into the moved file. Returns false when there was nothing at `path`.
   */
  static setAside(path: string, to: string): boolean {
    if (!["-wal", "-shm", ""].some((s) => existsSync(path + s))) return false;
    SqliteMetadataStore.checkpointAlone(path);
    try {
      // The WAL before the database: a crash between the two never leaves a database beside another's WAL.
      for (const s of ["-wal", "-shm", ""]) if (existsSync(path + s)) renameSync(path + s, to + s);
    } catch (err) {
      throw toMetadataError(`set aside metadata ${path}`, err);
    }
    return true;
  }

  #live(op: string): Database.Database {
    if (this.#closed) throw new MetadataError("IO", `${op}: metadata store is closed`, { op });
    return this.#db;
  }

  async #write<T>(op: string, fn: () => T): Promise<T> {
    const tx = this.#live(op).transaction(fn);
    for (let attempt = 0; ; attempt++) {
      try {
        return tx.immediate();
      } catch (err) {
        if (isBusy(err) && attempt < this.#retries) {
          await sleep(backoffMs(attempt));
          this.#live(op);
          continue;
        }
        throw toMetadataError(op, err);
      }
    }
  }

  async #read<T>(op: string, fn: () => T): Promise<T> {
    const db = this.#live(op);
    for (let attempt = 0; ; attempt++) {
      try {
        return db.inTransaction ? fn() : db.transaction(fn).deferred();
      } catch (err) {
        if (isBusy(err) && attempt < this.#retries) {
          await sleep(backoffMs(attempt));
          this.#live(op);
          continue;
        }
        throw toMetadataError(op, err);
      }
    }
  }

  #insertVersion(v: VersionRecord): void {
    this.#st.insertVersion.run({
      id: v.id,
      root: v.root,
      time: v.time,
      message: v.message,
      labels: JSON.stringify(v.labels),
      files: v.files,
      bytes: v.bytes,
    });
    v.parents.forEach((p, i) => this.#st.insertParent.run(v.id, i, p));
  }

  #insertTrees(trees: readonly TreeBlob[]): void {
    for (const t of trees) this.#st.insertTree.run(t.id, blob(t.data));
  }

  #volumeRow(env: string, name: string): VolumeRow | undefined {
    return this.#st.getVolume.get(env, name) as VolumeRow | undefined;
  }

  /** Creates a volume (and its environment on first use); throws ALREADY_EXISTS if the name is taken in `env`. */
  async createVolume(v: Omit<VolumeRecord, "seq"> & { seq?: number }): Promise<VolumeRecord> {
    const op = `create volume "${v.env}/${v.name}"`;
    return this.#write(op, () => {
      this.#st.insertEnv.run(v.env, v.createdAt);
      const res = this.#st.insertVolume.run({
        env: v.env,
        name: v.name,
        head: v.head,
        forkedFromVolume: v.forkedFrom?.volume ?? null,
        forkedFromVersion: v.forkedFrom?.version ?? null,
        createdAt: v.createdAt,
        seq: v.seq ?? 0,
      });
      if (res.changes === 0) {
        throw MetadataError.ALREADY_EXISTS(`volume "${v.env}/${v.name}"`, { op, volume: v.name });
      }
      return toVolume(this.#volumeRow(v.env, v.name)!);
    });
  }

  /** The volume, or undefined when there is none of that name. */
  async getVolume(env: string, name: string): Promise<VolumeRecord | undefined> {
    return this.#read(`get volume "${env}/${name}"`, () => {
      const row = this.#volumeRow(env, name);
      return row === undefined ? undefined : toVolume(row);
    });
  }

  /** All volumes of an environment, sorted by name. */
  async listVolumes(env: string): Promise<VolumeRecord[]> {
    return this.#read(`list volumes of "${env}"`, () =>
      (this.#st.listVolumes.all(env) as VolumeRow[]).map(toVolume),
    );
  }

  /** Deletes a volume's name (its versions stay); true if it existed. Idempotent. */
  async deleteVolume(env: string, name: string): Promise<boolean> {
    return this.#write(`delete volume "${env}/${name}"`, () => this.#st.deleteVolume.run(env, name).changes > 0);
  }

  #cas(op: string, env: string, name: string, expected: string | null, next: string, before?: () => void): CommitResult {
    const row = this.#volumeRow(env, name);
    if (row === undefined) throw MetadataError.NOT_FOUND(`volume "${env}/${name}"`, { op, volume: name });
    if (row.head !== expected) return { ok: false, head: row.head };
    before?.();
    this.#st.moveHead.run(next, env, name);
    return { ok: true, volume: toVolume(this.#volumeRow(env, name)!) };
  }

  /**
   * Moves the head from `expected` to `next` and increments seq, in one immediate transaction.
   * ok: false with the current head when it is not `expected`; NOT_FOUND for an unknown volume.
   */
  async casHead(env: string, name: string, expected: string | null, next: string): Promise<CommitResult> {
    const op = `move head of volume "${env}/${name}"`;
    return this.#write(op, () => this.#cas(op, env, name, expected, next));
  }

  /**
   * One immediate transaction: checks the head, then writes the trees, the version and the head
   * move. When the head moved, nothing is written and ok: false tells the current head.
   */
  async commit(req: CommitRequest): Promise<CommitResult> {
    const op = `commit volume "${req.env}/${req.volume}"`;
    return this.#write(op, () =>
      this.#cas(op, req.env, req.volume, req.expectedHead, req.version.id, () => {
        this.#insertTrees(req.trees);
        this.#insertVersion(req.version);
      }),
    );
  }

  /** Stores a version record and its parents (idempotent: an existing id is left as it is). */
  async putVersion(v: VersionRecord): Promise<void> {
    await this.#write(`put version ${v.id}`, () => this.#insertVersion(v));
  }

  /** The version with its parents in order, or undefined. */
  async getVersion(id: string): Promise<VersionRecord | undefined> {
    return this.#read(`get version ${id}`, () => {
      const row = this.#st.getVersion.get(id) as VersionRow | undefined;
      if (row === undefined) return undefined;
      const parents = (this.#st.getParents.all(id) as { parent: string }[]).map((r) => r.parent);
      return toVersion(row, parents);
    });
  }

  /** Every version, sorted by id (for fsck). */
  async listVersions(): Promise<VersionRecord[]> {
    return this.#read("list versions", () => {
      const parents = new Map<string, string[]>();
      for (const r of this.#st.listParents.all() as { version: string; parent: string }[]) {
        const list = parents.get(r.version);
        if (list === undefined) parents.set(r.version, [r.parent]);
        else list.push(r.parent);
      }
      return (this.#st.listVersions.all() as VersionRow[]).map((row) => toVersion(row, parents.get(row.id) ?? []));
    });
  }

  /** Ids of the versions whose id starts with `prefix`, sorted, at most `limit` (default 10); an index range scan. */
  async findVersions(prefix: string, limit = 10): Promise<string[]> {
    return this.#read(`find versions "${prefix}"`, () => {
      const end = prefixEnd(prefix);
      const rows = (
        end === undefined
          ? this.#st.findVersionsFrom.all(prefix, limit)
          : this.#st.findVersionsRange.all(prefix, end, limit)
      ) as { id: string }[];
      return rows.map((r) => r.id);
    });
  }

  /** Stores tree blobs in one transaction (idempotent). */
  async putTrees(trees: TreeBlob[]): Promise<void> {
    if (trees.length === 0) return;
    await this.#write(`put ${trees.length} trees`, () => this.#insertTrees(trees));
  }

  /** The tree's bytes, or undefined. */
  async getTree(id: string): Promise<Uint8Array | undefined> {
    return this.#read(`get tree ${id}`, () => (this.#st.getTree.get(id) as { data: Buffer } | undefined)?.data);
  }

  /**
   * Records a pack and its chunk locations in one transaction (idempotent). A chunk already
   * known keeps its first location.
   */
  async putPack(pack: PackRecord, chunks: ChunkLocation[]): Promise<void> {
    await this.#write(`put pack ${pack.id}`, () => {
      this.#st.insertPack.run(pack.id, pack.size, pack.createdAt);
      for (const c of chunks) this.#st.insertChunk.run(c.id, c.pack, c.offset, c.length);
    });
  }

  #inStatement(n: number): Database.Statement {
    let st = this.#inBatch.get(n);
    if (st === undefined) {
      st = this.#db.prepare(`SELECT id, pack, offset, length FROM chunks WHERE id IN (${"?,".repeat(n - 1)}?)`);
      this.#inBatch.set(n, st);
    }
    return st;
  }

  /** Locations of the known chunk ids among `ids`, read in one snapshot, 500 ids per statement. */
  async getChunks(ids: readonly string[]): Promise<Map<string, ChunkLocation>> {
    const out = new Map<string, ChunkLocation>();
    if (ids.length === 0) return out;
    const unique = [...new Set(ids)];
    return this.#read(`get ${unique.length} chunk locations`, () => {
      for (let i = 0; i < unique.length; i += IN_BATCH) {
        const batch = unique.slice(i, i + IN_BATCH);
        for (const r of this.#inStatement(batch.length).all(...batch) as ChunkRow[]) {
          out.set(r.id, { id: r.id, pack: r.pack, offset: r.offset, length: r.length });
        }
      }
      return out;
    });
  }

  /** All packs, sorted by id. */
  async listPacks(): Promise<PackRecord[]> {
    return this.#read("list packs", () =>
      (this.#st.listPacks.all() as { id: string; size: number; created_at: number }[]).map((r) => ({
        id: r.id,
        size: r.size,
        createdAt: r.created_at,
      })),
    );
  }

  /** Closes the database; idempotent. Later calls reject with MetadataError IO. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#db.close();
    } catch (err) {
      throw toMetadataError("close metadata", err);
    }
  }
}
