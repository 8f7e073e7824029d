import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { MemorySandboxStore, SqliteSandboxStore, type SandboxStore, type StoredSandbox } from "./sandbox-store.js";

function sample(id: string, startedAt: number, over: Partial<StoredSandbox> = {}): StoredSandbox {
  return {
    record: {
      id, node: "n1", state: "running", image: "ab".repeat(32), cpu: 1.5, memoryBytes: 256 << 20,
      gpu: { type: "a100", count: 1, devices: [{ index: 0, uuid: "GPU-0", name: "NVIDIA A100-SXM4-40GB" }] },
      volumes: [{ name: "data", path: "/data", readOnly: false }], startedAt, runId: id, labels: { k: "v" },
      network: { mode: "egress", allow: ["10.0.0.1:80"] },
    },
    phase: "running",
    mounts: [{ name: "data", dir: `/state/mounts/${id}/0`, writable: true }],
    gpuUuids: ["GPU-0"],
    deadline: startedAt + 60_000,
    syncOnStop: true,
    runtime: { id, spec: { rootfs: "/rootfs", lifetimeMs: 60_000 }, pid: 1234, bundle: `/state/bundles/${id}` },
    forks: [],
    ...over,
  };
}

/** The contract every `SandboxStore` keeps. */
export function describeSandboxStore(name: string, make: () => Promise<SandboxStore>): void {
  describe(`SandboxStore conformance: ${name}`, () => {
    it("puts, replaces, lists oldest first, deletes idempotently", async () => {
      const s = await make();
      expect(await s.all()).toEqual([]);
      const b = sample("sb-b", 2000);
      const a = sample("sb-a", 1000, { phase: "creating", runtime: null, deadline: null, forks: [{ volume: "run-1", from: "data", since: 999 }] });
      await s.put(b);
      await s.put(a);
      expect(await s.all()).toEqual([a, b]);
      const b2 = sample("sb-b", 2000, { phase: "stopping", syncOnStop: false });
      await s.put(b2);
      expect(await s.all()).toEqual([a, b2]);
      await s.delete("sb-a");
      await s.delete("sb-a");
      await s.delete("never");
      expect(await s.all()).toEqual([b2]);
      await s.close();
      await s.close();
    });
  });
}

const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describeSandboxStore("memory", async () => new MemorySandboxStore());
describeSandboxStore("sqlite", async () => {
  const d = await mkdtemp(join(tmpdir(), "strata-store-"));
  dirs.push(d);
  return new SqliteSandboxStore(join(d, "sandboxes.db"));
});

describe("SqliteSandboxStore", () => {
  it("keeps its rows for the next process, and names the columns the records need", async () => {
    const d = await mkdtemp(join(tmpdir(), "strata-store-"));
    dirs.push(d);
    const path = join(d, "sub", "sandboxes.db");
    const first = new SqliteSandboxStore(path);
    await first.put(sample("sb-1", 1000));
    await first.close();
    const again = new SqliteSandboxStore(path);
    expect(await again.all()).toEqual([sample("sb-1", 1000)]);
    await again.close();
    const Database = (await import("better-sqlite3")).default;
    const db = new Database(path, { readonly: true });
    const row = db.prepare("SELECT id, state, image, cpu, memory_bytes, gpu, bundle, pid, created, deadline FROM sandboxes").get();
    db.close();
    expect(row).toEqual({
      id: "sb-1", state: "running", image: "ab".repeat(32), cpu: 1.5, memory_bytes: 256 << 20,
      gpu: JSON.stringify({ type: "a100", count: 1, devices: [{ index: 0, uuid: "GPU-0", name: "NVIDIA A100-SXM4-40GB" }], uuids: ["GPU-0"] }),
      bundle: "/state/bundles/sb-1", pid: 1234, created: 1000, deadline: 61_000,
    });
  });

  it("opens a database made before the forks column existed, adding it", async () => {
    const d = await mkdtemp(join(tmpdir(), "strata-store-"));
    dirs.push(d);
    const path = join(d, "sandboxes.db");
    const Database = (await import("better-sqlite3")).default;
    const old = new Database(path);
    old.exec(`CREATE TABLE sandboxes (
      id TEXT PRIMARY KEY, state TEXT NOT NULL, image TEXT NOT NULL, cpu REAL, memory_bytes INTEGER,
      gpu TEXT, volumes TEXT NOT NULL, mounts TEXT NOT NULL, bundle TEXT, pid INTEGER,
      created INTEGER NOT NULL, deadline INTEGER, sync_on_stop INTEGER NOT NULL,
      record TEXT NOT NULL, runtime TEXT)`);
    const s1 = sample("sb-old", 1000);
    old.prepare("INSERT INTO sandboxes VALUES ('sb-old', 'running', ?, 1.5, NULL, NULL, '[]', ?, NULL, NULL, 1000, ?, 1, ?, ?)")
      .run(s1.record.image, JSON.stringify(s1.mounts), s1.deadline, JSON.stringify(s1.record), JSON.stringify(s1.runtime));
    old.close();
    const store = new SqliteSandboxStore(path);
    expect(await store.all()).toEqual([{ ...s1, gpuUuids: [] }]);
    const withForks = sample("sb-new", 2000, { phase: "creating", forks: [{ volume: "f", from: "data", since: 1999 }] });
    await store.put(withForks);
    expect((await store.all())[1]).toEqual(withForks);
    await store.close();
  });

  it("fails IO with a hint when it cannot open its file", async () => {
    const d = await mkdtemp(join(tmpdir(), "strata-store-"));
    dirs.push(d);
    await writeFile(join(d, "file"), "");
    expect(() => new SqliteSandboxStore(join(d, "file", "sub", "sandboxes.db"))).toThrow(expect.objectContaining({ code: "IO", hint: expect.any(String) }));
  });
});
