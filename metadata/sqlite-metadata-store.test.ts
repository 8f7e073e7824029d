import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import Database from "better-sqlite3";
import { afterEach, describe, expect, it } from "vitest";
import { describeMetadataStore, testId } from "./conformance.js";
import { MetadataError } from "./errors.js";
import { LATEST_SCHEMA_VERSION, MIGRATIONS, migrate, schemaVersion, type Migration } from "./migrations.js";
import { SqliteMetadataStore } from "./sqlite-metadata-store.js";

const here = dirname(fileURLToPath(import.meta.url));
const root = dirname(here);

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "strata-meta-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  while (dirs.length > 0) rmSync(dirs.pop()!, { recursive: true, force: true });
});

async function rejection(p: Promise<unknown> | (() => unknown)): Promise<MetadataError> {
  let err: unknown;
  try {
    await (typeof p === "function" ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err).toBeInstanceOf(MetadataError);
  return err as MetadataError;
}

describeMetadataStore("sqlite file", async () => {
  const dir = mkdtempSync(join(tmpdir(), "strata-meta-"));
  const store = SqliteMetadataStore.open({ path: join(dir, "nested", "dirs", "meta.db") });
  return {
    store,
    cleanup: async () => {
      await store.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
});

describeMetadataStore("sqlite :memory:", async () => {
  const store = SqliteMetadataStore.open({ path: ":memory:" });
  return { store, cleanup: () => store.close() };
});

describe("SqliteMetadataStore on a file", () => {
  it("uses WAL mode, synchronous NORMAL and creates the environment row with the volume", async () => {
    const path = join(tempDir(), "meta.db");
    const store = SqliteMetadataStore.open({ path });
    await store.createVolume({ env: "tenant-a", name: "data", head: null, forkedFrom: null, createdAt: 42 });
    await store.createVolume({ env: "tenant-a", name: "more", head: null, forkedFrom: null, createdAt: 43 });
    const raw = new Database(path, { readonly: true });
    try {
      expect(raw.pragma("journal_mode", { simple: true })).toBe("wal");
      expect(raw.prepare("SELECT name, created_at FROM environments").all()).toEqual([
        { name: "tenant-a", created_at: 42 },
      ]);
    } finally {
      raw.close();
      await store.close();
    }
  });

  it("keeps data across a reopen", async () => {
    const path = join(tempDir(), "meta.db");
    const a = SqliteMetadataStore.open({ path });
    await a.createVolume({ env: "main", name: "data", head: null, forkedFrom: null, createdAt: 1 });
    const v = { id: testId("v"), root: testId("r"), parents: [], time: 5, message: "m", labels: {}, files: 0, bytes: 0 };
    await a.commit({ env: "main", volume: "data", expectedHead: null, version: v, trees: [{ id: testId("r"), data: new Uint8Array([1]) }] });
    await a.close();
    const b = SqliteMetadataStore.open({ path });
    try {
      expect((await b.getVolume("main", "data"))?.head).toBe(v.id);
      expect(await b.getVersion(v.id)).toEqual(v);
      expect(Array.from((await b.getTree(testId("r")))!)).toEqual([1]);
    } finally {
      await b.close();
    }
  });

  it("answers a prefix search with an index range scan", () => {
    const path = join(tempDir(), "meta.db");
    SqliteMetadataStore.open({ path }).close();
    const raw = new Database(path, { readonly: true });
    try {
      const plan = raw
        .prepare("EXPLAIN QUERY PLAN SELECT id FROM versions WHERE id >= ? AND id < ? ORDER BY id LIMIT ?")
        .all("ab", "ac", 10) as { detail: string }[];
      expect(plan.map((p) => p.detail).join("\n")).toMatch(/SEARCH versions USING .*INDEX.*\(id>\? AND id<\?\)/);
    } finally {
      raw.close();
    }
  });

  it("throws BUSY after bounded retries while another connection holds the write lock, then recovers", async () => {
    const path = join(tempDir(), "meta.db");
    const store = SqliteMetadataStore.open({ path, busyTimeoutMs: 20, busyRetries: 2 });
    await store.createVolume({ env: "main", name: "data", head: null, forkedFrom: null, createdAt: 1 });
    const holder = new Database(path);
    holder.prepare("BEGIN IMMEDIATE").run();
    try {
      const err = await rejection(store.casHead("main", "data", null, testId("x")));
      expect(err.code).toBe("BUSY");
      expect(err.retryable).toBe(true);
      expect((await store.getVolume("main", "data"))?.head).toBeNull();
    } finally {
      holder.prepare("ROLLBACK").run();
      holder.close();
    }
    expect((await store.casHead("main", "data", null, testId("x"))).ok).toBe(true);
    await store.close();
  });

  it("reports a file that is not a database as CORRUPT", async () => {
    const path = join(tempDir(), "meta.db");
    writeFileSync(path, Buffer.alloc(4096, 0x5a));
    const err = await rejection(() => SqliteMetadataStore.open({ path }));
    expect(err.code).toBe("CORRUPT");
  });
});

describe("migrations", () => {
  it("brings a fresh database to the latest version", () => {
    const path = join(tempDir(), "meta.db");
    SqliteMetadataStore.open({ path }).close();
    const raw = new Database(path, { readonly: true });
    try {
      expect(LATEST_SCHEMA_VERSION).toBe(MIGRATIONS.length);
      expect(schemaVersion(raw)).toBe(LATEST_SCHEMA_VERSION);
      const tables = (raw.prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").all() as { name: string }[]).map((r) => r.name);
      expect(tables).toEqual(["chunks", "environments", "packs", "trees", "version_parents", "versions", "volumes"]);
      const indexes = raw.prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'chunks' AND name = 'chunks_by_pack'").all();
      expect(indexes).toHaveLength(1);
    } finally {
      raw.close();
    }
  });

  it("refuses a database newer than the code with SCHEMA_TOO_NEW and leaves it untouched", async () => {
    const path = join(tempDir(), "meta.db");
    const raw = new Database(path);
    raw.pragma(`user_version = ${LATEST_SCHEMA_VERSION + 1}`);
    raw.close();
    const err = await rejection(() => SqliteMetadataStore.open({ path }));
    expect(err.code).toBe("SCHEMA_TOO_NEW");
    const after = new Database(path, { readonly: true });
    try {
      expect(schemaVersion(after)).toBe(LATEST_SCHEMA_VERSION + 1);
      expect(after.prepare("SELECT count(*) AS n FROM sqlite_master").get()).toEqual({ n: 0 });
    } finally {
      after.close();
    }
  });

  it("applies only the pending steps, each in its own transaction", () => {
    const db = new Database(":memory:");
    const steps: Migration[] = [
      { version: 1, description: "a", sql: "CREATE TABLE a (x INTEGER); INSERT INTO a VALUES (1);" },
      { version: 2, description: "b", sql: "CREATE TABLE b (y INTEGER); INSERT INTO a VALUES (2);" },
    ];
    expect(migrate(db, steps.slice(0, 1))).toBe(1);
    expect(migrate(db, steps)).toBe(2);
    expect(migrate(db, steps)).toBe(2);
    expect(db.prepare("SELECT x FROM a ORDER BY x").all()).toEqual([{ x: 1 }, { x: 2 }]);
    db.close();
  });

  it("rolls back a failing step and keeps the version of the last good one", async () => {
    const db = new Database(":memory:");
    const steps: Migration[] = [
      { version: 1, description: "a", sql: "CREATE TABLE a (x INTEGER);" },
      { version: 2, description: "broken", sql: "CREATE TABLE b (y INTEGER); INSERT INTO nowhere VALUES (1);" },
    ];
    const err = await rejection(() => migrate(db, steps));
    expect(err.code).toBe("IO");
    expect(schemaVersion(db)).toBe(1);
    expect(db.prepare("SELECT name FROM sqlite_master WHERE name = 'b'").all()).toEqual([]);
    db.close();
  });
});

interface HammerReport {
  ids: string[];
  conflicts: number;
  errors: string[];
}

function runWorkers(path: string, workers: number, moves: number): Promise<HammerReport[]> {
  const script = join(here, "testdata", "hammer.ts");
  const children = Array.from({ length: workers }, (_, w) =>
    spawn(process.execPath, ["--import", "tsx", script, path, String(w), String(moves)], {
      cwd: root,
      stdio: ["pipe", "pipe", "pipe"],
    }),
  );
  const outputs = children.map((c) => {
    let out = "";
    let err = "";
    c.stdout.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr.on("data", (d: Buffer) => (err += d.toString()));
    const ready = new Promise<void>((resolve, reject) => {
      const check = () => {
        if (out.startsWith("ready\n")) resolve();
      };
      c.stdout.on("data", check);
      c.on("exit", () => reject(new Error(`hammer exited before ready: ${err}`)));
    });
    const done = new Promise<HammerReport>((resolve, reject) => {
      c.on("exit", (code) => {
        const last = out.trim().split("\n").pop() ?? "";
        if (code !== 0) return reject(new Error(`hammer exited ${code}: ${err}`));
        try {
          resolve(JSON.parse(last) as HammerReport);
        } catch {
          reject(new Error(`hammer printed no report: ${out} ${err}`));
        }
      });
    });
    return { ready, done };
  });
  return Promise.all(outputs.map((o) => o.ready)).then(() => {
    for (const c of children) c.stdin.end("go\n");
    return Promise.all(outputs.map((o) => o.done));
  });
}

describe("several processes on one database file", () => {
  it("4 processes × 200 read-modify-write head moves: no errors, seq 800, one linear history", async () => {
    const path = join(tempDir(), "shared", "meta.db");
    expect(existsSync(path)).toBe(false);
    const reports = await runWorkers(path, 4, 200);

    for (const r of reports) expect(r.errors).toEqual([]);
    for (const r of reports) expect(r.ids).toHaveLength(200);
    const won = new Set(reports.flatMap((r) => r.ids));
    expect(won.size).toBe(800);

    const store = SqliteMetadataStore.open({ path });
    try {
      const volume = (await store.getVolume("main", "shared"))!;
      expect(volume.seq).toBe(800);
      const chain: string[] = [];
      let at: string | null = volume.head;
      while (at !== null) {
        chain.push(at);
        const v = await store.getVersion(at);
        expect(v).toBeDefined();
        expect(await store.getTree(v!.root)).toBeDefined();
        expect(v!.parents.length).toBeLessThanOrEqual(1);
        at = v!.parents[0] ?? null;
      }
      expect(chain).toHaveLength(800);
      expect(new Set(chain)).toEqual(won);
      expect((await store.listPacks()).length).toBeGreaterThanOrEqual(800);
    } finally {
      await store.close();
    }
  });
});
