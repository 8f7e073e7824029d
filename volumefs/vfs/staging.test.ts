import { spawn } from "node:child_process";
import { closeSync, constants, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { hostname, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
import { afterEach, describe, expect, it } from "vitest";
import { SqliteMetadataStore } from "../../metadata/index.js";
import { FileObjectStore, MemoryObjectStore, transientError, withFaults, type ObjectStore } from "../object/index.js";
import { MountedVolume } from "./mount.js";
import { Repository } from "./repo.js";
import { Extents, StagingDir } from "./staging.js";

const { O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_TRUNC } = constants;
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "strata-staging-"));
  dirs.push(d);
  return d;
}

function repoAt(dir: string, objects: ObjectStore = new FileObjectStore(join(dir, "objects"))): Repository {
  return new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects });
}

async function readAll(m: MountedVolume, path: string): Promise<string> {
  const fh = await m.open(path, O_RDONLY);
  const b = await m.read(fh, 1 << 24, 0);
  await m.release(fh);
  return Buffer.from(b).toString("latin1");
}

async function writeFile(m: MountedVolume, path: string, data: string): Promise<void> {
  const fh = await m.create(path, 0o644, O_WRONLY | O_CREAT | O_TRUNC);
  await m.write(fh, Buffer.from(data), 0);
  await m.release(fh);
}

/** A store whose puts of keys starting with `prefix` wait while the gate is closed. */
export function gated(store: ObjectStore, prefix: string) {
  let release: () => void = () => undefined;
  let gate: Promise<void> = Promise.resolve();
  let arrive: () => void = () => undefined;
  const g = {
    reached: Promise.resolve() as Promise<void>,
    close() {
      gate = new Promise<void>((ok) => (release = ok));
      g.reached = new Promise<void>((ok) => (arrive = ok));
    },
    open() {
      release();
    },
    store: {
      ...store,
      url: store.url,
      put: async (key: string, body: Uint8Array, o?: Parameters<ObjectStore["put"]>[2]) => {
        if (key.startsWith(prefix)) {
          arrive();
          await gate;
        }
        return store.put(key, body, o);
      },
      get: store.get.bind(store),
      head: store.head.bind(store),
      list: store.list.bind(store),
      delete: store.delete.bind(store),
      putFile: store.putFile.bind(store),
    } as ObjectStore,
  };
  return g;
}

describe("Extents", () => {
  it("merges, clips and reports pieces", () => {
    const e = new Extents();
    e.add(10, 20);
    e.add(30, 40);
    e.add(20, 25);
    expect([e.starts, e.ends]).toEqual([[10, 30], [25, 40]]);
    e.add(5, 35);
    expect([e.starts, e.ends]).toEqual([[5], [40]]);
    e.add(50, 60);
    expect(e.pieces(0, 100)).toEqual([[5, 40], [50, 60]]);
    expect(e.pieces(39, 51)).toEqual([[39, 40], [50, 51]]);
    expect(e.overlaps(40, 50)).toBe(false);
    expect(e.overlaps(40, 51)).toBe(true);
    e.clip(55);
    expect([e.starts, e.ends]).toEqual([[5, 50], [40, 55]]);
    expect(e.bytes).toBe(40);
    e.clip(5);
    expect(e.bytes).toBe(0);
  });
});

const CHILD = `
import { SqliteMetadataStore } from ${JSON.stringify(pathToFileURL(resolve("metadata/index.ts")).href)};
import { FileObjectStore } from ${JSON.stringify(pathToFileURL(resolve("volumefs/object/index.ts")).href)};
import { Repository, MountedVolume } from ${JSON.stringify(pathToFileURL(resolve("volumefs/vfs/index.ts")).href)};
import { join } from "node:path";
const dir = process.argv[2];
const repo = new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects: new FileObjectStore(join(dir, "objects")) });
const m = await MountedVolume.open({ repo, volume: "v", stagingRoot: join(dir, "staging") });
const w = async (p, s, flags = 0o1101) => { const fh = await m.create(p, 0o644, flags); await m.write(fh, Buffer.from(s), 0); await m.release(fh); };
await w("/base.txt", "0123456789");
await m.mkdir("/d", 0o755);
await w("/d/a.txt", "alpha");
await m.rename("/d/a.txt", "/d/b.txt");
const fh = await m.open("/base.txt", 2);
await m.write(fh, Buffer.from("XY"), 4);
await m.write(fh, Buffer.from("tail"), 20);
await m.symlink("d/b.txt", "/link");
await m.chmod("/d/b.txt", 0o600);
await m.setxattr("/d/b.txt", "user.k", Buffer.from("v"), 0);
await m.unlink("/link");
await m.symlink("base.txt", "/link2");
const gh = await m.create("/grows.bin", 0o644, 0o102);
await m.write(gh, Buffer.from("small start"), 0);
await m.write(gh, Buffer.alloc(20000, 0x61), 100);
await m.write(gh, Buffer.from("END"), 20100);
await m.release(gh);
if (process.argv[3] === "sync") await m.sync({ message: "from child" });
await w("/after.txt", "after the sync");
process.stdout.write("ready\\n");
setInterval(() => {}, 1000);
`;

/** Runs the child script until it prints "ready", then SIGKILLs it. */
async function runAndKill(dir: string, mode = ""): Promise<void> {
  const script = join(dir, "child.mts");
  writeFileSync(script, CHILD);
  const child = spawn(process.execPath, ["--import", "tsx", script, dir, mode], { cwd: resolve("."), stdio: ["ignore", "pipe", "pipe"] });
  let err = "";
  child.stderr.on("data", (d: Buffer) => (err += d.toString()));
  await new Promise<void>((ok, fail) => {
    child.stdout.on("data", (d: Buffer) => {
      if (d.toString().includes("ready")) ok();
    });
    child.on("exit", (code) => fail(new Error(`child exited with ${code}: ${err}`)));
  });
  const exited = new Promise((ok) => child.on("exit", ok));
  child.kill("SIGKILL");
  await exited;
}

describe("staging durability", () => {
  it("finds staged changes again after the mount process is killed (kill -9)", async () => {
    const dir = tempDir();
    const repo0 = repoAt(dir);
    await repo0.createVolume("v");
    await repo0.close();
    await runAndKill(dir);
    const repo = repoAt(dir);
    expect((await repo.volume("v")).head).toBeNull();
    const m = await MountedVolume.open({ repo, volume: "v", stagingRoot: join(dir, "staging") });
    expect(await readAll(m, "/base.txt")).toBe("0123XY6789\0\0\0\0\0\0\0\0\0\0tail");
    expect(await readAll(m, "/d/b.txt")).toBe("alpha");
    expect((await m.getattr("/d/b.txt")).mode).toBe(0o600);
    expect(Buffer.from(await m.getxattr("/d/b.txt", "user.k")).toString()).toBe("v");
    expect(await m.readdir("/")).toEqual(["after.txt", "base.txt", "d", "grows.bin", "link2"]);
    const grows = Buffer.from(await readAll(m, "/grows.bin"), "latin1");
    expect(grows.length).toBe(20103);
    expect(grows.subarray(0, 11).toString()).toBe("small start");
    expect(grows.subarray(100, 20100).every((b) => b === 0x61)).toBe(true);
    expect(grows.subarray(20100).toString()).toBe("END");
    expect(await m.readdir("/d")).toEqual(["b.txt"]);
    expect(await m.readlink("/link2")).toBe("base.txt");
    const r = await m.sync();
    const snap = repo.snapshot(await repo.version(r.version!));
    expect(Buffer.from(await snap.readFile("d/b.txt")).toString()).toBe("alpha");
    expect(Buffer.from(await snap.readFile("after.txt")).toString()).toBe("after the sync");
    await m.close();
    await repo.close();
  });

  it("sets aside, and does not replay, the staged changes of a removed volume when one of the same name is mounted", async () => {
    const dir = tempDir();
    const repo = repoAt(dir);
    const stagingRoot = join(dir, "staging");
    await repo.createVolume("v");
    const old = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    await writeFile(old, "/old.txt", "of the removed volume");
    await old.close();
    // Removed without its staging (as before `Strata.deleteVolume`, or a crash in between), then made again.
    const { createdAt } = await repo.volume("v");
    await repo.deleteVolume("v");
    await new Promise((r) => setTimeout(r, 5));
    await repo.createVolume("v");
    const m = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    expect(await m.readdir("/")).toEqual([]);
    await writeFile(m, "/new.txt", "mine");
    await m.close();
    // Kept aside, whole; the new volume's own changes are found again by its next mount.
    const aside = join(`${stagingRoot}-removed`, "main", String(createdAt), "v");
    expect(readdirSync(aside)).toContain("manifest.json");
    expect(readFileSync(join(aside, "journal-1.log"), "utf8")).toContain("old.txt");
    const again = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    expect(await again.readdir("/")).toEqual(["new.txt"]);
    expect(await readAll(again, "/new.txt")).toBe("mine");
    await again.close();
    await repo.close();
  });

  it("removes a volume's staging with it: refused while it is open or holds changes, unless they are discarded", async () => {
    const dir = tempDir();
    const repo = repoAt(dir);
    const stagingRoot = join(dir, "staging");
    await repo.createVolume("v");
    const m = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    await writeFile(m, "/a.txt", "staged");
    expect(() => StagingDir.remove(stagingRoot, "main", "v", true)).toThrow(expect.objectContaining({ code: "ALREADY_EXISTS" }));
    await m.close();
    expect(() => StagingDir.remove(stagingRoot, "main", "v", false)).toThrow(expect.objectContaining({ code: "CONFLICT", message: expect.stringMatching(/changes staged/) }));
    expect(existsSync(join(stagingRoot, "main", "v", "manifest.json"))).toBe(true);
    StagingDir.remove(stagingRoot, "main", "v", true);
    expect(existsSync(join(stagingRoot, "main", "v"))).toBe(false);
    StagingDir.remove(stagingRoot, "main", "nothing-here", false);
    await repo.close();
  });

  it("lets one process of many racing for a volume's staging hold it, also over a lock a dead process left", async () => {
    const dir = tempDir();
    const stagingRoot = join(dir, "staging");
    mkdirSync(join(stagingRoot, "main", "v"), { recursive: true });
    writeFileSync(join(stagingRoot, "main", "v", "lock"), JSON.stringify({ pid: 2 ** 22 + 4321, host: hostname(), mount: "dead", time: 1 }));
    const script = join(dir, "racer.mts");
    writeFileSync(
      script,
      `import { StagingDir } from ${JSON.stringify(pathToFileURL(resolve("volumefs/vfs/staging.ts")).href)};
const [root, at] = process.argv.slice(2);
while (Date.now() < Number(at)) {}
try {
  const s = StagingDir.open(root, "main", "v", "racer", null);
  process.stdout.write("held\\n");
  await new Promise((r) => setTimeout(r, 2000));
  s.close();
} catch (err) {
  process.stdout.write((err as { code?: string }).code === "ALREADY_EXISTS" ? "refused\\n" : "error " + String(err) + "\\n");
}
`,
    );
    const at = Date.now() + 6000;
    const outs = await Promise.all(
      Array.from({ length: 6 }, () => {
        const child = spawn(process.execPath, ["--import", "tsx", script, stagingRoot, String(at)], { cwd: resolve("."), stdio: ["ignore", "pipe", "inherit"] });
        let out = "";
        child.stdout.on("data", (d: Buffer) => (out += d.toString()));
        return new Promise<string>((ok) => child.on("exit", () => ok(out.trim())));
      }),
    );
    expect(outs.filter((o) => o === "held")).toHaveLength(1);
    expect(outs.filter((o) => o === "refused")).toHaveLength(5);
  }, 30_000);

  it("keeps writes made after a sync when killed, on top of the synced version", async () => {
    const dir = tempDir();
    const repo0 = repoAt(dir);
    await repo0.createVolume("v");
    await repo0.close();
    await runAndKill(dir, "sync");
    const repo = repoAt(dir);
    const head = (await repo.volume("v")).head!;
    expect((await repo.version(head)).message).toBe("from child");
    const m = await MountedVolume.open({ repo, volume: "v", stagingRoot: join(dir, "staging") });
    expect(m.baseId()).toBe(head);
    expect((await m.status()).staged).toEqual({ added: ["after.txt"], modified: [], removed: [] });
    expect(await readAll(m, "/after.txt")).toBe("after the sync");
    expect(await readAll(m, "/d/b.txt")).toBe("alpha");
    await m.close();
    await repo.close();
  });

  /** Volume "v" on a file store in a new directory; `open` mounts it. */
  async function local(): Promise<{ repo: Repository; open(): Promise<MountedVolume> }> {
    const dir = tempDir();
    const repo = repoAt(dir);
    await repo.createVolume("v");
    return { repo, open: () => MountedVolume.open({ repo, volume: "v", stagingRoot: join(dir, "staging") }) };
  }

  /**
   * Volume "v" on a memory store whose puts of the keys `fails` picks (default: all but refs) fail
   * while `store.failing`; `open` mounts it.
   */
  async function flaky(fails: (key: string) => boolean = (key) => !key.startsWith("refs/")): Promise<{ repo: Repository; store: { failing: boolean }; stagingRoot: string; open(): Promise<MountedVolume> }> {
    const dir = tempDir();
    const store = { failing: false };
    const repo = repoAt(dir, withFaults(new MemoryObjectStore(), (op, key) => (store.failing && op === "put" && fails(key) ? transientError("put") : undefined)));
    await repo.createVolume("v");
    const stagingRoot = join(dir, "staging");
    return { repo, store, stagingRoot, open: () => MountedVolume.open({ repo, volume: "v", stagingRoot }) };
  }

  it("leaves the previous version and the staged changes when the store fails mid-sync", async () => {
    const { repo, store, open } = await flaky();
    const m = await open();
    await writeFile(m, "/a", "one");
    const v1 = (await m.sync()).version;
    await writeFile(m, "/a", "two");
    await writeFile(m, "/b", "new");
    store.failing = true;
    await expect(m.sync()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    expect((await repo.volume("v")).head).toBe(v1);
    expect(await readAll(m, "/a")).toBe("two");
    expect((await m.status()).staged).toEqual({ added: ["b"], modified: ["a"], removed: [] });
    await m.close();
    const m2 = await open();
    expect(await readAll(m2, "/a")).toBe("two");
    store.failing = false;
    const r = await m2.sync();
    expect(r.changed).toBe(true);
    const snap = repo.snapshot(await repo.version(r.version!));
    expect(Buffer.from(await snap.readFile("a")).toString()).toBe("two");
    expect(Buffer.from(await snap.readFile("b")).toString()).toBe("new");
    await m2.close();
  });

  it("keeps a time set on a staged file after a failed sync, in the mount, a replay and the next version", async () => {
    const { repo, store, open } = await flaky();
    const m = await open();
    await writeFile(m, "/f", "hello");
    store.failing = true;
    await expect(m.sync()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    store.failing = false;
    await m.utimens("/f", 0, 5_000_000);
    expect((await m.getattr("/f")).mtime).toBe(5_000_000);
    await m.close();
    const m2 = await open();
    expect((await m2.getattr("/f")).mtime).toBe(5_000_000);
    expect(await readAll(m2, "/f")).toBe("hello");
    const r = await m2.sync();
    expect((await repo.snapshot(await repo.version(r.version!)).lookup("f"))?.mtime).toBe(5_000_000);
    await m2.close();
  });

  it("gives a file the kernel writes itself the exact millisecond it was set to, after a replay too", async () => {
    const { repo, open } = await local();
    const m = await open();
    m.kernelWrites(); // new files' contents are their whole data files (direct)
    await writeFile(m, "/f", "x");
    await m.utimens("/f", 0, 1_000_000_000_234); // 1000000000.234 s is not exact as a float
    await m.close();
    const m2 = await open();
    expect((await m2.getattr("/f")).mtime).toBe(1_000_000_000_234);
    await m2.close();
  });

  it("gives directories the mtimes the mount answered, after a replay too", async () => {
    const { repo, open } = await local();
    const m = await open();
    const dirs = ["/", "/made", "/removed", "/renamed-from", "/renamed-to", "/linked"];
    for (const d of dirs.slice(1)) await m.mkdir(d, 0o755);
    await writeFile(m, "/made/f", "f");
    await writeFile(m, "/removed/f", "f");
    await writeFile(m, "/renamed-from/f", "f");
    await new Promise((r) => setTimeout(r, 5));
    await m.unlink("/removed/f");
    await m.rename("/renamed-from/f", "/renamed-to/f");
    await m.link("/made/f", "/linked/g");
    const live = await Promise.all(dirs.map(async (d) => (await m.getattr(d)).mtime));
    await m.close();
    await new Promise((r) => setTimeout(r, 20));
    const m2 = await open();
    expect(await Promise.all(dirs.map(async (d) => (await m2.getattr(d)).mtime))).toEqual(live);
    // The root's too: names were made in it (a version's root has the version's time).
    expect(live[0]).toBeGreaterThan(0);
    await m2.close();
  });

  it("shows a change of one hard link's mode, owner or xattrs in the other, after a replay and in the next version", async () => {
    const { repo, open } = await local();
    const m = await open();
    await m.mkdir("/d", 0o755);
    await writeFile(m, "/h1", "bytes");
    await m.link("/h1", "/d/h2");
    await m.chmod("/h1", 0o600);
    await m.chown("/d/h2", 5, 6);
    await m.setxattr("/h1", "user.k", Buffer.from("v"), 0);
    const shown = async (mv: MountedVolume): Promise<unknown[]> =>
      Promise.all(["/h1", "/d/h2"].map(async (p) => {
        const a = await mv.getattr(p);
        return { mode: a.mode, uid: a.uid, gid: a.gid, k: Buffer.from((await mv.xattr(p, "user.k")) ?? []).toString() };
      }));
    const want = { mode: 0o600, uid: 5, gid: 6, k: "v" };
    expect(await shown(m)).toEqual([want, want]);
    await m.close();
    const m2 = await open();
    expect(await shown(m2)).toEqual([want, want]);
    const r = await m2.sync();
    const snap = repo.snapshot(await repo.version(r.version!));
    for (const p of ["h1", "d/h2"]) expect(await snap.lookup(p)).toMatchObject({ mode: 0o600, uid: 5, gid: 6 });
    await m2.close();
  });

  it("keeps hard links one file through a failed sync: a write through one name shows in the other, nlink stays right, after a replay too", async () => {
    const { store, open } = await flaky();
    const m = await open();
    await writeFile(m, "/a", "hello");
    await m.link("/a", "/b");
    store.failing = true;
    await expect(m.sync()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    store.failing = false;
    const fh = await m.open("/a", O_WRONLY);
    await m.write(fh, Buffer.from("J"), 0);
    await m.release(fh);
    const shown = async (mv: MountedVolume): Promise<unknown[]> =>
      Promise.all(["/a", "/b"].map(async (p) => ({ bytes: await readAll(mv, p), nlink: (await mv.getattr(p)).nlink })));
    expect(await shown(m)).toEqual([{ bytes: "Jello", nlink: 2 }, { bytes: "Jello", nlink: 2 }]);
    await m.close();
    const m2 = await open();
    expect(await shown(m2)).toEqual([{ bytes: "Jello", nlink: 2 }, { bytes: "Jello", nlink: 2 }]);
    await m2.unlink("/a");
    expect((await m2.getattr("/b")).nlink).toBe(1);
    await m2.close();
  });

  it("counts a file held open for writing across two failed syncs as one name after a replay", async () => {
    const { store, open } = await flaky();
    const m = await open();
    m.kernelWrites();
    const fh = await m.create("/log", 0o644, O_WRONLY | O_CREAT);
    const fd = (await m.backingFd(fh))!;
    try {
      writeSync(fd, "one");
      store.failing = true;
      // Each freeze says the open file's name again in the journal.
      for (let i = 0; i < 2; i++) await expect(m.sync()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
      store.failing = false;
      expect((await m.getattr("/log")).nlink).toBe(1);
      await m.release(fh);
    } finally {
      closeSync(fd);
    }
    await m.close();
    const m2 = await open();
    expect((await m2.getattr("/log")).nlink).toBe(1);
    expect(await readAll(m2, "/log")).toBe("one");
    await m2.close();
  });

  it("stores every chunk of a version synced after two failed syncs in a row", async () => {
    const { repo, store, open } = await flaky((key) => key.startsWith("packs/"));
    const m = await open();
    const big = "hello world ".repeat(20_000);
    await writeFile(m, "/a.txt", big);
    store.failing = true;
    await expect(m.sync()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    await expect(m.sync()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    store.failing = false;
    const r = await m.sync();
    expect(r.changed).toBe(true);
    await m.close();
    // Read from the store alone: a fresh repository over the same objects, with no local cache.
    const snap = repo.snapshot(await repo.version(r.version!));
    expect(Buffer.from(await snap.readFile("a.txt")).toString()).toBe(big);
    await repo.close();
  });

  it("counts a sync as done when the commit went through but a later step failed", async () => {
    const { repo, store, open } = await flaky((key) => key.startsWith("refs/"));
    const m = await open();
    await writeFile(m, "/a", "one");
    store.failing = true;
    const r = await m.sync();
    expect((await repo.volume("v")).head).toBe(r.version);
    expect((await m.status()).staged).toEqual({ added: [], modified: [], removed: [] });
    expect(m.baseId()).toBe(r.version);
    await m.close();
  });

  it("keeps a sync's token when it cannot learn whether the commit went through, and settles it before the next sync", async () => {
    const { repo, store, stagingRoot, open } = await flaky((key) => key.startsWith("refs/"));
    const m = await open();
    await writeFile(m, "/a", "one");
    // The commit goes through but its ref does not, and the lookup that would tell fails too.
    store.failing = true;
    const volume = repo.volume.bind(repo);
    repo.volume = async (name: string) => {
      if (store.failing) throw transientError("get");
      return volume(name);
    };
    await expect(m.sync()).rejects.toBeDefined();
    store.failing = false;
    const manifest = () => JSON.parse(readFileSync(join(stagingRoot, "main", "v", "manifest.json"), "utf8"));
    expect(manifest().syncing).toBeDefined();
    const head = (await repo.volume("v")).head;
    expect(head).not.toBeNull();
    // The next sync finds that it did, and says how to take it in rather than sync again.
    await expect(m.sync()).rejects.toMatchObject({ code: "CONFLICT", hint: expect.stringMatching(/unmount and mount again/) });
    await m.close();
    const m2 = await open();
    expect(m2.baseId()).toBe(head);
    expect((await m2.status()).staged).toEqual({ added: [], modified: [], removed: [] });
    expect(manifest().syncing).toBeUndefined();
    await m2.close();
  });

  it("replays a journal whose sync committed before the manifest moved", async () => {
    const dir = tempDir();
    const g = gated(new MemoryObjectStore(), "versions/");
    const repo = repoAt(dir, g.store);
    await repo.createVolume("v");
    const stagingRoot = join(dir, "staging");
    const m = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    await writeFile(m, "/a", "one");
    const fh = await m.open("/a", O_RDWR);
    const manifest = join(stagingRoot, "main", "v", "manifest.json");
    const { readFileSync, copyFileSync } = await import("node:fs");
    g.close();
    const syncing = m.sync();
    await g.reached;
    await m.write(fh, Buffer.from("ONE"), 0);
    copyFileSync(manifest, manifest + ".during");
    g.open();
    const r = await syncing;
    await m.release(fh);
    await m.close();
    expect(JSON.parse(readFileSync(manifest + ".during", "utf8")).syncing).toBeDefined();
    copyFileSync(manifest + ".during", manifest);
    const m2 = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    expect(m2.baseId()).toBe(r.version);
    expect(await readAll(m2, "/a")).toBe("ONE");
    expect((await m2.status()).staged.modified).toEqual(["a"]);
    await m2.close();
  });
});
