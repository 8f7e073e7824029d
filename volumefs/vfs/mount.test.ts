import { constants, mkdtempSync, writeFileSync, readFileSync, mkdirSync, rmSync, existsSync } from "node:fs";
import * as fs from "node:fs";
import { randomBytes } from "node:crypto";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { SqliteMetadataStore, type VersionRecord } from "../../metadata/index.js";
import { FileCopyCache } from "../chunk/index.js";
import { VolumeError } from "../errors.js";
import { MemoryObjectStore, recycledBuffers, type ObjectStore } from "../object/index.js";
import { makeTestS3Store, s3Skipped } from "../../test/support/s3.js";
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

/**
 * Another writer's version of volume "v": at its head, `files` put (bytes) or removed (null),
 * committed straight to the repository.
 */
async function commitElsewhere(repo: Repository, files: Record<string, string | Uint8Array | null>): Promise<VersionRecord | null> {
  const next = repo.stage(await repo.resolve("v"));
  for (const [name, data] of Object.entries(files)) {
    if (data === null) await next.remove([name]);
    else {
      const bytes = Buffer.from(data);
      await next.put([name], { kind: "file", name, mode: 0o644, mtime: 1, size: bytes.length, pending: { kind: "bytes", data: bytes } });
    }
  }
  return (await repo.sync("v", await repo.resolve("v"), next)).version;
}

/**
 * A mount whose new files the kernel writes itself, with "/log" made and its backing file open
 * (`fd`, as the kernel holds it); `names` lists the staging's data files.
 */
async function kernelWrittenLog() {
  const { open, repo, stagingRoot } = await setup();
  const m = await open();
  m.kernelWrites();
  const data = join(stagingRoot, repo.env, "v", "data");
  const names = (): string[] => fs.readdirSync(data);
  const fh = await m.create("/log", 0o644, O_WRONLY | O_CREAT);
  const fd = (await m.backingFd(fh))!;
  return { open, repo, m, names, fh, fd };
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
    // O_TRUNC truncates whatever the access mode, as on Linux; the handle still only reads.
    await writeFile(m, "/r", "abc");
    const rt = await m.open("/r", O_RDONLY | O_TRUNC);
    expect((await m.getattr("/r")).size).toBe(0);
    expect(await code(m.write(rt, Buffer.from("x"), 0))).toBe("BAD_HANDLE");
    await m.release(rt);
    await writeFile(m, "/r", "abc");
    await m.release(await m.create("/r", 0o644, O_RDONLY | O_CREAT | O_TRUNC));
    expect((await m.getattr("/r")).size).toBe(0);
    await m.mkdir("/dir", 0o755);
    expect(await code(m.open("/dir", O_RDONLY | O_TRUNC))).toBe("IS_A_DIRECTORY");
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

  it("gives a stored file's hard link one content with its name until a sync, counted in nlink", async () => {
    const { open } = await setup();
    const m = await open();
    await writeFile(m, "/a", "stored");
    await m.sync();
    await m.link("/a", "/b");
    expect((await m.getattr("/a")).nlink).toBe(2);
    const fh = await m.open("/b", O_WRONLY | O_APPEND);
    await m.write(fh, Buffer.from("+b"), 0);
    await m.release(fh);
    expect((await readAll(m, "/a")).toString()).toBe("stored+b");
    // rename(2) between two names of one file leaves both.
    await m.rename("/a", "/b");
    expect((await readAll(m, "/a")).toString()).toBe("stored+b");
    await m.link("/b", "/c");
    expect((await m.getattr("/b")).nlink).toBe(3);
    await m.unlink("/a");
    await m.rename("/c", "/d");
    expect((await m.getattr("/b")).nlink).toBe(2);
    await writeFile(m, "/e", "other");
    await m.rename("/e", "/d");
    expect((await m.getattr("/b")).nlink).toBe(1);
    await m.sync();
    expect((await m.getattr("/b")).nlink).toBe(1);
    expect((await readAll(m, "/b")).toString()).toBe("stored+b");
    await m.close();
  });

  it("sets a directory's mtime when a name in it is made, removed or renamed, and keeps it through a sync and a reopen", async () => {
    const { open } = await setup();
    const m = await open();
    const old = 1_000_000_000_000;
    for (const d of ["/d", "/e", "/f"]) {
      await m.mkdir(d, 0o755);
      await m.utimens(d, old, old);
    }
    await writeFile(m, "/d/x", "x");
    await m.mkdir("/e/sub", 0o755);
    await m.utimens("/e/sub", old, old);
    await m.sync();
    expect((await m.getattr("/f")).mtime).toBe(old);
    const t0 = Date.now();
    await m.rename("/d/x", "/f/y");
    for (const d of ["/d", "/f"]) expect((await m.getattr(d)).mtime).toBeGreaterThanOrEqual(t0);
    expect((await m.getattr("/e/sub")).mtime).toBe(old);
    await m.unlink("/f/y");
    await m.sync();
    await m.close();
    const again = await open();
    for (const d of ["/d", "/e", "/f"]) expect((await again.getattr(d)).mtime, d).toBeGreaterThanOrEqual(d === "/e" ? t0 - 60_000 : t0);
    expect((await again.getattr("/e/sub")).mtime).toBe(old);
    await again.close();
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
    // A chown or chmod to what the file has stages nothing.
    await m2.chown("/f", 1000, 1001);
    await m2.chown("/f", -1, -1);
    await m2.chmod("/f", 0o600);
    expect(await m2.getattr("/f")).toMatchObject({ immutable: true });
    expect((await m2.status()).staged).toEqual({ added: [], modified: [], removed: [] });
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
      expect(await code(ro.open("/f", O_RDONLY | O_TRUNC))).toBe("READ_ONLY");
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

  it("keeps the data files of new files a sync stored as spares, and makes later new files of them, empty and with their own mtime", async () => {
    const { open, repo, stagingRoot } = await setup();
    const m = await open();
    m.kernelWrites();
    for (let i = 0; i < 5; i++) await writeFile(m, `/f${i}`, randomBytes(1000 + i));
    const data = join(stagingRoot, repo.env, "v", "data");
    const names = (): string[] => fs.readdirSync(data).sort();
    const before = names();
    expect(before).toHaveLength(5);
    await m.sync();
    // Off the sync's path: each file is renamed (small ones keep their bytes until taken), none deleted.
    const spares = (): string[] => names().filter((n) => !before.includes(n));
    for (let waited = 0; spares().length < 5 && waited < 5000; waited += 20) await new Promise((r) => setTimeout(r, 20));
    // One more turn of the loop: the renames' completions (which list the spares) run first.
    await new Promise((r) => setTimeout(r, 20));
    expect(spares()).toHaveLength(5);
    expect(names()).toHaveLength(5);
    for (const n of spares()) fs.utimesSync(join(data, n), new Date("2001-01-01"), new Date("2001-01-01"));
    const t0 = Date.now();
    await writeFile(m, "/g", "hello");
    await m.release(await m.create("/e", 0o644, O_WRONLY | O_CREAT));
    // Two new files, no new data file; each starts empty, whatever its spare held.
    expect(names()).toHaveLength(5);
    expect((await readAll(m, "/g")).toString()).toBe("hello");
    expect((await m.getattr("/e")).size).toBe(0);
    await m.close();
    // A remount finds the staged files on their spares' files (an empty file's mtime is its
    // file's), and keeps the three others as spares, emptied.
    const again = await open();
    expect((await readAll(again, "/g")).toString()).toBe("hello");
    expect((await again.status()).staged.added.sort()).toEqual(["e", "g"]);
    for (const p of ["/g", "/e"]) {
      const mtime = (await again.getattr(p)).mtime;
      expect(mtime).toBeGreaterThanOrEqual(t0 - 1000);
      expect(mtime).toBeLessThanOrEqual(Date.now() + 1000);
    }
    expect((await again.getattr("/e")).size).toBe(0);
    const empty = (): number => names().filter((n) => fs.statSync(join(data, n)).size === 0).length;
    for (let waited = 0; empty() < 4 && waited < 5000; waited += 20) await new Promise((r) => setTimeout(r, 20));
    expect(empty()).toBe(4);
    expect(names()).toHaveLength(5);
    const snap = repo.snapshot(await repo.version((await again.sync()).version!));
    expect(Buffer.from(await snap.readFile("g")).toString()).toBe("hello");
    expect((await snap.lookup("f3"))?.kind).toBe("file");
    await again.close();
  });

  it("keeps at most 64 MiB in spares not yet emptied", async () => {
    const { open, repo, stagingRoot } = await setup();
    const m = await open();
    m.kernelWrites();
    const block = randomBytes(1024 * 1024);
    for (let i = 0; i < 72; i++) await writeFile(m, `/f${i}`, block);
    const data = join(stagingRoot, repo.env, "v", "data");
    const before = fs.readdirSync(data);
    await m.sync();
    const held = (): number => fs.readdirSync(data).reduce((n, f) => n + fs.statSync(join(data, f)).size, 0);
    const renamed = (): number => fs.readdirSync(data).filter((f) => !before.includes(f)).length;
    for (let waited = 0; renamed() < 72 && waited < 10000; waited += 20) await new Promise((r) => setTimeout(r, 20));
    expect(renamed()).toBe(72);
    expect(held()).toBe(64 * 1024 * 1024);
    await m.close();
  });

  it("never lays changes made during a sync over another writer's version unchecked: the sync runs again and rebases them path by path", async () => {
    /** Runs `fn` once the mount has frozen its changes, before the repository's sync (the changes are "during the sync"). */
    const during = (repo: Repository, fn: () => Promise<void>): void => {
      const sync = repo.sync.bind(repo);
      repo.sync = async (...a: Parameters<Repository["sync"]>) => {
        repo.sync = sync;
        await fn();
        return sync(...a);
      };
    };
    {
      // A write to a file the other writer changed: a conflict, not their bytes overwritten.
      const { open, repo } = await setup();
      await commitElsewhere(repo, { "shared.txt": "base" });
      const m = await open();
      await writeFile(m, "/mine.txt", "mine");
      await commitElsewhere(repo, { "shared.txt": "THEIRS" });
      during(repo, () => writeFile(m, "/shared.txt", "ours"));
      const err = await m.sync({ onConflict: "fail" }).catch((e: VolumeError) => e);
      expect(err).toMatchObject({ code: "CONFLICT", details: { paths: ["shared.txt"] } });
      expect(Buffer.from(await repo.snapshot(await repo.resolve("v")).readFile("shared.txt")).toString()).toBe("THEIRS");
      expect((await readAll(m, "/shared.txt")).toString()).toBe("ours");
      const r = await m.sync({ onConflict: "theirs" });
      expect(r.conflicts).toEqual(["shared.txt"]);
      expect((await readAll(m, "/shared.txt")).toString()).toBe("THEIRS");
      expect((await readAll(m, "/mine.txt")).toString()).toBe("mine");
      await m.close();
    }
    {
      // A directory made during the sync where the other writer made one with files: both kept.
      const { open, repo } = await setup();
      const m = await open();
      await writeFile(m, "/mine.txt", "mine");
      await commitElsewhere(repo, { theirs1: "T1" });
      const theirs = repo.stage(await repo.resolve("v"));
      await theirs.mkdir(["results"]);
      await theirs.put(["results", "theirs.txt"], { kind: "file", name: "theirs.txt", mode: 0o644, mtime: 1, size: 1, pending: { kind: "bytes", data: Buffer.from("T") } });
      await repo.sync("v", await repo.resolve("v"), theirs);
      during(repo, async () => {
        await m.mkdir("/results", 0o755);
        await writeFile(m, "/results/ours.txt", "O");
      });
      const r = await m.sync({ onConflict: "fail" });
      expect(r.conflicts).toEqual([]);
      const head = repo.snapshot(await repo.resolve("v"));
      expect(Buffer.from(await head.readFile("results/theirs.txt")).toString()).toBe("T");
      expect(Buffer.from(await head.readFile("results/ours.txt")).toString()).toBe("O");
      expect((await m.readdir("/results")).sort()).toEqual(["ours.txt", "theirs.txt"]);
      await m.close();
    }
    {
      // A file made during the sync under a directory the other writer replaced by a file: refused, kept staged.
      const { open, repo } = await setup();
      const first = repo.stage(null);
      await first.mkdir(["d"]);
      await repo.sync("v", null, first);
      const m = await open();
      await writeFile(m, "/mine.txt", "mine");
      await commitElsewhere(repo, { d: null });
      await commitElsewhere(repo, { d: "now a file" });
      during(repo, () => writeFile(m, "/d/new.txt", "answered"));
      await expect(m.sync({ onConflict: "fail" })).rejects.toMatchObject({ code: "CONFLICT" });
      expect((await readAll(m, "/d/new.txt")).toString()).toBe("answered");
      expect((await m.status()).staged.added).toContain("d/new.txt");
      await m.close();
    }
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

  it("refuses changes and syncs once a journal write failed, and keeps what was journaled before it across a remount", async () => {
    const { open } = await setup();
    const m = await open();
    await writeFile(m, "/a", "one");
    // Fault injection: the disk is full for the next journal line.
    const staging = (m as unknown as { staging: { append: (op: unknown) => void } }).staging;
    const append = staging.append.bind(staging);
    let fail = true;
    staging.append = (op) => {
      if (fail) {
        fail = false;
        throw Object.assign(new Error("ENOSPC: no space left on device, write"), { code: "ENOSPC" });
      }
      append(op);
    };
    expect(await code(m.mkdir("/d", 0o755))).toBe("IO");
    // The disk has room again, but the mount answered a change it could not journal: no more.
    expect(await code(m.create("/b", 0o644, O_WRONLY | O_CREAT))).toBe("IO");
    expect(await code(m.sync())).toBe("IO");
    await m.close();
    const m2 = await open();
    expect(await m2.readdir("/")).toEqual(["a"]);
    expect((await readAll(m2, "/a")).toString()).toBe("one");
    await writeFile(m2, "/b", "two");
    expect((await m2.sync()).changed).toBe(true);
    await m2.close();
  });

  it("reloads to the head, refusing while changes are staged unless discarded", async () => {
    const { open, repo, stagingRoot } = await setup();
    const m = await open();
    m.kernelWrites();
    const data = join(stagingRoot, repo.env, "v", "data");
    const names = (): string[] => fs.readdirSync(data);
    /** Waits until none of `old` is in the data directory (renamed to spares), then one more turn of the loop. */
    const renamed = async (old: string[]): Promise<void> => {
      for (let waited = 0; names().some((n) => old.includes(n)) && waited < 5000; waited += 20) await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 20));
    };
    await writeFile(m, "/f", "one");
    const ofF = names();
    await m.sync();
    await renamed(ofF);
    const other = await commitElsewhere(repo, { g: "gg" });
    // mine takes f's data file, a spare since the sync.
    await writeFile(m, "/mine", "x");
    const ofMine = names();
    expect(ofMine).toHaveLength(1);
    expect(await code(m.reload())).toBe("NOT_EMPTY");
    expect(await m.reload({ discard: true })).toBe(other!.id);
    expect(await m.readdir("/")).toEqual(["f", "g"]);
    // The discarded file's data file becomes a spare too (not deleted), which the next new file takes.
    expect(names()).toHaveLength(1);
    await renamed(ofMine);
    await writeFile(m, "/next", "y");
    expect(names()).toHaveLength(1);
    expect((await readAll(m, "/next")).toString()).toBe("y");
    await m.close();
    const m2 = await open();
    expect(await m2.readdir("/")).toEqual(["f", "g", "next"]);
    await m2.close();
  });

  it("keeps the data file the kernel writes for an open handle (its backing file) out of the spares when a reload discards the file, until the handle is released", async () => {
    const { m, names, fh, fd } = await kernelWrittenLog();
    try {
      fs.writeSync(fd, "by the kernel");
      const ofLog = names();
      expect(ofLog).toHaveLength(1);
      await m.reload({ discard: true });
      await new Promise((r) => setTimeout(r, 200));
      // Still its own file: not renamed into a spare that a new file takes.
      expect(names()).toEqual(ofLog);
      await writeFile(m, "/new", "x");
      fs.writeSync(fd, " and more");
      expect((await readAll(m, "/new")).toString()).toBe("x");
      await m.release(fh);
      // Released, it is let go of at the next base move.
      await m.reload({ discard: true });
      for (let waited = 0; names().includes(ofLog[0]!) && waited < 5000; waited += 20) await new Promise((r) => setTimeout(r, 20));
      expect(names()).not.toContain(ofLog[0]);
    } finally {
      fs.closeSync(fd);
    }
    await m.close();
  });

  it("never makes a spare of a data file the kernel still wrote through when the mount closed: the next mount unlinks it once no name reaches it", async () => {
    const { open, m, names, fh, fd } = await kernelWrittenLog();
    try {
      fs.writeSync(fd, "by the kernel");
      const [ofLog] = names();
      // The session ends with the handle never released (an aborted connection).
      await m.close();
      const m2 = await open();
      m2.kernelWrites();
      await m2.unlink("/log");
      await m2.sync();
      for (let waited = 0; names().includes(ofLog!) && waited < 5000; waited += 20) await new Promise((r) => setTimeout(r, 20));
      await new Promise((r) => setTimeout(r, 20));
      expect(names()).toEqual([]); // unlinked, not renamed into a spare
      await writeFile(m2, "/new", "x");
      fs.writeSync(fd, " and more");
      expect((await readAll(m2, "/new")).toString()).toBe("x");
      await m2.close();
    } finally {
      fs.closeSync(fd);
    }
  });

  it("shows the other writer's file where a sync took theirs over a file a program writes through its backing file, also after a remount, and says it again only where the sync kept ours", async () => {
    for (const [policy, theirPath, shows] of [
      ["theirs", "log", "theirs\n"],
      ["ours", "log", "ours 1\nours 2\nours 3\n"],
      ["theirs", "other", "ours 1\nours 2\nours 3\n"],
    ] as const) {
      const { open, repo, m, fh, fd } = await kernelWrittenLog();
      try {
        fs.writeSync(fd, "ours 1\n");
        await m.sync();
        fs.writeSync(fd, "ours 2\n");
        await commitElsewhere(repo, { [theirPath]: "theirs\n" });
        const r = await m.sync({ onConflict: policy });
        expect(r.conflicts).toEqual(theirPath === "log" ? ["log"] : []);
        fs.writeSync(fd, "ours 3\n");
        expect((await readAll(m, "/log")).toString()).toBe(shows);
        await m.release(fh);
        await m.close();
        // The journal says the same to the next mount, and its next sync keeps it.
        const m2 = await open();
        expect((await readAll(m2, "/log")).toString()).toBe(shows);
        await m2.sync();
        expect(Buffer.from(await repo.snapshot(await repo.resolve("v")).readFile("log")).toString()).toBe(shows);
        await m2.close();
      } finally {
        fs.closeSync(fd);
      }
    }
  });

  it("keeps the file a program writes when the other writer made the same bytes, and shows their symlink, or their file in place of its directory, where theirs won with one", async () => {
    {
      const { repo, m, fh, fd } = await kernelWrittenLog();
      fs.writeSync(fd, "base\n");
      await m.sync();
      await commitElsewhere(repo, { log: "same\n" });
      fs.writeSync(fd, "same\n", 0);
      expect((await m.sync({ onConflict: "ours" })).conflicts).toEqual(["log"]);
      fs.writeSync(fd, "and after\n", 5);
      expect((await readAll(m, "/log")).toString()).toBe("same\nand after\n");
      await m.release(fh);
      fs.closeSync(fd);
      await m.sync();
      expect(Buffer.from(await repo.snapshot(await repo.resolve("v")).readFile("log")).toString()).toBe("same\nand after\n");
      await m.close();
    }
    {
      const { repo, m, fh, fd } = await kernelWrittenLog();
      fs.writeSync(fd, "ours 1\n");
      await m.sync();
      fs.writeSync(fd, "ours 2\n");
      const next = repo.stage(await repo.resolve("v"));
      await next.put(["log"], { kind: "symlink", name: "log", mode: 0o777, mtime: 1, target: "elsewhere" });
      await repo.sync("v", await repo.resolve("v"), next);
      expect((await m.sync({ onConflict: "theirs" })).conflicts).toEqual(["log"]);
      expect(await m.readlink("/log")).toBe("elsewhere");
      await m.release(fh);
      fs.closeSync(fd);
      await m.sync();
      expect((await repo.snapshot(await repo.resolve("v")).lookupSegments(["log"]))?.kind).toBe("symlink");
      await m.close();
    }
    {
      // Theirs put a file where the open file's directory was.
      const { open, repo } = await setup();
      const m = await open();
      m.kernelWrites();
      await m.mkdir("/d", 0o755);
      const fh = await m.create("/d/log", 0o644, O_WRONLY | O_CREAT);
      const fd = (await m.backingFd(fh))!;
      fs.writeSync(fd, "ours 1\n");
      await m.sync();
      fs.writeSync(fd, "ours 2\n");
      const next = repo.stage(await repo.resolve("v"));
      await next.remove(["d"], { recursive: true });
      await next.put(["d"], { kind: "file", name: "d", mode: 0o644, mtime: 1, size: 2, pending: { kind: "bytes", data: Buffer.from("D\n") } });
      await repo.sync("v", await repo.resolve("v"), next);
      await m.sync({ onConflict: "theirs" });
      expect((await readAll(m, "/d")).toString()).toBe("D\n");
      await m.release(fh);
      fs.closeSync(fd);
      await m.close();
      const m2 = await open();
      expect((await readAll(m2, "/d")).toString()).toBe("D\n");
      await m2.close();
    }
  });

  it("decides the same when the mount ends after such a sync committed and before it took the version in: the next mount that can read the store shows their file and nothing staged", async () => {
    const { open, repo, m, fh, fd } = await kernelWrittenLog();
    try {
      fs.writeSync(fd, "ours 1\n");
      await m.sync();
      fs.writeSync(fd, "ours 2\n");
      // Another change of ours, so that the sync commits a version of its own.
      await writeFile(m, "/mine", "mine");
      await commitElsewhere(repo, { log: "theirs\n" });
      // Fault injection: the mount dies right after the commit (its settle never reads the journal).
      const staging = (m as unknown as { staging: { readLayers: () => unknown } }).staging;
      staging.readLayers = () => {
        throw new Error("the mount died here");
      };
      await expect(m.sync({ onConflict: "theirs" })).rejects.toThrow("the mount died here");
      expect(Buffer.from(await repo.snapshot(await repo.resolve("v")).readFile("log")).toString()).toBe("theirs\n");
      await m.close();
      // Fault injection: the store fails the next mount's lookup of the file. That mount does not
      // open (it cannot decide); the one after decides.
      const snapshot = repo.snapshot.bind(repo);
      repo.snapshot = (v) => {
        const snap = snapshot(v);
        snap.lookupSegments = () => Promise.reject(new VolumeError("STORE_UNREACHABLE", "the store is down"));
        return snap;
      };
      await expect(open()).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
      repo.snapshot = snapshot;
      const m2 = await open();
      expect((await readAll(m2, "/log")).toString()).toBe("theirs\n");
      expect((await readAll(m2, "/mine")).toString()).toBe("mine");
      expect((await m2.status()).staged).toEqual({ added: [], modified: [], removed: [] });
      await m2.close();
      // Said again by the journal to the mount after.
      const m3 = await open();
      expect((await readAll(m3, "/log")).toString()).toBe("theirs\n");
      await m3.close();
      void fh;
    } finally {
      fs.closeSync(fd);
    }
  });

  it("lets a read-only handle read on what it opened when a reload removes its file or discards its staged bytes", async () => {
    const { open, repo } = await setup();
    const m = await open();
    await writeFile(m, "/gone", "stored bytes");
    await writeFile(m, "/kept", "stored");
    await writeFile(m, "/w", "mine");
    await m.sync();
    await commitElsewhere(repo, { gone: null, w: "theirs" });
    await writeFile(m, "/kept", "staged, then discarded");

    const gone = await m.open("/gone", O_RDONLY);
    const staged = await m.open("/kept", O_RDONLY);
    // A file also open for writing is one file for its handles: they follow its path.
    const writer = await m.open("/w", O_WRONLY);
    const reader = await m.open("/w", O_RDONLY);
    await m.reload({ discard: true });
    expect(Buffer.from(await m.read(gone, 100, 0)).toString()).toBe("stored bytes");
    expect(Buffer.from(await m.read(staged, 100, 0)).toString()).toBe("staged, then discarded");
    expect(await m.readdir("/")).toEqual(["kept", "w"]);
    expect((await readAll(m, "/kept")).toString()).toBe("stored");
    expect(Buffer.from(await m.read(reader, 100, 0)).toString()).toBe("theirs");
    await m.write(writer, Buffer.from("T"), 0);
    expect(Buffer.from(await m.read(reader, 100, 0)).toString()).toBe("Theirs");
    for (const fh of [gone, staged, writer, reader]) await m.release(fh);
    await m.close();
  });

  it("lets a read-only handle read on what it opened when a sync takes in another writer's change to its file, and follow its path when the sync stored the file as it was", async () => {
    const { open, repo } = await setup();
    const m = await open();
    await writeFile(m, "/theirs", "v1 bytes");
    await m.sync();
    await commitElsewhere(repo, { theirs: "v2, by another" });
    await writeFile(m, "/mine", "staged here");

    const old = await m.open("/theirs", O_RDONLY);
    const mine = await m.open("/mine", O_RDONLY);
    await m.sync();
    expect(Buffer.from(await m.read(old, 100, 0)).toString()).toBe("v1 bytes");
    expect((await readAll(m, "/theirs")).toString()).toBe("v2, by another");
    // The sync stored /mine as it was: the handle still follows its path.
    await m.truncate("/mine", 6);
    expect(Buffer.from(await m.read(mine, 100, 0)).toString()).toBe("staged");
    for (const fh of [old, mine]) await m.release(fh);
    await m.close();
  });
  it("keeps no whole-file copy of a file a reload changed while a handle was reading it into one", async () => {
    const { open, repo, dir } = await setup();
    const files = join(dir, "files");
    const m = await open({ copies: new FileCopyCache({ dir: files, maxBytes: 64 << 20 }) });
    const v1 = randomBytes(3 << 20);
    const v2 = randomBytes(3 << 20);
    await writeFile(m, "/f", v1);
    await m.sync();
    await commitElsewhere(repo, { f: v2 });

    const fh = await m.open("/f", O_RDONLY);
    expect(Buffer.from(await m.read(fh, 1 << 20, 0)).equals(v1.subarray(0, 1 << 20))).toBe(true); // starts a copy of v1
    await m.reload();
    // A read-only handle keeps the bytes it opened: the rest is v1's; a new open reads v2.
    expect(Buffer.from(await m.read(fh, 2 << 20, 1 << 20)).equals(v1.subarray(1 << 20))).toBe(true);
    expect((await readAll(m, "/f")).equals(v2)).toBe(true);
    await m.release(fh);
    await m.close();
    // A whole copy is renamed into place once its writes end.
    const writing = () => fs.readdirSync(files, { recursive: true, encoding: "utf8" }).filter((p) => /(^|\/)tmp\/./.test(p));
    for (let i = 0; i < 100 && writing().length > 0; i++) await new Promise((r) => setTimeout(r, 20));
    const kept = fs.existsSync(files) ? fs.readdirSync(files, { recursive: true, withFileTypes: true }).filter((e) => e.isFile() && /^[0-9a-f]{64}$/.test(e.name)) : [];
    for (const e of kept) {
      const bytes = readFileSync(join(e.parentPath ?? e.path, e.name));
      expect(bytes.equals(v1) || bytes.equals(v2)).toBe(true);
    }
  });

  it("reads a staged file's unchanged bytes from its base's whole copy, not from the store", async () => {
    const objects = countingStore(new MemoryObjectStore());
    const { open, dir } = await setup(objects);
    const files = join(dir, "files");
    const data = randomBytes(3 << 20);
    const m = await open();
    await writeFile(m, "/f", data);
    await m.sync();
    await m.close();

    // A memory cache of 1 MiB: what the first read fetched is gone from memory by the second.
    const m2 = await open({ copies: new FileCopyCache({ dir: files, maxBytes: 64 << 20 }), cacheBytes: 1 << 20 });
    expect((await readAll(m2, "/f")).equals(data)).toBe(true); // makes the whole copy
    const writing = () => fs.readdirSync(files, { recursive: true, encoding: "utf8" }).filter((p) => /(^|\/)tmp\/./.test(p));
    for (let i = 0; i < 100 && writing().length > 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(writing()).toEqual([]);

    const edit = Buffer.from("edited in the middle");
    const fh = await m2.open("/f", O_RDWR);
    await m2.write(fh, edit, 1536 << 10);
    await m2.release(fh);
    edit.copy(data, 1536 << 10);
    const gets = objects.gets;
    expect((await readAll(m2, "/f")).equals(data)).toBe(true);
    expect(objects.gets - gets).toBe(0);
    await m2.close();
  });

  it("reads a staged file's unchanged chunks ahead of a sequential reader", async () => {
    const objects = countingStore(new MemoryObjectStore());
    const { open } = await setup(objects);
    const data = randomBytes(6 << 20);
    const m = await open();
    await writeFile(m, "/f", data);
    await m.sync();
    await m.close();

    const m2 = await open();
    const fh = await m2.open("/f", O_RDWR);
    await m2.write(fh, Buffer.from("tail"), data.length - 4);
    Buffer.from("tail").copy(data, data.length - 4);
    const fetched = objects.packGetBytes;
    for (let off = 0; off < 2 << 20; off += 128 << 10) {
      expect(Buffer.from(await m2.read(fh, 128 << 10, off)).equals(data.subarray(off, off + (128 << 10)))).toBe(true);
    }
    // Read 2 MiB, one chunk past it at most without readahead: the reader fetched further.
    await new Promise((r) => setTimeout(r, 50));
    expect(objects.packGetBytes - fetched).toBeGreaterThan(3 << 20);
    await m2.release(fh);
    await m2.close();
  });
});

/** A small seeded PRNG (mulberry32). */
function rng(seed: number): () => number {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const FS_CODES: Record<string, string> = { ENOENT: "NOT_FOUND", EEXIST: "ALREADY_EXISTS", ENOTDIR: "NOT_A_DIRECTORY", EISDIR: "IS_A_DIRECTORY", ENOTEMPTY: "NOT_EMPTY", EINVAL: "INVALID_ARGUMENT" };

function fsCode(fn: () => void): string | undefined {
  try {
    fn();
    return undefined;
  } catch (err) {
    const c = (err as NodeJS.ErrnoException).code ?? "?";
    return FS_CODES[c] ?? c;
  }
}

type Tree = Record<string, string>;

function refTree(root: string): Tree {
  const out: Tree = {};
  const walk = (rel: string): void => {
    for (const name of fs.readdirSync(join(root, rel)).sort()) {
      const p = rel ? `${rel}/${name}` : name;
      const st = fs.lstatSync(join(root, p));
      if (st.isSymbolicLink()) out[p] = `l ${fs.readlinkSync(join(root, p))}`;
      else if (st.isDirectory()) {
        out[p] = `d ${(st.mode & 0o7777).toString(8)}`;
        walk(p);
      } else out[p] = `f ${(st.mode & 0o7777).toString(8)} ${st.size} ${fs.readFileSync(join(root, p)).toString("base64").slice(0, 64)}:${hashOf(fs.readFileSync(join(root, p)))}`;
    }
  };
  walk("");
  return out;
}

function hashOf(b: Uint8Array): string {
  let h = 2166136261;
  for (let i = 0; i < b.length; i++) h = Math.imul(h ^ b[i]!, 16777619);
  return (h >>> 0).toString(16);
}

async function mountTree(m: MountedVolume): Promise<Tree> {
  const out: Tree = {};
  const walk = async (rel: string): Promise<void> => {
    for (const name of await m.readdir("/" + rel)) {
      const p = rel ? `${rel}/${name}` : name;
      const a = await m.getattr("/" + p);
      if (a.kind === "symlink") out[p] = `l ${await m.readlink("/" + p)}`;
      else if (a.kind === "dir") {
        out[p] = `d ${a.mode.toString(8)}`;
        await walk(p);
      } else {
        const data = await readAll(m, "/" + p);
        expect(data.length).toBe(a.size);
        out[p] = `f ${a.mode.toString(8)} ${a.size} ${data.toString("base64").slice(0, 64)}:${hashOf(data)}`;
      }
    }
  };
  await walk("");
  return out;
}

describe("MountedVolume against a local directory", () => {
  it("gives the same tree and the same errors for a random sequence of operations, before and after sync and reopen", async () => {
    const { open, dir } = await setup();
    const ref = join(dir, "ref");
    mkdirSync(ref);
    let m = await open();
    const rand = rng(42);
    const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
    const names = ["a", "b", "c", "d"];
    const randPath = (): string => Array.from({ length: 1 + Math.floor(rand() * 3) }, () => pick(names)).join("/");
    const bytes = (n: number): Buffer => {
      const b = Buffer.alloc(n);
      for (let i = 0; i < n; i++) b[i] = Math.floor(rand() * 256);
      return b;
    };
    const isLink = (p: string): boolean => {
      try {
        return fs.lstatSync(join(ref, p)).isSymbolicLink();
      } catch {
        return false;
      }
    };
    const exists = (p: string): boolean => {
      try {
        fs.lstatSync(join(ref, p));
        return true;
      } catch {
        return false;
      }
    };
    const viaLink = (p: string): boolean => {
      const segs = p.split("/");
      for (let i = 1; i < segs.length; i++) if (isLink(segs.slice(0, i).join("/"))) return true;
      return false;
    };
    let mismatches: string[] = [];
    for (let step = 0; step < 400; step++) {
      const p = randPath();
      const kind = pick(["create", "create", "write", "write", "truncate", "rename", "unlink", "mkdir", "mkdir", "rmdir", "symlink", "chmod"]);
      if (isLink(p) && ["create", "write", "truncate", "chmod"].includes(kind)) continue;
      if (viaLink(p)) continue;
      let a: string | undefined;
      let b: string | undefined;
      if (kind === "create") {
        const data = bytes(rand() < 0.2 ? Math.floor(rand() * 600_000) : Math.floor(rand() * 2000));
        const isNew = !exists(p);
        a = fsCode(() => {
          fs.writeFileSync(join(ref, p), data);
          if (isNew) fs.chmodSync(join(ref, p), 0o644);
        });
        b = await code(writeFile(m, "/" + p, data));
      } else if (kind === "write") {
        const off = Math.floor(rand() * 700_000);
        const data = bytes(1 + Math.floor(rand() * (rand() < 0.3 ? 100_000 : 100)));
        a = fsCode(() => {
          const fd = fs.openSync(join(ref, p), "r+");
          fs.writeSync(fd, data, 0, data.length, off);
          fs.closeSync(fd);
        });
        b = await code(
          (async () => {
            const fh = await m.open("/" + p, O_RDWR);
            await m.write(fh, data, off);
            await m.release(fh);
          })(),
        );
      } else if (kind === "truncate") {
        const size = Math.floor(rand() * 800_000);
        a = fsCode(() => fs.truncateSync(join(ref, p), size));
        b = await code(m.truncate("/" + p, size));
      } else if (kind === "rename") {
        const q = randPath();
        if (viaLink(q)) continue;
        a = fsCode(() => fs.renameSync(join(ref, p), join(ref, q)));
        b = await code(m.rename("/" + p, "/" + q));
        if (a !== b) mismatches.push(`to ${q}`);
      } else if (kind === "unlink") {
        a = fsCode(() => fs.unlinkSync(join(ref, p)));
        b = await code(m.unlink("/" + p));
      } else if (kind === "mkdir") {
        a = fsCode(() => {
          fs.mkdirSync(join(ref, p));
          fs.chmodSync(join(ref, p), 0o750);
        });
        b = await code(m.mkdir("/" + p, 0o750));
      } else if (kind === "rmdir") {
        a = fsCode(() => fs.rmdirSync(join(ref, p)));
        b = await code(m.rmdir("/" + p));
      } else if (kind === "symlink") {
        const target = `../nowhere/${pick(names)}`;
        a = fsCode(() => fs.symlinkSync(target, join(ref, p)));
        b = await code(m.symlink(target, "/" + p));
      } else {
        const mode = pick([0o600, 0o644, 0o755, 0o700]);
        a = fsCode(() => fs.chmodSync(join(ref, p), mode));
        b = await code(m.chmod("/" + p, mode));
      }
      if (a !== b) mismatches.push(`${step} ${kind} ${p}: fs ${a} mount ${b}`);
      if (step === 150 || step === 300) {
        expect(await mountTree(m)).toEqual(refTree(ref));
        await m.sync({ message: `step ${step}` });
        expect(await mountTree(m)).toEqual(refTree(ref));
      }
    }
    expect(mismatches).toEqual([]);
    const want = refTree(ref);
    expect(Object.keys(want).length).toBeGreaterThan(5);
    expect(await mountTree(m)).toEqual(want);
    await m.close();
    m = await open();
    expect(await mountTree(m)).toEqual(want);
    await m.sync();
    await m.close();
    m = await open();
    expect(await mountTree(m)).toEqual(want);
    expect((await m.status()).staged).toEqual({ added: [], modified: [], removed: [] });
    await m.close();
    mismatches = [];
  });
});

/** Counts bytes put under `packs/` (the chunk uploads), GETs of packs (the chunk fetches) and their bytes, and all GETs. */
function countingStore(store: ObjectStore): ObjectStore & { packBytes: number; packGets: number; packGetBytes: number; gets: number } {
  const s = {
    packBytes: 0,
    packGets: 0,
    packGetBytes: 0,
    gets: 0,
    url: store.url,
    put: async (key: string, body: Uint8Array, o?: Parameters<ObjectStore["put"]>[2]) => {
      if (key.startsWith("packs/")) s.packBytes += body.length;
      return store.put(key, body, o);
    },
    putFile: async (key: string, path: string, o?: Parameters<ObjectStore["putFile"]>[2]) => {
      if (key.startsWith("packs/")) s.packBytes += fs.statSync(path).size;
      return store.putFile(key, path, o);
    },
    get: async (key: string, range?: Parameters<ObjectStore["get"]>[1]) => {
      s.gets++;
      if (!key.startsWith("packs/")) return store.get(key, range);
      s.packGets++;
      const b = await store.get(key, range);
      s.packGetBytes += b.length;
      return b;
    },
    head: store.head.bind(store),
    list: store.list.bind(store),
    delete: store.delete.bind(store),
  };
  return s;
}

/** Writes `size` seeded random bytes to a new file in 1 MiB writes; returns them. */
async function writeRandomFile(m: MountedVolume, path: string, size: number, seed: number): Promise<Buffer> {
  const data = Buffer.alloc(size);
  const rand = rng(seed);
  for (let i = 0; i < size; i += 4) data.writeUInt32LE(Math.floor(rand() * 2 ** 32), i);
  const fh = await m.create(path, 0o644, O_WRONLY | O_CREAT);
  for (let off = 0; off < size; off += 1 << 20) await m.write(fh, data.subarray(off, off + (1 << 20)), off);
  await m.release(fh);
  return data;
}

describe("MountedVolume with a large base file", () => {
  it("uploads only the chunks around three edits of a 64 MiB file, and reads the result right", async () => {
    const objects = countingStore(new MemoryObjectStore());
    const { open, repo } = await setup(objects);
    const size = 64 << 20;
    const m = await open();
    const want = await writeRandomFile(m, "/big.bin", size, 7);
    await m.sync();
    const before = objects.packBytes;
    expect(before).toBeGreaterThanOrEqual(size);

    const edits: [number, Buffer][] = [
      [1_000_000, Buffer.from("first edit")],
      [30_000_000, Buffer.alloc(5000, 0x41)],
      [size - 100, Buffer.from("near the end, and past it: the file grows ".repeat(8))],
    ];
    const wh = await m.open("/big.bin", O_RDWR);
    for (const [off, data] of edits) await m.write(wh, data, off);
    await m.release(wh);
    const grown = Buffer.concat([want, Buffer.alloc(1000)]);
    for (const [off, data] of edits) data.copy(grown, off);
    const expected = grown.subarray(0, size - 100 + edits[2]![1].length);
    expect((await m.getattr("/big.bin")).size).toBe(expected.length);
    expect((await m.getattr("/big.bin")).immutable).toBe(false);

    const r = await m.sync({ message: "three edits" });
    const uploaded = objects.packBytes - before;
    expect(uploaded).toBeLessThan(size / 50);
    const entry = await repo.snapshot(await repo.version(r.version!)).stat("big.bin");
    expect(entry.kind === "file" && entry.size).toBe(expected.length);
    const got = await readAll(m, "/big.bin");
    expect(got.equals(expected)).toBe(true);
    const fromRepo = Buffer.from(await repo.snapshot(await repo.version(r.version!)).readFile("big.bin"));
    expect(fromRepo.equals(expected)).toBe(true);
    await m.close();
  }, 120_000);
});

describe("MountedVolume reading a large stored file", () => {
  it("fetches a sequential read in a few large ranged GETs, not one per read", async () => {
    const objects = countingStore(new MemoryObjectStore());
    const { dir, open, stagingRoot } = await setup(objects);
    const w = await open();
    const want = await writeRandomFile(w, "/big.bin", 64 << 20, 11);
    await w.sync();
    await w.close();

    // A new repository over the same store: no chunk is in any memory or cache.
    const repo = new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects });
    const m = await MountedVolume.open({ repo, volume: "v", stagingRoot });
    const before = objects.packGets;
    const got = await readAll(m, "/big.bin");
    const gets = objects.packGets - before;
    expect(got.equals(want)).toBe(true);
    // 64 reads of 1 MiB. A window topped up on every read made 56 GETs here (about one per
    // read); topped up by half a window at a time, 25 (the window grows from 256 KiB, and a
    // range never spans two packs).
    expect(gets).toBeGreaterThan(0);
    expect(gets).toBeLessThanOrEqual(32);
    await m.close();
  }, 120_000);
});

const s3describe = s3Skipped() ? describe.skip : describe;

s3describe("MountedVolume reading from S3 into buffers it gives back to the GET worker", () => {
  it("reads the right bytes, and makes a right whole copy, while its readers' buffers go back and come again with later bodies", async () => {
    const fx = await makeTestS3Store({ prefix: "leased reads" });
    try {
      const { dir, open, stagingRoot } = await setup(fx.store);
      const data = randomBytes(40 << 20);
      const w = await open();
      await writeFile(w, "/f", data);
      await w.sync();
      await w.close();

      // A new repository: no chunk in any memory. A reader's cache of 4 MiB: what it fetched
      // goes (and its buffers back to the worker) while other reads still come in.
      const repo = new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects: fx.store });
      const files = join(dir, "files");
      const m = await MountedVolume.open({ repo, volume: "v", stagingRoot, copies: new FileCopyCache({ dir: files, maxBytes: 256 << 20 }), cacheBytes: 4 << 20, readaheadBytes: 1 << 20 });
      const recycled = recycledBuffers();
      const reused = fx.s3.fetcher!.reusedBodies;
      const wrong: string[] = [];
      // Checked in the task the pieces came in: that is as long as a reply keeps them.
      const check = (pieces: Uint8Array[], at: number, n: number): void => {
        const got = Buffer.concat(pieces);
        if (!got.equals(data.subarray(at, Math.min(data.length, at + n)))) wrong.push(`${at}+${n}: ${got.length} bytes`);
      };
      const whole = async (): Promise<void> => {
        const fh = await m.open("/f", O_RDONLY);
        for (let at = 0; at < data.length; at += 128 << 10) check(await m.readv(fh, 128 << 10, at), at, 128 << 10);
        await m.release(fh);
      };
      const random = async (seed: number): Promise<void> => {
        const rand = rng(seed);
        const fh = await m.open("/f", O_RDONLY);
        for (let i = 0; i < 60; i++) {
          const at = Math.floor(rand() * data.length);
          const n = 1 + Math.floor(rand() * (3 << 20));
          check(await m.readv(fh, n, at), at, n);
        }
        await m.release(fh);
      };
      await Promise.all([whole(), random(1), random(2), random(3)]);
      expect(wrong).toEqual([]);
      expect(recycledBuffers()).toBeGreaterThan(recycled);
      expect(fx.s3.fetcher!.reusedBodies).toBeGreaterThan(reused);

      // The whole reader's copy was written from views of those buffers: the writes held them.
      const writing = () => fs.readdirSync(files, { recursive: true, encoding: "utf8" }).filter((p) => /(^|\/)tmp\/./.test(p));
      for (let i = 0; i < 250 && writing().length > 0; i++) await new Promise((r) => setTimeout(r, 20));
      const copies = fs.readdirSync(files, { recursive: true, withFileTypes: true }).filter((e) => e.isFile() && /^[0-9a-f]{64}$/.test(e.name));
      expect(copies.length).toBeGreaterThan(0);
      for (const e of copies) expect(readFileSync(join(e.parentPath ?? e.path, e.name)).equals(data)).toBe(true);
      await m.close();
    } finally {
      await fx.cleanup();
    }
  }, 180_000);
});
