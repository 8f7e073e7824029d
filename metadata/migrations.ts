/**
 * Schema migrations of the metadata database.
 *
 * The schema version lives in `PRAGMA user_version`: 0 for an empty file, N once the first N
 * steps of `MIGRATIONS` are applied. Each step runs in its own `BEGIN IMMEDIATE` transaction that
 * re-reads the version first, so that several processes opening one fresh file at once apply
 * every step exactly once, and a step that fails leaves the database at the previous version.
 * Steps are append-only: never edit a released step, add a new one.
 *
 * Layout (ids are lowercase hex blake3 digests; times are milliseconds since the epoch):
 * - environments(name, created_at): one row per tenant, created by its first volume.
 * - volumes(env, name, head, forked_from_volume, forked_from_version, created_at, seq):
 *   the only mutable rows; `head` moves by compare-and-swap and `seq` counts the moves.
 * - versions(id, root, time, message, labels JSON, files, bytes) and
 *   version_parents(version, idx, parent): the version DAG; a merge has parents 0 and 1.
 * - trees(id, data): encoded tree nodes.
 * - packs(id, size, created_at) and chunks(id, pack, offset, length): the chunk index.
 */
import type Database from "better-sqlite3";
import { MetadataError } from "./errors.js";
import { toMetadataError } from "./sqlite-errors.js";

/** One schema step: after it runs, `PRAGMA user_version` equals `version`. */
export interface Migration {
  /** The schema version this step produces; steps are numbered 1, 2, 3, … without gaps. */
  version: number;
  /** What the step does, one line. */
  description: string;
  /** The SQL the step runs (several statements allowed). */
  sql: string;
}

/** Every schema step this code knows, in order. */
export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    description: "volumes, versions, trees, packs and the chunk index",
    sql: `
      CREATE TABLE environments (
        name       TEXT PRIMARY KEY,
        created_at INTEGER NOT NULL
      ) WITHOUT ROWID;

      CREATE TABLE volumes (
        env                 TEXT NOT NULL,
        name                TEXT NOT NULL,
        head                TEXT,
        forked_from_volume  TEXT,
        forked_from_version TEXT,
        created_at          INTEGER NOT NULL,
        seq                 INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (env, name)
      ) WITHOUT ROWID;

      CREATE TABLE versions (
        id      TEXT PRIMARY KEY,
        root    TEXT NOT NULL,
        time    INTEGER NOT NULL,
        message TEXT NOT NULL,
        labels  TEXT NOT NULL,
        files   INTEGER NOT NULL,
        bytes   INTEGER NOT NULL
      );

      CREATE TABLE version_parents (
        version TEXT NOT NULL,
        idx     INTEGER NOT NULL,
        parent  TEXT NOT NULL,
        PRIMARY KEY (version, idx)
      ) WITHOUT ROWID;

      CREATE TABLE trees (
        id   TEXT PRIMARY KEY,
        data BLOB NOT NULL
      );

      CREATE TABLE packs (
        id         TEXT PRIMARY KEY,
        size       INTEGER NOT NULL,
        created_at INTEGER NOT NULL
      ) WITHOUT ROWID;

      CREATE TABLE chunks (
        id     TEXT PRIMARY KEY,
        pack   TEXT NOT NULL,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL
      ) WITHOUT ROWID;

      CREATE INDEX chunks_by_pack ON chunks (pack);
    `,
  },
];

/** The schema version a database has once every step of `MIGRATIONS` is applied. */
export const LATEST_SCHEMA_VERSION: number = MIGRATIONS.length;

/** The database's schema version (`PRAGMA user_version`). */
export function schemaVersion(db: Database.Database): number {
  return db.pragma("user_version", { simple: true }) as number;
}

/**
 * Brings `db` up to the last step of `steps`, one transaction per step, and returns the
 * resulting version. Throws MetadataError SCHEMA_TOO_NEW when the database is newer than
 * `steps` knows (nothing is changed), and a MetadataError for a step that fails (that step is
 * rolled back; earlier steps stay applied).
 */
export function migrate(db: Database.Database, steps: readonly Migration[] = MIGRATIONS): number {
  steps.forEach((s, i) => {
    if (s.version !== i + 1) {
      throw new MetadataError("CORRUPT", `migrate metadata: step ${i} has version ${s.version}, want ${i + 1}`);
    }
  });
  const latest = steps.length;
  const found = schemaVersion(db);
  if (found > latest) throw MetadataError.SCHEMA_TOO_NEW(found, latest);
  for (const step of steps) {
    if (step.version <= found) continue;
    const apply = db.transaction(() => {
      const now = schemaVersion(db);
      if (now > latest) throw MetadataError.SCHEMA_TOO_NEW(now, latest);
      if (now >= step.version) return;
      db.exec(step.sql);
      db.pragma(`user_version = ${step.version}`);
    });
    try {
      apply.immediate();
    } catch (err) {
      throw toMetadataError(`migrate metadata to version ${step.version}`, err);
    }
  }
  return schemaVersion(db);
}
