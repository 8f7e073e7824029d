/**
 * The agent's durable record of its sandboxes, so that an agent process started after a crash
 * (kill -9 included) finds what the previous one left: sandboxes to adopt, and the remains of
 * dead ones to clean up (runsc state, network, bundle, FUSE mount points, GPUs).
 *
 * `SqliteSandboxStore` keeps one row per sandbox in `<stateDir>/sandboxes.db` (better-sqlite3,
 * WAL, synchronous=NORMAL). Why SQLite rather than a JSON file rewritten atomically: each
 * change touches one row instead of rewriting every record, a commit is atomic without a
 * temp-file-and-rename dance, the WAL append is a few microseconds on the main thread (which
 * also serves FUSE) and survives the process being killed (it is in the page cache; only a
 * power loss can take the last commits, and then the sandboxes are gone too), and the
 * dependency is already the metadata layer's.
 *
 * Table `sandboxes`: id (key), state ("creating", "running", "stopping"), image, cpu,
 * memory_bytes, gpu (JSON: type, count, uuids), volumes (JSON), mounts (JSON: host mount points),
 * bundle, pid, created (ms), deadline (ms, null: no lifetime), sync_on_stop (0/1), record (the
 * full SandboxRecord as JSON), runtime (the runtime's `SandboxState` as JSON, null while creating),
 * forks (JSON: the forks its create makes, `PendingFork`; empty once it runs; a column added
 * later, so a database without it gets it on open).
 * Invariants: a row exists from before the first volume is forked or mounted until its sandbox is
 * stopped and its mounts are gone; a stopped sandbox has no row. A fork is in `forks` before it is
 * made, and stays there until the create finished or undid it: a fork the agent made for a
 * sandbox that never ran is always named by a row.
 */
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";
import type Database from "better-sqlite3";
import { loadSqlite } from "../metadata/index.js";
import type { SandboxRecord } from "./client.js";
import { AgentError } from "./errors.js";
import type { SandboxState } from "./runtime.js";

/** Where a volume of a sandbox is mounted on the host. */
export interface StoredMount {
  /** The volume's name. */
  name: string;
  /** The host mount point (bind-mounted into the sandbox). */
  dir: string;
  /** True when mounted writable at its head (its staged writes are synced at stop). */
  writable: boolean;
}

/** A fork a sandbox's create is about to make, or made; recorded before the fork is made. */
export interface PendingFork {
  /** The new volume. */
  volume: string;
  /** The volume it is forked from. */
  from: string;
  /** When the intent was recorded, ms since the epoch: the fork, if made, was created at or after it. */
  since: number;
}

/** One sandbox as the agent keeps it on disk. */
export interface StoredSandbox {
  /** The record `list()` returns (state, image, cpu, memory, gpu, volumes, times…). */
  record: SandboxRecord;
  /** "creating": mounts may exist, the runtime may or may not have started it; "running"; "stopping". */
  phase: "creating" | "running" | "stopping";
  /** Host mount points of its volumes, in order. */
  mounts: StoredMount[];
  /** UUIDs of the GPUs it holds. */
  gpuUuids: string[];
  /** Milliseconds since the epoch at which its lifetime ends; null: none. */
  deadline: number | null;
  /** Whether its stop syncs its volumes (false once a stop without sync began). */
  syncOnStop: boolean;
  /** The runtime's state of it (`Runtime.state`); null until the runtime started it. */
  runtime: SandboxState | null;
  /** Forks its create makes; empty once the create finished (from then on the forks are its volumes). */
  forks: PendingFork[];
}

/** Where the agent keeps its sandbox records. Each method is atomic; `put` replaces. */
export interface SandboxStore {
  /** Inserts or replaces the row of `s.record.id`. */
  put(s: StoredSandbox): Promise<void>;
  /** Removes the row of `id`; no-op when there is none. */
  delete(id: string): Promise<void>;
  /** Every row, oldest first. */
  all(): Promise<StoredSandbox[]>;
  /** Releases the database. Idempotent. */
  close(): Promise<void>;
}

/** `SandboxStore` on one SQLite file (created with its directory if missing). */
export class SqliteSandboxStore implements SandboxStore {
  private readonly db: Database.Database;
  private readonly upsert: Database.Statement;
  private closed = false;

  constructor(readonly path: string) {
    try {
      mkdirSync(dirname(path), { recursive: true });
      this.db = new (loadSqlite())(path);
      this.db.pragma("journal_mode = WAL");
      this.db.pragma("synchronous = NORMAL");
      this.db.exec(`CREATE TABLE IF NOT EXISTS sandboxes (
        id TEXT PRIMARY KEY, state TEXT NOT NULL, image TEXT NOT NULL, cpu REAL, memory_bytes INTEGER,
        gpu TEXT, volumes TEXT NOT NULL, mounts TEXT NOT NULL, bundle TEXT, pid INTEGER,
        created INTEGER NOT NULL, deadline INTEGER, sync_on_stop INTEGER NOT NULL,
        record TEXT NOT NULL, runtime TEXT, forks TEXT)`);
      const columns = this.db.prepare("PRAGMA table_info(sandboxes)").all() as { name: string }[];
      if (!columns.some((c) => c.name === "forks")) this.db.exec("ALTER TABLE sandboxes ADD COLUMN forks TEXT");
      this.upsert = this.db.prepare(`INSERT OR REPLACE INTO sandboxes
        (id, state, image, cpu, memory_bytes, gpu, volumes, mounts, bundle, pid, created, deadline, sync_on_stop, record, runtime, forks)
        VALUES (@id, @state, @image, @cpu, @memory_bytes, @gpu, @volumes, @mounts, @bundle, @pid, @created, @deadline, @sync_on_stop, @record, @runtime, @forks)`);
    } catch (err) {
      throw AgentError.IO(`open sandbox records ${path}`, err, { hint: "check that the agent's state directory is writable" });
    }
  }

  async put(s: StoredSandbox): Promise<void> {
    const r = s.record;
    const rt = s.runtime as { bundle?: unknown; pid?: unknown } | null;
    this.run(() =>
      this.upsert.run({
        id: r.id, state: s.phase, image: r.image, cpu: r.cpu, memory_bytes: r.memoryBytes,
        gpu: r.gpu ? JSON.stringify({ ...r.gpu, uuids: s.gpuUuids }) : null,
        volumes: JSON.stringify(r.volumes), mounts: JSON.stringify(s.mounts),
        bundle: typeof rt?.bundle === "string" ? rt.bundle : null, pid: typeof rt?.pid === "number" ? rt.pid : null,
        created: r.startedAt, deadline: s.deadline, sync_on_stop: s.syncOnStop ? 1 : 0,
        record: JSON.stringify(r), runtime: s.runtime ? JSON.stringify(s.runtime) : null,
        forks: s.forks.length ? JSON.stringify(s.forks) : null,
      }),
    "write");
  }

  async delete(id: string): Promise<void> {
    this.run(() => this.db.prepare("DELETE FROM sandboxes WHERE id = ?").run(id), "delete");
  }

  async all(): Promise<StoredSandbox[]> {
    const rows = this.run(() => this.db.prepare("SELECT * FROM sandboxes ORDER BY created, id").all(), "read") as Record<string, unknown>[];
    return rows.map((row) => {
      const gpu = row.gpu ? (JSON.parse(row.gpu as string) as { uuids?: string[] }) : null;
      return {
        record: JSON.parse(row.record as string) as SandboxRecord,
        phase: row.state as StoredSandbox["phase"],
        mounts: JSON.parse(row.mounts as string) as StoredMount[],
        gpuUuids: gpu?.uuids ?? [],
        deadline: (row.deadline as number | null) ?? null,
        syncOnStop: row.sync_on_stop === 1,
        runtime: row.runtime ? (JSON.parse(row.runtime as string) as SandboxState) : null,
        forks: row.forks ? (JSON.parse(row.forks as string) as PendingFork[]) : [],
      };
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.db.close();
  }

  private run<T>(fn: () => T, what: string): T {
    if (this.closed) throw AgentError.IO(`${what} sandbox records`, new Error("store is closed"));
    try {
      return fn();
    } catch (err) {
      throw AgentError.IO(`${what} sandbox records ${this.path}`, err);
    }
  }
}

/** `SandboxStore` in memory: the records die with the process (for an agent without a state dir, and tests). */
export class MemorySandboxStore implements SandboxStore {
  private readonly rows = new Map<string, string>();

  async put(s: StoredSandbox): Promise<void> {
    this.rows.set(s.record.id, JSON.stringify(s));
  }

  async delete(id: string): Promise<void> {
    this.rows.delete(id);
  }

  async all(): Promise<StoredSandbox[]> {
    return [...this.rows.values()].map((t) => JSON.parse(t) as StoredSandbox).sort((a, b) => a.record.startedAt - b.record.startedAt);
  }

  async close(): Promise<void> {}
}
