/**
 * `strata mount` end to end on real kernel FUSE mounts. Each mount is served by a child process
 * (`node --import tsx sdk/main.ts mount …`), so this process may use synchronous fs calls on it. Every mount
 * is detached in afterAll, even after a failure. The embedded file store by default; one case on
 * S3 (Ceph RGW from the global setup).
 */
import { execFile, execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import {
  appendFileSync,
  chmodSync,
  closeSync,
  existsSync,
  constants,
  fstatSync,
  fsyncSync,
  ftruncateSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  readSync,
  renameSync,
  rmdirSync,
  rmSync,
  symlinkSync,
  truncateSync,
  unlinkSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { loadConfig, Strata, Volume } from "../sdk/index.js";
import { makeTestS3Store, type TestS3Store } from "./support/s3.js";

const execAsync = promisify(execFile);
const ROOT = resolve(__dirname, "..");
/** The CLI from the TypeScript sources (bin/strata would prefer a possibly stale dist/). */
const CLI = ["--import", "tsx", join(ROOT, "sdk/main.ts")];

/** A deterministic PRNG (mulberry32), so that a failing sequence can be replayed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

interface Env {
  base: string;
  env: NodeJS.ProcessEnv;
  strata(...args: string[]): Promise<string>;
  strataFail(...args: string[]): Promise<{ code: number; stderr: string }>;
  /** Starts `strata mount NAME DIR ...` in a child process; resolves once the mount answers. */
  mount(name: string, dir: string, ...extra: string[]): Promise<ChildProcess>;
  /** Creates volume NAME and mounts it at BASE/NAME; resolves to that directory. */
  mountNew(name: string): Promise<string>;
  unmount(dir: string): Promise<void>;
  cleanup(): Promise<void>;
}

/** Resolves once `child` has exited (at once if it has). */
function exitOf(child: ChildProcess): Promise<void> {
  return new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r() : child.once("exit", () => r())));
}

function isMounted(dir: string): boolean {
  return readFileSync("/proc/self/mountinfo", "utf8").split("\n").some((l) => l.split(" ")[4] === dir);
}

function makeEnv(extraEnv: NodeJS.ProcessEnv = {}): Env {
  const base = mkdtempSync(join(tmpdir(), "strata-mount-"));
  const env: NodeJS.ProcessEnv = { ...process.env, STRATA_HOME: join(base, "home"), AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true", ...extraEnv };
  delete env.STRATA_STORE;
  Object.assign(env, extraEnv);
  const children = new Set<ChildProcess>();
  const dirs = new Set<string>();
  const strata = async (...args: string[]) => {
    try {
      const { stdout } = await execAsync(process.execPath, [...CLI, ...args], { env, maxBuffer: 64 << 20 });
      return stdout;
    } catch (err) {
      const e = err as { stderr?: string; code?: number };
      throw new Error(`strata ${args.join(" ")} exited ${e.code}: ${e.stderr}`);
    }
  };
  return {
    base,
    env,
    strata,
    async strataFail(...args) {
      try {
        await execAsync(process.execPath, [...CLI, ...args], { env });
      } catch (err) {
        const e = err as { stderr: string; code: number };
        return { code: e.code, stderr: e.stderr };
      }
      throw new Error(`strata ${args.join(" ")} succeeded`);
    },
    async mount(name, dir, ...extra) {
      mkdirSync(dir, { recursive: true });
      dirs.add(dir);
      const child = spawn(process.execPath, [...CLI, "mount", name, dir, ...extra], { env, stdio: ["ignore", "ignore", "pipe"] });
      children.add(child);
      let stderr = "";
      child.stderr!.on("data", (d) => (stderr += d));
      let exited = false;
      child.on("exit", () => {
        exited = true;
        children.delete(child);
      });
      for (let i = 0; ; i++) {
        if (exited) throw new Error(`strata mount ${name} ${dir} exited: ${stderr}`);
        if (isMounted(dir) && existsSync(join(dir, ".strata/version"))) return child;
        if (i > 1200) throw new Error(`strata mount ${name} ${dir}: not live after 60 s: ${stderr}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    async mountNew(name) {
      await strata("volume", "create", name);
      const dir = join(base, name);
      await this.mount(name, dir);
      return dir;
    },
    async unmount(dir) {
      await strata("unmount", dir);
      for (let i = 0; i < 200 && isMounted(dir); i++) await new Promise((r) => setTimeout(r, 50));
    },
    async cleanup() {
      for (const dir of dirs) {
        if (isMounted(dir)) {
          try {
            execFileSync("fusermount", ["-uz", dir]);
          } catch {
            execFileSync("umount", ["-l", dir]);
          }
        }
      }
      const waits = [...children].map((c) => new Promise((r) => (c.exitCode !== null ? r(null) : c.once("exit", r))));
      for (const c of children) c.kill("SIGTERM");
      await Promise.race([Promise.all(waits), new Promise((r) => setTimeout(r, 5000))]);
      for (const c of children) c.kill("SIGKILL");
      rmSync(base, { recursive: true, force: true });
    },
  };
}

/** A description of a tree for comparison: kind, permission bits, size and content. */
function snapshotTree(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string, rel: string) => {
    for (const name of readdirSync(d).sort()) {
      if (rel === "" && name === ".strata") continue;
      const p = join(d, name);
      const r = rel ? `${rel}/${name}` : name;
      const st = lstatSync(p);
      // An mtime set by utimes (long past) must match; others are only "recent".
      const t = st.mtimeMs < 1.5e12 ? String(st.mtimeMs) : "recent";
      if (st.isSymbolicLink()) out[r] = `link ${readlinkSync(p)}`;
      else if (st.isDirectory()) {
        out[r] = `dir ${(st.mode & 0o777).toString(8)} ${t}`;
        walk(p, r);
      } else out[r] = `file ${(st.mode & 0o777).toString(8)} ${t} ${st.nlink} ${st.size} ${createHash("sha256").update(readFileSync(p)).digest("hex").slice(0, 16)}`;
    }
  };
  walk(dir, "");
  return out;
}

/** Makes each name of a hard link under `dir` a file of its own, with the same bytes and mode. */
function unlinkHardLinks(dir: string): void {
  const { atime, mtime } = lstatSync(dir);
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    const st = lstatSync(p);
    if (st.isDirectory()) unlinkHardLinks(p);
    else if (st.isFile() && st.nlink > 1) {
      const bytes = readFileSync(p);
      unlinkSync(p);
      writeFileSync(p, bytes, { mode: st.mode & 0o7777 });
      chmodSync(p, st.mode & 0o7777);
      utimesSync(p, st.atime, st.mtime);
    }
  }
  // The same names are there: the directory's times stay.
  utimesSync(dir, atime, mtime);
}

/** Applies the same random operations to two directories; a failure must be the same errno in both. */
function randomOps(a: string, b: string, rand: () => number, count: number, log: string[]): void {
  const names = ["a", "b", "c", "d", "e", "f"];
  const pick = <T>(xs: T[]) => xs[Math.floor(rand() * xs.length)]!;
  const randPath = () => {
    const depth = 1 + Math.floor(rand() * 3);
    return Array.from({ length: depth }, () => pick(names)).join("/");
  };
  const bytes = (n: number) => {
    const buf = Buffer.alloc(n);
    for (let i = 0; i < n; i++) buf[i] = Math.floor(rand() * 256);
    return buf;
  };
  const sizes = [0, 1, 100, 4096, 5000, 70_000, 300_000];
  for (let i = 0; i < count; i++) {
    const p = randPath();
    const q = randPath();
    const kind = pick(["create", "create", "write", "write", "append", "truncate", "rename", "rename", "unlink", "mkdir", "mkdir", "rmdir", "symlink", "chmod", "opentrunc", "link", "excl", "utimes"]);
    let op: (root: string) => void;
    let desc: string;
    switch (kind) {
      case "create": {
        const data = bytes(pick(sizes));
        desc = `create ${p} ${data.length}`;
        op = (r) => writeFileSync(join(r, p), data);
        break;
      }
      case "write": {
        const data = bytes(1 + Math.floor(rand() * 9000));
        const at = Math.floor(rand() * 80_000);
        desc = `write ${p} @${at} ${data.length}`;
        op = (r) => {
          const fd = openSync(join(r, p), "r+");
          try {
            writeSync(fd, data, 0, data.length, at);
          } finally {
            closeSync(fd);
          }
        };
        break;
      }
      case "append": {
        const data = bytes(1 + Math.floor(rand() * 5000));
        desc = `append ${p} ${data.length}`;
        op = (r) => appendFileSync(join(r, p), data);
        break;
      }
      case "opentrunc": {
        // O_TRUNC truncates even an open for reading only (O_CREAT makes the file when missing).
        const flags = constants.O_RDONLY | constants.O_TRUNC | (rand() < 0.5 ? constants.O_CREAT : 0);
        desc = `open ${p} O_RDONLY|O_TRUNC${flags & constants.O_CREAT ? "|O_CREAT" : ""}`;
        op = (r) => closeSync(openSync(join(r, p), flags, 0o644));
        break;
      }
      case "utimes": {
        // A time long past, told apart from "now" in snapshotTree.
        const t = 1_000_000_000 + Math.floor(rand() * 1000);
        desc = `utimes ${p} ${t}`;
        op = (r) => utimesSync(join(r, p), t, t);
        break;
      }
      case "link":
        desc = `link ${p} ${q}`;
        op = (r) => linkSync(join(r, p), join(r, q));
        break;
      case "excl": {
        const data = bytes(pick([0, 1, 100]));
        desc = `create O_EXCL ${p} ${data.length}`;
        op = (r) => {
          const fd = openSync(join(r, p), constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o640);
          try {
            writeSync(fd, data);
          } finally {
            closeSync(fd);
          }
        };
        break;
      }
      case "truncate": {
        const size = pick([0, 10, 3000, 100_000]);
        desc = `truncate ${p} ${size}`;
        op = (r) => truncateSync(join(r, p), size);
        break;
      }
      case "rename":
        desc = `rename ${p} ${q}`;
        op = (r) => renameSync(join(r, p), join(r, q));
        break;
      case "unlink":
        desc = `unlink ${p}`;
        op = (r) => unlinkSync(join(r, p));
        break;
      case "mkdir":
        desc = `mkdir ${p}`;
        op = (r) => mkdirSync(join(r, p), { mode: 0o755 });
        break;
      case "rmdir":
        desc = `rmdir ${p}`;
        op = (r) => rmdirSync(join(r, p));
        break;
      case "symlink": {
        const target = pick(["a", "../b", "x/y", "/etc/hostname"]);
        desc = `symlink ${p} -> ${target}`;
        op = (r) => symlinkSync(target, join(r, p));
        break;
      }
      default: {
        const mode = pick([0o600, 0o644, 0o755, 0o700]);
        desc = `chmod ${p} ${mode.toString(8)}`;
        op = (r) => {
          const st = lstatSync(join(r, p));
          if (st.isSymbolicLink()) throw Object.assign(new Error("skip symlink"), { code: "SKIP" });
          // The mode of a hard link's names is kept per name (README: hard links), not per file.
          if (st.isFile() && st.nlink > 1) throw Object.assign(new Error("skip hard link"), { code: "SKIP" });
          chmodSync(join(r, p), mode);
        };
      }
    }
    let ea: string | undefined;
    let eb: string | undefined;
    try {
      op(a);
    } catch (err) {
      ea = (err as NodeJS.ErrnoException).code ?? String(err);
    }
    try {
      op(b);
    } catch (err) {
      eb = (err as NodeJS.ErrnoException).code ?? String(err);
    }
    log.push(`${desc}: ${ea ?? "ok"}`);
    if (ea !== eb) throw new Error(`op ${i} "${desc}": mount ${ea ?? "ok"}, reference ${eb ?? "ok"}\n${log.slice(-20).join("\n")}`);
  }
}

describe("strata mount on the file store", () => {
  let e: Env;
  beforeAll(() => {
    e = makeEnv();
  });
  afterAll(async () => {
    await e?.cleanup();
  });

  it("matches a local directory under random operations, after sync and after a remount", async () => {
    await e.strata("volume", "create", "rand");
    const mnt = join(e.base, "rand");
    const ref = join(e.base, "rand-ref");
    mkdirSync(ref);
    await e.mount("rand", mnt);
    const rand = rng(Number(process.env.STRATA_TEST_SEED ?? 20261122));
    const log: string[] = [];
    for (let batch = 0; batch < 8; batch++) {
      randomOps(mnt, ref, rand, 40, log);
      expect(snapshotTree(mnt), `after batch ${batch}`).toEqual(snapshotTree(ref));
      if (batch === 3 || batch === 7) {
        const v = (await e.strata("sync", mnt, "--message", `batch ${batch}`)).trim();
        expect(v).toMatch(/^[0-9a-f]{64}$/);
        // A version keeps no inodes: a sync stores each name of a hard link as a file of its own.
        unlinkHardLinks(ref);
        const st = JSON.parse(await e.strata("status", mnt, "--json"));
        expect(st).toEqual({ volume: "rand", base: v, staged: { added: [], modified: [], removed: [] } });
        expect(snapshotTree(mnt)).toEqual(snapshotTree(ref));
      }
    }
    await e.unmount(mnt);
    expect(isMounted(mnt)).toBe(false);
    await e.mount("rand", mnt);
    expect(snapshotTree(mnt)).toEqual(snapshotTree(ref));
    await e.unmount(mnt);
  }, 300_000);

  it("reports staged changes in status and keeps them across a remount", async () => {
    const mnt = await e.mountNew("st");
    writeFileSync(join(mnt, "keep.txt"), "one\n");
    const v1 = (await e.strata("sync", mnt)).trim();
    writeFileSync(join(mnt, "new.txt"), "new\n");
    writeFileSync(join(mnt, "keep.txt"), "two\n");
    // fsync(2) of the directory (the last step of an atomic replace) is answered after it forced the names to the disk.
    const dirFd = openSync(mnt, "r");
    try {
      fsyncSync(dirFd);
    } finally {
      closeSync(dirFd);
    }
    const st = JSON.parse(await e.strata("status", mnt, "--json"));
    expect(st.volume).toBe("st");
    expect(st.base).toBe(v1);
    expect(st.staged.added).toContain("new.txt");
    expect(st.staged.modified).toContain("keep.txt");
    await e.unmount(mnt);
    await e.mount("st", mnt);
    expect(readFileSync(join(mnt, "new.txt"), "utf8")).toBe("new\n");
    expect(readFileSync(join(mnt, "keep.txt"), "utf8")).toBe("two\n");
    await e.unmount(mnt);
  }, 120_000);

  it("keeps two forks mounted at once isolated", async () => {
    await e.strata("volume", "create", "base");
    const src = join(e.base, "seed.txt");
    writeFileSync(src, "seed\n");
    await e.strata("put", "base", src, "seed.txt");
    await e.strata("fork", "base", "f1");
    await e.strata("fork", "base", "f2");
    const m1 = join(e.base, "f1");
    const m2 = join(e.base, "f2");
    await e.mount("f1", m1);
    await e.mount("f2", m2);
    writeFileSync(join(m1, "seed.txt"), "one\n");
    writeFileSync(join(m1, "only1"), "1");
    writeFileSync(join(m2, "seed.txt"), "two\n");
    expect(readFileSync(join(m2, "seed.txt"), "utf8")).toBe("two\n");
    expect(existsSync(join(m2, "only1"))).toBe(false);
    await e.strata("sync", m1);
    await e.strata("sync", m2);
    expect(readFileSync(join(m1, "seed.txt"), "utf8")).toBe("one\n");
    expect(readFileSync(join(m2, "seed.txt"), "utf8")).toBe("two\n");
    expect(await e.strata("cat", "f1", "seed.txt")).toBe("one\n");
    expect(await e.strata("cat", "f2", "seed.txt")).toBe("two\n");
    expect(await e.strata("cat", "base", "seed.txt")).toBe("seed\n");
    await e.unmount(m1);
    await e.unmount(m2);
  }, 120_000);

  it("keeps a reader's view while a writer syncs, until the reader reloads", async () => {
    await e.strata("volume", "create", "shared");
    const src = join(e.base, "v1.txt");
    writeFileSync(src, "version one\n");
    const v1 = (await e.strata("put", "shared", src, "doc.txt")).trim();
    const w = join(e.base, "writer");
    const r = join(e.base, "reader");
    await e.mount("shared", w);
    await e.mount("shared", r, "--read-only");
    expect(readFileSync(join(r, "doc.txt"), "utf8")).toBe("version one\n");
    writeFileSync(join(w, "doc.txt"), "version two, longer\n");
    writeFileSync(join(w, "added.txt"), "added\n");
    const v2 = (await e.strata("sync", w)).trim();
    expect(v2).not.toBe(v1);
    expect(readFileSync(join(r, "doc.txt"), "utf8")).toBe("version one\n");
    expect(existsSync(join(r, "added.txt"))).toBe(false);
    expect(readFileSync(join(r, ".strata/version"), "utf8").trim()).toBe(v1);
    expect(lstatSync(join(r, "doc.txt")).size).toBe(12);
    expect((await e.strata("reload", r)).trim()).toBe(v2);
    // The reload moves the base: attributes the kernel (or the FUSE reader thread) kept are asked for again.
    expect(lstatSync(join(r, "doc.txt")).size).toBe(20);
    expect(readFileSync(join(r, "doc.txt"), "utf8")).toBe("version two, longer\n");
    expect(readFileSync(join(r, "added.txt"), "utf8")).toBe("added\n");

    writeFileSync(join(w, "local.txt"), "x");
    const refused = await e.strataFail("reload", w);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/^strata: reload .*staged.* \([A-Z_]+\)\nhint: /);
    expect(readFileSync(join(w, "local.txt"), "utf8")).toBe("x");
    expect((await e.strata("reload", w, "--discard")).trim()).toBe(v2);
    expect(existsSync(join(w, "local.txt"))).toBe(false);
    await e.unmount(w);
    await e.unmount(r);
  }, 120_000);

  it("says a name is missing from a directory it made without the main thread, and finds every name made since, also after a reload", async () => {
    await e.strata("volume", "create", "names");
    const dir = join(e.base, "names");
    // STRATA_FUSE_STATS: the mount prints at unmount how many requests its reader thread answered.
    e.env.STRATA_FUSE_STATS = "1";
    const child = await e.mount("names", dir).finally(() => delete e.env.STRATA_FUSE_STATS);
    let stderr = "";
    child.stderr!.on("data", (d) => (stderr += d));
    const d = join(dir, "d");
    mkdirSync(join(d, "sub"), { recursive: true });
    writeFileSync(join(dir, "top"), "t");
    for (let i = 0; i < 200; i++) expect(existsSync(join(d, `missing-${i}`))).toBe(false);
    // Every request that makes a name, each name looked up right after.
    writeFileSync(join(d, "f"), "f");
    mkdirSync(join(d, "sub/deeper"));
    symlinkSync("f", join(d, "l"));
    linkSync(join(d, "f"), join(d, "h"));
    renameSync(join(dir, "top"), join(d, "moved"));
    renameSync(join(d, "f"), join(d, "sub/f2"));
    closeSync(openSync(join(d, "sub/deeper/x"), "wx"));
    expect(() => openSync(join(d, "sub/deeper/x"), "wx")).toThrow(/EEXIST/);
    const present = (p: string) => lstatSync(join(d, p), { throwIfNoEntry: false }) !== undefined;
    for (const p of ["sub/deeper", "l", "h", "moved", "sub/f2", "sub/deeper/x"]) expect(present(p), p).toBe(true);
    expect(existsSync(join(d, "f"))).toBe(false);
    expect(readdirSync(d).sort()).toEqual(["h", "l", "moved", "sub"]);
    // A name made by another writer shows once a reload has moved the base.
    await e.strata("sync", dir);
    expect(existsSync(join(d, "from-put"))).toBe(false);
    const src = join(e.base, "put.txt");
    writeFileSync(src, "put\n");
    await e.strata("put", "names", src, "d/from-put");
    await e.strata("reload", dir);
    expect(readFileSync(join(d, "from-put"), "utf8")).toBe("put\n");
    await e.unmount(dir);
    if (child.exitCode === null) await new Promise((r) => child.once("exit", r));
    const answered = /lookup (\d+) calls answered by the reader thread/.exec(stderr);
    expect(Number(answered?.[1] ?? 0), stderr).toBeGreaterThanOrEqual(200);
  }, 120_000);

  it("survives kill -9 of the mount during a sync: the old version intact, staged changes found again", async () => {
    await e.strata("volume", "create", "crash");
    const mnt = join(e.base, "crash");
    const ref = join(e.base, "crash-ref");
    mkdirSync(ref);
    const child = await e.mount("crash", mnt);
    writeFileSync(join(mnt, "first.txt"), "first\n");
    writeFileSync(join(ref, "first.txt"), "first\n");
    const v1 = (await e.strata("sync", mnt)).trim();
    const rand = rng(7);
    for (let i = 0; i < 200; i++) {
      const data = Buffer.alloc(i % 10 === 0 ? 2 << 20 : 2000, i);
      data.writeUInt32LE(Math.floor(rand() * 2 ** 32), 0);
      writeFileSync(join(mnt, `f${i}`), data);
      writeFileSync(join(ref, `f${i}`), data);
    }
    const sync = e.strata("sync", mnt).then(
      (v) => v.trim(),
      () => null,
    );
    await new Promise((r) => setTimeout(r, 150));
    child.kill("SIGKILL");
    const synced = await sync;
    await exitOf(child);
    const stale = await e.strataFail("status", mnt);
    expect(stale.stderr).toMatch(/^strata: .* \([A-Z_]+\)\n/);
    await e.strata("unmount", mnt);
    expect(isMounted(mnt)).toBe(false);

    const log = JSON.parse(await e.strata("log", "crash", "--json")) as { id: string }[];
    const head = log[0]!.id;
    expect(head === v1 || head === synced || log.length === 2).toBe(true);
    expect((await e.strata("fsck")).trim()).toMatch(/ok$/);
    expect(await e.strata("cat", "crash", "first.txt")).toBe("first\n");

    await e.mount("crash", mnt);
    expect(snapshotTree(mnt)).toEqual(snapshotTree(ref));
    await e.strata("sync", mnt);
    await e.unmount(mnt);
    const files = JSON.parse(await e.strata("ls", "crash", "--json")) as { path: string }[];
    expect(files.length).toBe(201);
  }, 180_000);

  it("removes a volume with its staged changes only when told to, never while it is mounted; a volume made again under the name starts empty", async () => {
    const dir = await e.mountNew("gone");
    writeFileSync(join(dir, "staged.txt"), "not synced");
    const mounted = await e.strataFail("volume", "rm", "gone");
    expect(mounted.code).toBe(1);
    expect(mounted.stderr).toMatch(/^strata: remove volume "gone": it is mounted on this host \(ALREADY_EXISTS\)\nhint: unmount it first/);
    await e.unmount(dir);
    const staged = await e.strataFail("volume", "rm", "gone");
    expect(staged.stderr).toMatch(/changes staged for it on this host would be lost \(CONFLICT\)\nhint: .*--discard/);
    expect(await e.strata("volume", "ls")).toMatch(/^gone /m);
    await e.strata("volume", "rm", "gone", "--discard");
    expect(await e.strata("volume", "ls")).not.toMatch(/^gone /m);
    await e.strata("volume", "create", "gone");
    await e.mount("gone", dir);
    expect(readdirSync(dir)).toEqual([]);
    await e.unmount(dir);
  }, 60_000);

  it("answers bad input with the right errors", async () => {
    const mnt = await e.mountNew("bad");
    expect(() => writeFileSync(join(mnt, "n".repeat(256)), "x")).toThrow(expect.objectContaining({ code: "ENAMETOOLONG" }));
    expect(() => mkdirSync(join(mnt, "é".repeat(128)))).toThrow(expect.objectContaining({ code: "ENAMETOOLONG" }));
    writeFileSync(join(mnt, "n".repeat(255)), "ok");
    expect(readFileSync(join(mnt, "n".repeat(255)), "utf8")).toBe("ok");
    await e.strata("sync", mnt);
    await e.unmount(mnt);

    const ro = join(e.base, "bad-ro");
    await e.mount("bad", ro, "--read-only");
    expect(readFileSync(join(ro, "n".repeat(255)), "utf8")).toBe("ok");
    expect(() => writeFileSync(join(ro, "new"), "x")).toThrow(expect.objectContaining({ code: "EROFS" }));
    expect(() => appendFileSync(join(ro, "n".repeat(255)), "x")).toThrow(expect.objectContaining({ code: "EROFS" }));
    expect(() => mkdirSync(join(ro, "d"))).toThrow(expect.objectContaining({ code: "EROFS" }));
    expect(() => unlinkSync(join(ro, "n".repeat(255)))).toThrow(expect.objectContaining({ code: "EROFS" }));
    await e.unmount(ro);

    const c = Strata.connect(loadConfig(e.env));
    try {
      const vol = await Volume.open("bad", { client: c, create: false });
      await expect(vol.putFile("a\u0000b", "x")).rejects.toMatchObject({ code: "INVALID_PATH" });
    } finally {
      await c.close();
    }

    const notMount = join(e.base, "plain");
    mkdirSync(notMount);
    for (const cmd of ["sync", "status", "reload"]) {
      const r = await e.strataFail(cmd, notMount);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/^strata: .*not a strata mount \(INVALID_ARGUMENT\)\nhint: /);
    }
    const u = await e.strataFail("unmount", notMount);
    expect(u.code).toBe(1);

    // A daemon's mistakes are answered as the foreground's: one error line and its hint.
    const never = join(e.base, "never");
    for (const [args, code] of [
      [["bad", never, "--cache-size", "10Q"], "INVALID_ARGUMENT"],
      [["no-such-volume", never], "UNKNOWN_VOLUME"],
    ] as const) {
      const r = await e.strataFail("mount", ...args, "--daemon");
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(new RegExp(`^strata: [^\\n]*\\(${code}\\)\\nhint: [^\\n]*\\n$`));
    }
    expect(readFileSync("/proc/mounts", "utf8")).not.toContain(never);
  }, 120_000);

  it("keeps extended attributes through the kernel, a sync and a remount; a missing one is ENODATA", async () => {
    const mnt = await e.mountNew("xa");
    const f = join(mnt, "f.txt");
    writeFileSync(f, "x");
    const py = (code: string) => execFileSync("python3", ["-c", `import os, sys\n${code}`, f], { encoding: "utf8" }).trim();
    const missing = "try:\n  os.getxattr(sys.argv[1], 'user.none')\nexcept OSError as e:\n  print(e.errno)";
    // A new file has none: the FUSE reader thread answers these without the main thread...
    expect(py(missing)).toBe("61"); // ENODATA
    expect(py("print(os.listxattr(sys.argv[1]))")).toBe("[]");
    // ...until one is set: then every later question reaches the file system.
    py("os.setxattr(sys.argv[1], 'user.color', b'blue')");
    expect(py(missing)).toBe("61");
    expect(py("print(os.getxattr(sys.argv[1], 'user.color').decode())")).toBe("blue");
    py("os.setxattr(sys.argv[1], 'user.gone', b'1'); os.removexattr(sys.argv[1], 'user.gone')");
    expect(py("print(sorted(os.listxattr(sys.argv[1])))")).toBe("['user.color']");
    appendFileSync(f, "more"); // a write (the kernel asks for security.capability first)
    expect(py("print(sorted(os.listxattr(sys.argv[1])))")).toBe("['user.color']");
    await e.strata("sync", mnt);
    await e.unmount(mnt);
    await e.mount("xa", mnt);
    expect(readFileSync(f, "utf8")).toBe("xmore");
    expect(py("print(os.getxattr(sys.argv[1], 'user.color').decode())")).toBe("blue");
    expect(py(missing)).toBe("61");
    await e.unmount(mnt);
  }, 120_000);

  it("shows a write through one name of a hard link in the other until a sync, also after a remount", async () => {
    const mnt = await e.mountNew("hl");
    const f = join(mnt, "f");
    const g = join(mnt, "g");
    writeFileSync(f, "a\n");
    expect(lstatSync(f).size).toBe(2); // the kernel now caches f's attributes and pages
    linkSync(f, g);
    appendFileSync(g, "bb\n");
    expect(lstatSync(f).size).toBe(5);
    expect(readFileSync(f, "utf8")).toBe("a\nbb\n");
    writeFileSync(f, "zzz\n");
    expect(lstatSync(g).size).toBe(4);
    expect(readFileSync(g, "utf8")).toBe("zzz\n");
    await e.unmount(mnt);
    await e.mount("hl", mnt);
    expect(readFileSync(g, "utf8")).toBe("zzz\n"); // so the kernel caches g
    appendFileSync(f, "again\n");
    expect(readFileSync(g, "utf8")).toBe("zzz\nagain\n");
    expect(lstatSync(g).size).toBe(10);
    // A version has no inodes: after a sync the names are two files with the same bytes.
    await e.strata("sync", mnt);
    writeFileSync(f, "apart\n");
    expect(readFileSync(g, "utf8")).toBe("zzz\nagain\n");
    expect(readFileSync(f, "utf8")).toBe("apart\n");
    await e.unmount(mnt);
  }, 120_000);

  it("runs git init, add and commit on the mount", async () => {
    const mnt = await e.mountNew("repo");
    mkdirSync(join(mnt, "src"));
    for (let i = 0; i < 50; i++) writeFileSync(join(mnt, "src", `m${i}.ts`), `export const x${i} = ${i};\n`);
    const git = (cmd: string) => execFileSync("sh", ["-c", cmd], { cwd: mnt, encoding: "utf8", env: { ...process.env, GIT_AUTHOR_NAME: "t", GIT_AUTHOR_EMAIL: "t@x", GIT_COMMITTER_NAME: "t", GIT_COMMITTER_EMAIL: "t@x" } });
    git("git init -q && git add -A && git commit -q -m first");
    writeFileSync(join(mnt, "src/m0.ts"), "export const x0 = 'changed';\n");
    git("git commit -q -am second");
    expect(git("git log --format=%s").trim().split("\n")).toEqual(["second", "first"]);
    expect(git("git status --porcelain")).toBe("");
    expect(git("git fsck --no-progress 2>&1; echo rc=$?")).toMatch(/rc=0/);
    await e.strata("sync", mnt, "--message", "git");
    await e.unmount(mnt);
    await e.mount("repo", mnt);
    expect(git("git log --format=%s").trim().split("\n")).toEqual(["second", "first"]);
    expect(git("git show HEAD:src/m0.ts")).toBe("export const x0 = 'changed';\n");
    await e.unmount(mnt);
  }, 180_000);
});

/** The whole-file copies under a cache's `files` directory (any boot's). */
function copiesIn(files: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of existsSync(d) ? readdirSync(d, { withFileTypes: true }) : []) {
      if (e.isDirectory() && e.name !== "tmp") walk(join(d, e.name));
      else if (e.isFile() && /^[0-9a-f]{64}$/.test(e.name)) out.push(e.name);
    }
  };
  walk(files);
  return out;
}

/** Disk blocks, in bytes, of the files under `dir` (0 when it does not exist). */
function diskBytes(dir: string): number {
  let n = 0;
  for (const x of existsSync(dir) ? readdirSync(dir, { withFileTypes: true }) : []) {
    n += x.isDirectory() ? diskBytes(join(dir, x.name)) : lstatSync(join(dir, x.name)).blocks * 512;
  }
  return n;
}

/** Waits (up to 10 s) until `files` holds at least `count` copies. */
async function waitForCopies(files: string, count: number): Promise<void> {
  for (let i = 0; i < 200 && copiesIn(files).length < count; i++) await new Promise((r) => setTimeout(r, 50));
}

/** Asserts that `fd` reads exactly `want` from offset 0. */
function expectReads(fd: number, want: Buffer): void {
  const b = Buffer.alloc(want.length + 10);
  expect(readSync(fd, b, 0, b.length, 0)).toBe(want.length);
  expect(b.subarray(0, want.length).equals(want)).toBe(true);
}

describe("whole-file copies read by the kernel (backing files)", () => {
  let e: Env;
  beforeAll(() => {
    e = makeEnv();
  });
  afterAll(async () => {
    await e?.cleanup();
  });

  /** Puts `bytes` at `path` of `volume` (a new version) through `strata put`. */
  async function put(volume: string, path: string, bytes: Buffer): Promise<void> {
    const src = join(e.base, `${volume}.src`);
    writeFileSync(src, bytes);
    await e.strata("put", volume, src, path);
  }

  /** Creates `volume` with `bytes` at `path` as its first version. */
  async function putNew(volume: string, path: string, bytes: Buffer): Promise<void> {
    await e.strata("volume", "create", volume);
    await put(volume, path, bytes);
  }

  /** Whether this kernel offers FUSE backing files (asked through a probe mount served here). */
  let offered: boolean | undefined;
  async function backingOffered(): Promise<boolean> {
    if (offered === undefined) {
      const probe = mkdtempSync(join(e.base, "probe-"));
      const { BackingServer } = await import("./support/backing-server.js");
      const server = await BackingServer.mount(probe, new Map(), { passthrough: true });
      offered = server.offered;
      await server.unmount();
    }
    return offered;
  }

  /**
   * Starts `strata mount NAME DIR ...args` with `env` and STRATA_FUSE_STATS=1 (its stats are
   * printed on its stderr at unmount); resolves once the mount answers.
   */
  async function statsMount(name: string, dir: string, env: NodeJS.ProcessEnv, args: string[] = []): Promise<{ child: ChildProcess; stderr: () => string; exited: Promise<unknown> }> {
    mkdirSync(dir, { recursive: true });
    const child = spawn(process.execPath, [...CLI, "mount", name, dir, ...args], { env: { ...e.env, ...env, STRATA_FUSE_STATS: "1" }, stdio: ["ignore", "ignore", "pipe"] });
    let stderr = "";
    child.stderr!.on("data", (d) => (stderr += d));
    const exited = new Promise((r) => child.once("exit", r));
    for (let i = 0; !(isMounted(dir) && existsSync(join(dir, ".strata/version"))); i++) {
      if (i > 1200 || child.exitCode !== null) throw new Error(`mount ${dir}: ${stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    return { child, stderr: () => stderr, exited };
  }

  /** Runs `strata mount NAME DIR ...` with `env`, reads `path` in another process, unmounts; the READ requests the mount answered. */
  async function readThrough(name: string, dir: string, path: string, env: NodeJS.ProcessEnv, settled = async () => {}, more: string[] = []): Promise<{ bytes: Buffer; reads: number; stderr: string }> {
    const { stderr, exited } = await statsMount(name, dir, env, ["--read-only"]);
    let stdout = Buffer.alloc(0);
    for (const p of [path, ...more]) {
      const out = await execAsync("cat", [join(dir, p)], { encoding: "buffer", maxBuffer: 64 << 20 });
      if (p === path) stdout = out.stdout;
    }
    await settled();
    await e.strata("unmount", dir);
    await exited;
    return { bytes: stdout, reads: Number(/stats: read (\d+) calls/.exec(stderr())?.[1] ?? 0), stderr: stderr() };
  }

  it("reads a file's whole copy through the kernel once one read of it made the copy, with no READ request", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();

    const data = randomBytes(5 * 1024 * 1024 + 4321);
    await putNew("data", "big.bin", data);
    const dir = join(e.base, "ro");

    // Served without backing files: every read of a new mount asks the mount, and a whole read
    // makes the copy (with backing files off, only the kernel's side is off).
    const files = join(e.env.STRATA_HOME!, "cache", "files");
    const served = await readThrough("data", dir, "big.bin", { STRATA_FUSE_BACKING: "0" }, () => waitForCopies(files, 1));
    expect(served.bytes.equals(data)).toBe(true);
    expect(served.reads).toBeGreaterThan(0);
    expect(copiesIn(files)).toHaveLength(1);

    const backed = await readThrough("data", dir, "big.bin", {});
    expect(backed.bytes.equals(data)).toBe(true);
    expect(backed.reads).toBe(0);
  }, 120_000);

  it("serves every read itself, with the right bytes, when the copies sit on an overlay file system the kernel will not back files with", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    const ov = join(e.base, "overlay");
    for (const d of ["lower", "upper", "work", "merged"]) mkdirSync(join(ov, d), { recursive: true });
    execFileSync("mount", ["-t", "overlay", "overlay", "-o", `lowerdir=${join(ov, "lower")},upperdir=${join(ov, "upper")},workdir=${join(ov, "work")}`, join(ov, "merged")]);
    try {
      await e.strata("volume", "create", "ovl");
      const data = randomBytes(3 * 1024 * 1024 + 1);
      await put("ovl", "f.bin", data);
      await put("ovl", "g.bin", randomBytes(2 * 1024 * 1024));
      const cache = { STRATA_CACHE_DIR: join(ov, "merged", "cache") };
      const files = join(ov, "merged", "cache", "files");
      const first = await readThrough("ovl", join(e.base, "ovl-ro"), "f.bin", cache, () => waitForCopies(files, 1));
      expect(first.bytes.equals(data)).toBe(true);
      expect(copiesIn(files)).toHaveLength(1);
      // Refused at f.bin's open: g.bin, read whole after it, gets no copy.
      const second = await readThrough("ovl", join(e.base, "ovl-ro"), "f.bin", cache, async () => new Promise((r) => setTimeout(r, 300)), ["g.bin"]);
      expect(second.bytes.equals(data)).toBe(true);
      expect(second.reads).toBeGreaterThan(0);
      expect(second.stderr).toMatch(/refused a backing file/);
      expect(copiesIn(files)).toHaveLength(1);
    } finally {
      execFileSync("umount", ["-l", join(ov, "merged")]);
    }
  }, 120_000);

  it("lets a writable mount's program write, truncate and link a file others read through its copy; they keep the old bytes", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    const v1 = randomBytes(2 * 1024 * 1024 + 5);
    await putNew("rw", "f.bin", v1);
    const mnt = join(e.base, "rw-mnt");
    await e.mount("rw", mnt);
    const f = join(mnt, "f.bin");
    const files = join(e.env.STRATA_HOME!, "cache", "files");
    const before = copiesIn(files).length;
    expect(readFileSync(f).equals(v1)).toBe(true);
    await waitForCopies(files, before + 1);
    expect(copiesIn(files)).toHaveLength(before + 1);

    const fd1 = openSync(f, "r"); // backed by the copy
    try {
      writeFileSync(f, "new bytes\n"); // open O_TRUNC: the kernel retries it on a new node
      expect(readFileSync(f, "utf8")).toBe("new bytes\n");
      expectReads(fd1, v1);
    } finally {
      closeSync(fd1);
    }
    await e.strata("sync", mnt);
    await e.unmount(mnt);
    await e.mount("rw", mnt);
    expect(readFileSync(f, "utf8")).toBe("new bytes\n");

    // truncate(2) and link(2) of a file open through its copy.
    const v3 = randomBytes(3 * 1024 * 1024);
    await put("rw", "g.bin", v3);
    await e.strata("reload", mnt);
    const g = join(mnt, "g.bin");
    expect(readFileSync(g).equals(v3)).toBe(true); // makes the copy
    await waitForCopies(files, before + 2);
    const fd2 = openSync(g, "r");
    try {
      linkSync(g, join(mnt, "g2.bin"));
      truncateSync(g, 10);
      expect(readFileSync(g).equals(v3.subarray(0, 10))).toBe(true);
      expect(lstatSync(g).size).toBe(10);
      expectReads(fd2, v3);
    } finally {
      closeSync(fd2);
    }
    await e.unmount(mnt);
  }, 120_000);

  it.each([
    ["backed by its copy", "1"],
    ["served by the mount", "0"],
  ])("shows a reloaded file's new bytes to new opens while an open kept from before (%s) reads the old ones", async (_how, backing, ctx) => {
    if (!(await backingOffered())) ctx.skip();
    const name = `moving${backing}`;
    const v1 = randomBytes(2 * 1024 * 1024);
    const v2 = randomBytes(3 * 1024 * 1024);
    await putNew(name, "f.bin", v1);
    const ro = join(e.base, `${name}-ro`);
    e.env.STRATA_FUSE_BACKING = backing;
    try {
      await e.mount(name, ro, "--read-only");
    } finally {
      delete e.env.STRATA_FUSE_BACKING;
    }
    const files = join(e.env.STRATA_HOME!, "cache", "files");
    const before = copiesIn(files).length;
    expect(readFileSync(join(ro, "f.bin")).equals(v1)).toBe(true);
    await waitForCopies(files, before + 1);
    expect(copiesIn(files)).toHaveLength(before + 1);
    const fd = openSync(join(ro, "f.bin"), "r");
    try {
      await put(name, "f.bin", v2);
      await e.strata("reload", ro);
      expect(readFileSync(join(ro, "f.bin")).equals(v2)).toBe(true);
      // The kept open is on an inode of its own: the new open's pages are not its pages.
      expectReads(fd, v1);
      // Without the page cache, a served open's reads reach the mount, which reads on what it opened.
      writeFileSync("/proc/sys/vm/drop_caches", "1");
      expectReads(fd, v1);
    } finally {
      closeSync(fd);
    }
    expect(readFileSync(join(ro, "f.bin")).equals(v2)).toBe(true);
    await e.unmount(ro);
  }, 120_000);

  it("lets the kernel write a new file itself (no WRITE requests); a sync while it stays open stores what came before, and later writes stay staged, also across kill -9", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    await e.strata("volume", "create", "direct");
    const mnt = join(e.base, "direct-mnt");
    const { child, stderr, exited } = await statsMount("direct", mnt, {});
    // Detached here if the test fails (e.mount's mounts are detached in afterAll).
    ctx.onTestFailed(() => {
      if (isMounted(mnt)) execFileSync("umount", ["-l", mnt]);
      child.kill("SIGKILL");
    });
    const f = join(mnt, "log.bin");
    const a = randomBytes(8 << 20);
    const b = randomBytes((3 << 20) + 17);
    const fd = openSync(f, "w");
    try {
      for (let off = 0; off < a.length; off += 1 << 20) writeSync(fd, a, off, 1 << 20);
      expect(fstatSync(fd).size).toBe(a.length);
      expect(lstatSync(f).size).toBe(a.length);
      const v1 = (await e.strata("sync", mnt)).trim();
      writeSync(fd, b);
      expect(lstatSync(f).size).toBe(a.length + b.length);
      // The version has the bytes from before the sync; the mount shows the later ones too.
      expect((await execAsync(process.execPath, [...CLI, "cat", "direct", "log.bin", "--at", v1], { env: e.env, encoding: "buffer", maxBuffer: 64 << 20 })).stdout.equals(a)).toBe(true);
      expect(readFileSync(f).equals(Buffer.concat([a, b]))).toBe(true);
      expect(JSON.parse(await e.strata("status", mnt, "--json")).staged.modified).toEqual(["log.bin"]);
      ftruncateSync(fd, a.length + 5);
      expect(lstatSync(f).size).toBe(a.length + 5);
    } finally {
      closeSync(fd);
    }
    await e.strata("unmount", mnt);
    await exited;
    const writes = Number(/stats: write (\d+) calls/.exec(stderr())?.[1] ?? 0);
    expect(writes, stderr()).toBeLessThan(4); // at most the control file's sync request: 11 MiB went past the mount

    // Bytes the kernel wrote after the journal's last line about the file (its create) are
    // found again after kill -9 of the mount.
    const again = await e.mount("direct", mnt);
    expect(readFileSync(f).equals(Buffer.concat([a, b.subarray(0, 5)]))).toBe(true);
    const c = randomBytes(100_000);
    writeFileSync(join(mnt, "late.bin"), c);
    again.kill("SIGKILL");
    await exitOf(again);
    await e.strata("unmount", mnt);
    await e.mount("direct", mnt);
    expect(readFileSync(join(mnt, "late.bin")).equals(c)).toBe(true);
    expect(readFileSync(f).equals(Buffer.concat([a, b.subarray(0, 5)]))).toBe(true);
    await e.strata("sync", mnt);
    await e.unmount(mnt);
    expect((await execAsync(process.execPath, [...CLI, "cat", "direct", "late.bin"], { env: e.env, encoding: "buffer", maxBuffer: 64 << 20 })).stdout.equals(c)).toBe(true);
    expect((await execAsync(process.execPath, [...CLI, "cat", "direct", "log.bin"], { env: e.env, encoding: "buffer", maxBuffer: 64 << 20 })).stdout.equals(Buffer.concat([a, b.subarray(0, 5)]))).toBe(true);
  }, 180_000);

  it("never gives a data file a killed mount's program still writes to a new file: its later bytes stay out of every other file", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    await e.strata("volume", "create", "zombie");
    const mnt = join(e.base, "zombie-mnt");
    const first = await e.mount("zombie", mnt);
    // Two files the kernel writes through backing files, held open by this process: one
    // unlinked while open (no name reaches it after the crash), one removed after it.
    const held = openSync(join(mnt, "held.log"), "w");
    const kept = openSync(join(mnt, "kept.log"), "w");
    try {
      writeSync(held, "held before\n");
      writeSync(kept, "kept before\n");
      rmSync(join(mnt, "held.log"));
      first.kill("SIGKILL");
      await exitOf(first);
      await e.strata("unmount", mnt);
      // The kernel goes on writing through the backing files with no mount at all.
      writeSync(kept, "kept after the kill\n");
      await e.mount("zombie", mnt);
      expect(readFileSync(join(mnt, "kept.log"), "utf8")).toBe("kept before\nkept after the kill\n");
      rmSync(join(mnt, "kept.log"));
      await e.strata("sync", mnt);
      await new Promise((r) => setTimeout(r, 300)); // freed data files are recycled in the background
      const fresh = Array.from({ length: 8 }, (_, i) => `fresh ${i}\n`);
      fresh.forEach((text, i) => writeFileSync(join(mnt, `new-${i}.txt`), text));
      writeSync(held, "HELD AFTER\n");
      writeSync(kept, "KEPT AFTER\n");
    } finally {
      closeSync(held);
      closeSync(kept);
    }
    await e.unmount(mnt);
    await e.mount("zombie", mnt);
    for (let i = 0; i < 8; i++) expect(readFileSync(join(mnt, `new-${i}.txt`), "utf8")).toBe(`fresh ${i}\n`);
    expect(readdirSync(mnt).sort()).toEqual(Array.from({ length: 8 }, (_, i) => `new-${i}.txt`));
    await e.unmount(mnt);
  }, 120_000);

  it("keeps both names of a hard-linked file held open for writing across a sync on one file (nlink 2), also after kill -9", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    await e.strata("volume", "create", "linked-open");
    const mnt = join(e.base, "linked-open-mnt");
    const first = await e.mount("linked-open", mnt);
    ctx.onTestFailed(() => {
      if (isMounted(mnt)) execFileSync("umount", ["-l", mnt]);
    });
    const a = join(mnt, "a.bin");
    const b = join(mnt, "b.bin");
    const one = randomBytes(300_000);
    const two = randomBytes(200_000);
    const fd = openSync(a, "w");
    try {
      writeSync(fd, one);
      linkSync(a, b);
      await e.strata("sync", mnt);
      writeSync(fd, two);
      expect(readFileSync(b).equals(Buffer.concat([one, two]))).toBe(true);
    } finally {
      closeSync(fd);
    }
    // Released, the names' attributes come from the mount's count again.
    expect([lstatSync(a).nlink, lstatSync(b).nlink]).toEqual([2, 2]);
    first.kill("SIGKILL");
    await exitOf(first);
    await e.strata("unmount", mnt);
    await e.mount("linked-open", mnt);
    // The replay finds one content under both names (the sync wrote a line for each).
    expect([lstatSync(a).nlink, lstatSync(b).nlink]).toEqual([2, 2]);
    const three = randomBytes(1000);
    writeFileSync(a, three, { flag: "r+" });
    expect(readFileSync(b).subarray(0, 1000).equals(three)).toBe(true);
    truncateSync(b, 1000);
    expect(readFileSync(a).equals(three)).toBe(true);
    await e.unmount(mnt);
  }, 120_000);

  it("lets a file open for writing across a reload follow its path to the new bytes", async () => {
    const v1 = randomBytes(200 * 1024);
    const v2 = randomBytes(300 * 1024);
    await putNew("followed", "f.bin", v1);
    const mnt = join(e.base, "followed-mnt");
    await e.mount("followed", mnt);
    const fd = openSync(join(mnt, "f.bin"), "r+");
    try {
      expectReads(fd, v1);
      await put("followed", "f.bin", v2);
      await e.strata("reload", mnt);
      expectReads(fd, v2);
    } finally {
      closeSync(fd);
    }
    await e.unmount(mnt);
  }, 120_000);

  it("keeps one file for a staged file's opens across a sync that takes in another writer's version: a later write shows through an open made before", async () => {
    await putNew("kept-node", "other.txt", Buffer.from("theirs v1"));
    const mnt = join(e.base, "kept-node-mnt");
    await e.mount("kept-node", mnt);
    const f = join(mnt, "mine.txt");
    writeFileSync(f, "staged here");
    const fd = openSync(f, "r");
    try {
      expectReads(fd, Buffer.from("staged here"));
      await put("kept-node", "other.txt", Buffer.from("theirs v2"));
      await e.strata("sync", mnt); // rebased onto the other writer's version
      expect(readFileSync(join(mnt, "other.txt"), "utf8")).toBe("theirs v2");
      // The sync stored mine.txt as it was: it is the same file, so a write by its name shows
      // through the open made before (had the name got a new node, the open would keep the old pages).
      writeFileSync(f, "written after the sync");
      expectReads(fd, Buffer.from("written after the sync"));
    } finally {
      closeSync(fd);
    }
    await e.unmount(mnt);
  }, 120_000);

  it("reads a file again from the copy its open made, once the kernel let go of its pages", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    // Larger than the mount's 64 MiB of recently read chunks, which would serve a second pass too.
    const data = randomBytes(72 * 1024 * 1024 + 99);
    await putNew("again", "f.bin", data);
    const mnt = join(e.base, "again-mnt");
    const files = join(e.env.STRATA_HOME!, "cache", "files");
    const before = copiesIn(files).length;
    await e.mount("again", mnt);
    const objects = join(e.env.STRATA_HOME!, "objects");
    try {
      const fd = openSync(join(mnt, "f.bin"), "r");
      try {
        expectReads(fd, data);
        await waitForCopies(files, before + 1);
        expect(copiesIn(files)).toHaveLength(before + 1);
        // With the store's packs gone and the page cache dropped, the second pass of the same
        // open can come from nowhere but the copy.
        renameSync(join(objects, "packs"), join(objects, "packs.away"));
        writeFileSync("/proc/sys/vm/drop_caches", "1");
        expectReads(fd, data);
      } finally {
        closeSync(fd);
        if (existsSync(join(objects, "packs.away"))) renameSync(join(objects, "packs.away"), join(objects, "packs"));
      }
    } finally {
      await e.unmount(mnt);
    }
  }, 120_000);

  it("keeps a file read whole in its copy, not also in the chunk cache, and reads the copy for an open the kernel does not back", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    const data = randomBytes(4 * 1024 * 1024 + 77);
    await putNew("once", "f.bin", data);
    const mnt = join(e.base, "once-mnt");
    const files = join(e.env.STRATA_HOME!, "cache", "files");
    const packs = join(e.env.STRATA_HOME!, "cache", "packs");
    const packBytes = () => diskBytes(packs);
    await e.mount("once", mnt);
    const before = { copies: copiesIn(files).length, packs: packBytes() };
    expect(readFileSync(join(mnt, "f.bin")).equals(data)).toBe(true);
    await waitForCopies(files, before.copies + 1);
    expect(copiesIn(files)).toHaveLength(before.copies + 1);
    expect(packBytes() - before.packs).toBeLessThan(256 * 1024);
    await e.unmount(mnt);

    // With the store's packs gone, the chunks can come from nowhere but the copy: a write open
    // (which the kernel never backs) of a fresh mount reads the file from it.
    const objects = join(e.env.STRATA_HOME!, "objects");
    renameSync(join(objects, "packs"), join(objects, "packs.away"));
    try {
      await e.mount("once", mnt);
      const fd = openSync(join(mnt, "f.bin"), "r+");
      try {
        expectReads(fd, data);
      } finally {
        closeSync(fd);
      }
      await e.unmount(mnt);
    } finally {
      renameSync(join(objects, "packs.away"), join(objects, "packs"));
    }
  }, 120_000);

  it("keeps the cache directory, copies included, within --cache-size", async (ctx) => {
    if (!(await backingOffered())) ctx.skip();
    await e.strata("volume", "create", "budget");
    const mnt = join(e.base, "budget");
    const writer = await e.mount("budget", mnt);
    // 1 MiB files get whole copies (up to half the copies' quarter of 8 MiB); 1.5 MiB ones are
    // kept as chunks only.
    const files = Array.from({ length: 12 }, (_, i) => ({ name: `f${i}`, data: randomBytes(i % 2 ? 1536 * 1024 : 1024 * 1024) }));
    // One version (so one pack) per file: the chunk cache keeps or drops each on its own.
    for (const f of files) {
      writeFileSync(join(mnt, f.name), f.data);
      writeFileSync(join(mnt, ".strata", "sync"), f.name);
    }
    await e.unmount(mnt);
    // Its last writes to the cache end before the cache is emptied.
    if (writer.exitCode === null) await new Promise((r) => writer.once("exit", r));
    const cache = join(e.env.STRATA_HOME!, "cache");
    rmSync(cache, { recursive: true, force: true });
    await e.mount("budget", mnt, "--cache-size", "8M");
    for (const f of files) expect(readFileSync(join(mnt, f.name)).equals(f.data)).toBe(true);
    await waitForCopies(join(cache, "files"), 1);
    expect(copiesIn(join(cache, "files")).length).toBeGreaterThan(0);
    // The chunk cache evicts after each write it makes behind the reads: wait for the last one.
    for (let i = 0; i < 100 && diskBytes(cache) > 8 * 1024 * 1024; i++) await new Promise((r) => setTimeout(r, 50));
    expect(diskBytes(cache)).toBeLessThanOrEqual(8 * 1024 * 1024);
    await e.unmount(mnt);
  }, 120_000);
});

describe("strata mount on S3", () => {
  let s3: TestS3Store;
  let e: Env;
  beforeAll(async () => {
    s3 = await makeTestS3Store();
    e = makeEnv({
      STRATA_STORE: `s3://${s3.bucket}/mount`,
      STRATA_S3_ENDPOINT: s3.config.endpoint,
      AWS_ACCESS_KEY_ID: s3.config.accessKeyId,
      AWS_SECRET_ACCESS_KEY: s3.config.secretAccessKey,
      AWS_REGION: s3.config.region,
    });
  });
  afterAll(async () => {
    await e?.cleanup();
    await s3?.cleanup();
  });

  it("keeps the bytes of large writes that several programs make at once, through a sync and a remount with an empty cache", async () => {
    // The session reuses the buffers of large WRITE bodies: a body kept past its write would
    // show here as another file's bytes.
    const mnt = await e.mountNew("writers");
    const files = Array.from({ length: 4 }, (_, k) => {
      const b = Buffer.alloc(24 << 20);
      for (let i = 0; i < b.length; i += 4) b.writeUInt32LE((Math.imul(i, 2654435761) ^ Math.imul(k + 1, 0x9e3779b9)) >>> 0, i);
      const src = join(e.base, `writer-${k}.bin`);
      writeFileSync(src, b);
      return { src, name: `w${k}.bin`, b };
    });
    await Promise.all(files.map((f) => execAsync("dd", [`if=${f.src}`, `of=${join(mnt, f.name)}`, "bs=1M", "status=none"])));
    await e.strata("sync", mnt);
    await e.unmount(mnt);
    rmSync(join(e.base, "home", "cache"), { recursive: true, force: true });
    await e.mount("writers", mnt);
    for (const f of files) expect(readFileSync(join(mnt, f.name)).equals(f.b), f.name).toBe(true);
    await e.unmount(mnt);
  }, 240_000);

  it("writes, syncs and reads back after a remount with an empty cache", async () => {
    await e.strata("volume", "create", "s3vol");
    const mnt = join(e.base, "s3vol");
    const ref = join(e.base, "s3ref");
    mkdirSync(ref);
    await e.mount("s3vol", mnt);
    const log: string[] = [];
    randomOps(mnt, ref, rng(99), 120, log);
    const big = Buffer.alloc(5 << 20);
    for (let i = 0; i < big.length; i += 4) big.writeUInt32LE((i * 2654435761) >>> 0, i);
    writeFileSync(join(mnt, "big.bin"), big);
    writeFileSync(join(ref, "big.bin"), big);
    expect(snapshotTree(mnt)).toEqual(snapshotTree(ref));
    const v = (await e.strata("sync", mnt)).trim();
    expect(v).toMatch(/^[0-9a-f]{64}$/);
    await e.unmount(mnt);
    rmSync(join(e.base, "home", "cache"), { recursive: true, force: true });
    await e.mount("s3vol", mnt);
    expect(snapshotTree(mnt)).toEqual(snapshotTree(ref));
    await e.unmount(mnt);
  }, 240_000);
});
