import { constants, mkdtempSync, writeFileSync, readFileSync, mkdirSync, rmSync, existsSync } from "node:fs";
import * as fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { SqliteMetadataStore } from "../../metadata/index.js";
import { VolumeError } from "../errors.js";
import { MemoryObjectStore, type ObjectStore } from "../object/index.js";
import { MountedVolume, type MountedVolumeOptions } from "./mount.js";
import { Repository } from "./repo.js";

const { O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC, O_APPEND } = constants;

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

/** A repository on a temp dir (SQLite file), a volume "v", and a way to mount it. */
export async function setup(objects: ObjectStore = new MemoryObjectStore()) {
  const dir = mkdtempSync(join(tmpdir(), "strata-mount-"));
  dirs.push(dir);
  const repo = new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects });
  await repo.createVolume("v");
  const stagingRoot = join(dir, "staging");
  const open = (o: Partial<MountedVolumeOptions> = {}) => MountedVolume.open({ repo, volume: "v", stagingRoot, ...o });
  return { dir, repo, open, objects, stagingRoot };
}

async function writeFile(m: MountedVolume, path: string, data: string | Uint8Array): Promise<void> {
  const fh = await m.create(path, 0o644, O_WRONLY | O_CREAT | O_TRUNC);
  await m.write(fh, Buffer.from(data), 0);
  await m.release(fh);
}

async function readAll(m: MountedVolume, path: string): Promise<Buffer> {
  const fh = await m.open(path, O_RDONLY);
  const parts: Buffer[] = [];
  for (let off = 0; ; ) {
    const b = await m.read(fh, 1 << 20, off);
    if (b.length === 0) break;
    parts.push(Buffer.from(b));
    off += b.length;
  }
  await m.release(fh);
  return Buffer.concat(parts);
}

async function code(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    if (err instanceof VolumeError) return err.code + (err.details === "name-too-long" ? ":name-too-long" : "");
    throw err;
  }
}

describe("MountedVolume", () => {
  it("writes, reads, lists and syncs into one version", async () => {
    const { repo, open } = await setup();
    const m = await open();
    await m.mkdir("/src", 0o755);
    await writeFile(m, "/src/a.txt", "hello");
    await writeFile(m, "/b.txt", "bee");
    expect(await m.readdir("/")).toEqual(["b.txt", "src"]);
    expect((await m.getattr("/src/a.txt")).size).toBe(5);
    expect((await readAll(m, "/src/a.txt")).toString()).toBe("hello");
    expect((await repo.volume("v")).head).toBeNull();
    const st = await m.status();
    expect(st.staged.added.sort()).toEqual(["b.txt", "src/", "src/a.txt"]);
    const r = await m.sync({ message: "first" });
    expect(r.changed).toBe(true);
    expect((await repo.volume("v")).head).toBe(r.version);
    const v = await repo.version(r.version!);
    expect(v.message).toBe("first");
    expect(v.labels.mount).toContain(`:${process.pid}:`);
    expect(v.labels.host).toBeTruthy();
    expect(Buffer.from(await repo.snapshot(v).readFile("src/a.txt")).toString()).toBe("hello");
    expect((await m.status()).staged).toEqual({ added: [], modified: [], removed: [] });
    expect((await m.getattr("/src/a.txt")).immutable).toBe(true);
    expect((await readAll(m, "/src/a.txt")).toString()).toBe("hello");
    await m.close();
  });

  it("refuses with the right codes", async () => {
    const { open } = await setup();
    const m = await open();
    await m.mkdir("/d", 0o755);
    await writeFile(m, "/d/f", "x");
    await writeFile(m, "/f", "y");
    expect(await code(m.rmdir("/d"))).toBe("NOT_EMPTY");
    expect(await code(m.unlink("/d"))).toBe("IS_A_DIRECTORY");
    expect(await code(m.rmdir("/f"))).toBe("NOT_A_DIRECTORY");
    expect(await code(m.mkdir("/f", 0o755))).toBe("ALREADY_EXISTS");
    expect(await code(m.create("/f", 0o644, O_WRONLY | O_CREAT | O_EXCL))).toBe("ALREADY_EXISTS");
    expect(await code(m.create("/f/g", 0o644, O_WRONLY | O_CREAT))).toBe("NOT_A_DIRECTORY");
    expect(await code(m.create("/nope/g", 0o644, O_WRONLY | O_CREAT))).toBe("NOT_FOUND");
    expect(await code(m.getattr("/nope"))).toBe("NOT_FOUND");
    expect(await code(m.create("/" + "n".repeat(256), 0o644, O_WRONLY | O_CREAT))).toBe("INVALID_PATH:name-too-long");
    expect(await code(m.rename("/d", "/d/inner"))).toBe("INVALID_ARGUMENT");
    expect(await code(m.rename("/f", "/d"))).toBe("IS_A_DIRECTORY");
    expect(await code(m.readlink("/f"))).toBe("INVALID_ARGUMENT");
    expect(await code(m.mkdir("/.strata", 0o755))).toBe("ALREADY_EXISTS");
    expect(await code(m.create("/.strata/x", 0o644, O_WRONLY | O_CREAT))).toBe("NOT_FOUND");
    expect(await code(m.link("/d", "/d2"))).toBe("PERMISSION");
    expect(await code(m.getxattr("/f", "user.none"))).toBe("NO_ATTRIBUTE");
    const fh = await m.open("/f", O_RDONLY);
    expect(await code(m.write(fh, Buffer.from("z"), 0))).toBe("BAD_HANDLE");
    expect(await code(m.read(9999, 1, 0))).toBe("BAD_HANDLE");
    await m.close();
  });

  it("handles O_APPEND, O_TRUNC, sparse writes, truncate and files over 4 GiB", async () => {
    const { open } = await setup();
    const m = await open();
    await writeFile(m, "/f", "abc");
    const fa = await m.open("/f", O_WRONLY | O_APPEND);
    await m.write(fa, Buffer.from("def"), 0);
    await m.release(fa);
    expect((await readAll(m, "/f")).toString()).toBe("abcdef");
    const fs2 = await m.open("/f", O_RDWR);
    await m.write(fs2, Buffer.from("Z"), 10);
    expect((await readAll(m, "/f")).toString("latin1")).toBe("abcdef\0\0\0\0Z");
    await m.ftruncate(fs2, 2);
    await m.truncate("/f", 5);
    expect((await readAll(m, "/f")).toString("latin1")).toBe("ab\0\0\0");
    await m.release(fs2);
    const ft = await m.open("/f", O_WRONLY | O_TRUNC);
    await m.release(ft);
    expect((await m.getattr("/f")).size).toBe(0);
    const big = 5 * 2 ** 30 + 7;
    const fb = await m.create("/big", 0o644, O_RDWR | O_CREAT);
    await m.write(fb, Buffer.from("tail"), big);
    expect((await m.getattr("/big")).size).toBe(big + 4);
    expect(Buffer.from(await m.read(fb, 10, big - 2)).toString("latin1")).toBe("\0\0tail");
    await m.release(fb);
    await m.close();
  });

  it("keeps an unlinked file readable and writable through its open handle", async () => {
    const { open, repo } = await setup();
    const m = await open();
    await writeFile(m, "/keep", "base content");
    await m.sync();
    const fh = await m.open("/keep", O_RDWR);
    await m.unlink("/keep");
    expect(await code(m.getattr("/keep"))).toBe("NOT_FOUND");
    expect(Buffer.from(await m.read(fh, 4, 0)).toString()).toBe("base");
    await m.write(fh, Buffer.from("BASE"), 0);
    expect(Buffer.from(await m.read(fh, 100, 0)).toString()).toBe("BASE content");
    const fh2 = await m.create("/new", 0o644, O_RDWR | O_CREAT);
    await m.write(fh2, Buffer.from("new"), 0);
    await m.unlink("/new");
    await m.write(fh2, Buffer.from("er"), 3);
    expect(Buffer.from(await m.read(fh2, 100, 0)).toString()).toBe("newer");
    const r = await m.sync();
    expect(await repo.snapshot(await repo.version(r.version!)).lookup("keep")).toBeUndefined();
    expect(Buffer.from(await m.read(fh, 100, 0)).toString()).toBe("BASE content");
    await m.release(fh);
    await m.release(fh2);
    await m.close();
  });

  it("keeps xattrs, owners, modes, symlinks and hard links through a sync and a reopen", async () => {
    const { open, repo } = await setup();
    const m = await open();
    await writeFile(m, "/f", "data");
    await m.setxattr("/f", "user.tag", Buffer.from("blue"), 0);
    expect(await code(m.setxattr("/f", "user.tag", Buffer.from("x"), 1))).toBe("ALREADY_EXISTS");
    expect(await code(m.setxattr("/f", "user.other", Buffer.from("x"), 2))).toBe("NO_ATTRIBUTE");
    await m.setxattr("/f", "user.gone", Buffer.from("x"), 0);
    await m.removexattr("/f", "user.gone");
    await m.chown("/f", 1000, 1001);
    await m.chmod("/f", 0o600);
    await m.utimens("/f", 0, 1_600_000_000_000);
    await m.symlink("../target", "/ln");
    await m.link("/f", "/hard");
    const r = await m.sync();
    const e = await repo.snapshot(await repo.version(r.version!)).stat("f");
    expect(e).toMatchObject({ uid: 1000, gid: 1001, mode: 0o600, mtime: 1_600_000_000_000 });
    expect(Buffer.from(e.xattrs!["user.tag"]!).toString()).toBe("blue");
    await m.close();
    const m2 = await open();
    expect(await m2.listxattr("/f")).toEqual(["user.tag"]);
    expect(Buffer.from(await m2.getxattr("/f", "user.tag")).toString()).toBe("blue");
    expect(await m2.getattr("/f")).toMatchObject({ uid: 1000, gid: 1001, mode: 0o600, mtime: 1_600_000_000_000, immutable: true });
    expect(await m2.readlink("/ln")).toBe("../target");
    expect((await readAll(m2, "/hard")).toString()).toBe("data");
    await m2.chown("/f", -1, 7);
    expect(await m2.getattr("/f")).toMatchObject({ uid: 1000, gid: 7, immutable: false });
    await m2.close();
  });

  it("refuses writes on a read-only mount and on a mount at an old version", async () => {
    const { open } = await setup();
    const m = await open();
    await writeFile(m, "/f", "one");
    const v1 = (await m.sync()).version!;
    await writeFile(m, "/f", "two");
    await m.sync();
    await m.close();
    for (const ro of [await open({ readOnly: true }), await open({ at: v1 })]) {
      expect(await code(writeFile(ro, "/g", "x"))).toBe("READ_ONLY");
      expect(await code(ro.open("/f", O_RDWR))).toBe("READ_ONLY");
      expect(await code(ro.mkdir("/d", 0o755))).toBe("READ_ONLY");
      expect(await code(ro.unlink("/f"))).toBe("READ_ONLY");
      expect(await code(ro.chmod("/f", 0o600))).toBe("READ_ONLY");
      expect(await code(ro.sync())).toBe("READ_ONLY");
      await ro.close();
    }
    const old = await open({ at: v1 });
    expect((await readAll(old, "/f")).toString()).toBe("one");
    await old.close();
  });

  it("refuses a second mount of the same volume on the host and takes over a stale lock", async () => {
    const { open, stagingRoot } = await setup();
    const m = await open();
    expect(await code(open())).toBe("ALREADY_EXISTS");
    const ro = await open({ readOnly: true });
    await ro.close();
    await m.close();
    const lock = join(stagingRoot, "main", "v", "lock");
    writeFileSync(lock, JSON.stringify({ pid: 2 ** 22 + 12345, host: (await import("node:os")).hostname(), mount: "dead", time: 1 }));
    const m2 = await open();
    expect(JSON.parse(readFileSync(lock, "utf8")).pid).toBe(process.pid);
    await m2.close();
    expect(existsSync(lock)).toBe(false);
  });

  it("keeps a write made during a sync staged, and syncs it next", async () => {
    const { open, repo } = await setup();
    const m = await open();
    await writeFile(m, "/a", "a1");
    await writeFile(m, "/b", "b1");
    await m.sync();
    await writeFile(m, "/a", "a2");
    const fh = await m.open("/a", O_WRONLY);
    const syncing = m.sync({ message: "during" });
    await m.write(fh, Buffer.from("A3"), 0);
    await writeFile(m, "/c", "c3");
    await m.unlink("/b");
    const r = await syncing;
    const snap = repo.snapshot(await repo.version(r.version!));
    expect(Buffer.from(await snap.readFile("a")).toString()).toBe("a2");
    expect(await snap.lookup("c")).toBeUndefined();
    expect(await snap.lookup("b")).toBeDefined();
    expect((await readAll(m, "/a")).toString()).toBe("A3");
    expect((await readAll(m, "/c")).toString()).toBe("c3");
    expect(await code(m.getattr("/b"))).toBe("NOT_FOUND");
    expect((await m.status()).staged).toEqual({ added: ["c"], modified: ["a"], removed: ["b"] });
    await m.write(fh, Buffer.from("!"), 2);
    await m.release(fh);
    const r2 = await m.sync();
    const snap2 = repo.snapshot(await repo.version(r2.version!));
    expect(Buffer.from(await snap2.readFile("a")).toString()).toBe("A3!");
    expect(Buffer.from(await snap2.readFile("c")).toString()).toBe("c3");
    expect(await snap2.lookup("b")).toBeUndefined();
    await m.close();
  });

  it("reloads to the head, refusing while changes are staged unless discarded", async () => {
    const { open, repo } = await setup();
    const m = await open();
    await writeFile(m, "/f", "one");
    await m.sync();
    const base = repo.stage(await repo.resolve("v"));
    await base.put(["g"], { kind: "file", name: "g", mode: 0o644, mtime: 1, size: 2, pending: { kind: "bytes", data: Buffer.from("gg") } });
    const other = await repo.sync("v", await repo.resolve("v"), base);
    await writeFile(m, "/mine", "x");
    expect(await code(m.reload())).toBe("NOT_EMPTY");
    expect(await m.reload({ discard: true })).toBe(other.version!.id);
    expect(await m.readdir("/")).toEqual(["f", "g"]);
    await m.close();
    const m2 = await open();
    expect(await m2.readdir("/")).toEqual(["f", "g"]);
    await m2.close();
  });
});
