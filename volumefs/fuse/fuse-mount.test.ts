/**
 * The adapter over a real kernel mount of `PassthroughFs`. This process serves the mount, so it
 * touches it only with asynchronous calls, one at a time (the pass-through needs the thread pool
 * too), or through child processes.
 */
import { execFile, spawn } from "node:child_process";
import { appendFile, chmod, lstat, mkdir, mkdtemp, readdir, readFile, readlink, rename, rm, rmdir, stat, symlink, truncate, unlink, utimes, writeFile, open } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { VolumeError } from "../errors.js";
import { forceUnmount, isFuseMountPoint, mountFs, PassthroughFs, toErrno, type FuseMount } from "./index.js";

const run = promisify(execFile);

describe("toErrno", () => {
  it("maps volume error codes and node error codes, EIO otherwise", () => {
    expect(toErrno(VolumeError.NOT_FOUND("x"))).toBe(-2);
    expect(toErrno(new VolumeError("NOT_EMPTY", "rmdir x: not empty"))).toBe(-39);
    expect(toErrno(VolumeError.READ_ONLY("x"))).toBe(-30);
    expect(toErrno(VolumeError.INVALID_PATH("x", "nul"))).toBe(-22);
    expect(toErrno(new VolumeError("INVALID_PATH", "x", { details: "name-too-long" }))).toBe(-36);
    expect(toErrno(new VolumeError("NO_ATTRIBUTE", "x"))).toBe(-61);
    expect(toErrno(new VolumeError("BAD_HANDLE", "x"))).toBe(-9);
    expect(toErrno(new VolumeError("STORE_UNREACHABLE", "x"))).toBe(-5);
    expect(toErrno(Object.assign(new Error("x"), { code: "EXDEV" }))).toBe(-18);
    expect(toErrno(new Error("plain"))).toBe(-5);
  });
});

describe.each(["kernel", "fuse-native"] as const)("mountFs over a pass-through (%s driver)", (driver) => {
  let base: string;
  let src: string;
  let mnt: string;
  let m: FuseMount | undefined;

  beforeAll(async () => {
    base = await mkdtemp(join(tmpdir(), "strata-fuse-"));
    src = join(base, "src");
    mnt = join(base, "mnt");
    await mkdir(src);
    await writeFile(join(src, "hello.txt"), "hello\n");
    m = await mountFs(new PassthroughFs(src), mnt, { driver });
  });
  afterAll(async () => {
    await m?.unmount().catch(() => undefined);
    await forceUnmount(mnt).catch(() => undefined);
    await rm(base, { recursive: true, force: true });
  });

  it("is a fuse mount point that shows the directory", async () => {
    expect(await isFuseMountPoint(mnt)).toBe(true);
    expect(await readdir(mnt)).toEqual(["hello.txt"]);
    expect(await readFile(join(mnt, "hello.txt"), "utf8")).toBe("hello\n");
    const { stdout } = await run("cat", [join(mnt, "hello.txt")]);
    expect(stdout).toBe("hello\n");
  });

  it("passes changes through to the directory", async () => {
    await mkdir(join(mnt, "d"));
    await writeFile(join(mnt, "d/a"), "abc");
    await appendFile(join(mnt, "d/a"), "def");
    const fh = await open(join(mnt, "d/a"), "r+");
    await fh.write(Buffer.from("XY"), 0, 2, 1);
    await fh.close();
    expect(await readFile(join(src, "d/a"), "utf8")).toBe("aXYdef");
    await truncate(join(mnt, "d/a"), 2);
    expect(await readFile(join(src, "d/a"), "utf8")).toBe("aX");
    await rename(join(mnt, "d/a"), join(mnt, "d/b"));
    await symlink("b", join(mnt, "d/l"));
    expect(await readlink(join(mnt, "d/l"))).toBe("b");
    expect(await readFile(join(mnt, "d/l"), "utf8")).toBe("aX");
    await chmod(join(mnt, "d/b"), 0o600);
    expect((await stat(join(src, "d/b"))).mode & 0o777).toBe(0o600);
    expect((await lstat(join(mnt, "d/l"))).isSymbolicLink()).toBe(true);
    await unlink(join(mnt, "d/l"));
    await unlink(join(mnt, "d/b"));
    await rmdir(join(mnt, "d"));
    expect(await readdir(src)).toEqual(["hello.txt"]);
  });

  it.runIf(driver === "kernel")("answers a stat after every change with the new attributes, most from the reader thread's table", async () => {
    // A child process changes files through the mount and compares each stat with the source's.
    const script = `
const fs = require("node:fs");
const [mnt, src] = process.argv.slice(1);
const bad = [];
const seen = (p) => { const s = fs.statSync(p); return [s.mode, s.size, s.nlink, s.uid, s.gid, Math.round(s.mtimeMs * 1000), Math.round(s.ctimeMs * 1000)].join(" "); };
const check = (step, ...names) => {
  for (const n of ["", ...names]) {
    for (let i = 0; i < 2; i++) { const a = seen(mnt + "/t/" + n), b = seen(src + "/t/" + n); if (a !== b) bad.push(step + " " + n + ": " + a + " != " + b); }
  }
};
fs.mkdirSync(mnt + "/t");
fs.writeFileSync(mnt + "/t/f", "abc"); check("create", "f");
fs.appendFileSync(mnt + "/t/f", "defg"); check("append", "f");
const fd = fs.openSync(mnt + "/t/f", "r+"); fs.writeSync(fd, Buffer.from("0123456789"), 0, 10, 5); check("pwrite", "f");
fs.ftruncateSync(fd, 4); check("ftruncate", "f"); fs.closeSync(fd);
fs.chmodSync(mnt + "/t/f", 0o640); check("chmod", "f");
fs.truncateSync(mnt + "/t/f", 1); check("truncate", "f");
fs.utimesSync(mnt + "/t/f", 1000, 2000); check("utimes", "f");
fs.mkdirSync(mnt + "/t/d"); check("mkdir", "d", "f");
fs.renameSync(mnt + "/t/f", mnt + "/t/d/g"); check("rename", "d", "d/g");
fs.writeFileSync(mnt + "/t/d/h", "h"); fs.renameSync(mnt + "/t/d/h", mnt + "/t/d/g"); check("rename over", "d", "d/g");
fs.symlinkSync("g", mnt + "/t/d/l"); check("symlink", "d");
fs.unlinkSync(mnt + "/t/d/l"); check("unlink", "d", "d/g");
fs.unlinkSync(mnt + "/t/d/g"); fs.rmdirSync(mnt + "/t/d"); check("rmdir");
process.stdout.write(JSON.stringify(bad));`;
    const before = m!.answered!().getattr!;
    const { stdout } = await run(process.execPath, ["-e", script, mnt, src]);
    expect(JSON.parse(stdout)).toEqual([]);
    // The kernel asks again after each write (append, pwrite): the table has the new attributes.
    expect(m!.answered!().getattr! - before).toBeGreaterThanOrEqual(2);
    await rm(join(mnt, "t"), { recursive: true });
  });

  it("turns errors into errno values", async () => {
    await expect(readFile(join(mnt, "missing"))).rejects.toMatchObject({ code: "ENOENT" });
    await expect(mkdir(join(mnt, "hello.txt"))).rejects.toMatchObject({ code: "EEXIST" });
    await expect(writeFile(join(mnt, "x".repeat(300)), "")).rejects.toMatchObject({ code: "ENAMETOOLONG" });
    await mkdir(join(mnt, "full"));
    await writeFile(join(mnt, "full/f"), "");
    await expect(rmdir(join(mnt, "full"))).rejects.toMatchObject({ code: "ENOTEMPTY" });
    await rm(join(mnt, "full"), { recursive: true });
  });

  it("moves large files in big requests, byte for byte", async () => {
    const data = Buffer.alloc(8 << 20);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    await writeFile(join(mnt, "big"), data);
    expect((await readFile(join(src, "big"))).equals(data)).toBe(true);
    expect((await readFile(join(mnt, "big"))).equals(data)).toBe(true);
    const { stdout } = await run("sh", ["-c", `grep -E '^[^ ]+ ${mnt} ' /proc/mounts`]);
    expect(stdout).toMatch(/^strata /);
    await unlink(join(mnt, "big"));
  });

  it.runIf(driver === "kernel")("keeps an mtime apart from the atime, and stats a file kept open after unlink", async () => {
    const f = join(mnt, "times");
    await writeFile(f, "t");
    await utimes(f, new Date(1_000_000_000_000), new Date(1_500_000_000_000));
    expect((await stat(join(src, "times"))).mtimeMs).toBe(1_500_000_000_000);
    expect((await stat(f)).mtimeMs).toBe(1_500_000_000_000);
    const fh = await open(f, "r+");
    await unlink(f);
    await fh.write(Buffer.from("more"), 0, 4, 1);
    expect((await fh.stat()).size).toBe(5);
    await fh.close();
    await expect(stat(f)).rejects.toMatchObject({ code: "ENOENT" });
  });

  it.runIf(driver === "kernel")("keeps cached sizes and names right across changes through the mount", async () => {
    const f = join(mnt, "grow");
    await writeFile(f, "a");
    expect((await stat(f)).size).toBe(1);
    await appendFile(f, "bcd");
    expect((await stat(f)).size).toBe(4);
    await truncate(f, 2);
    expect((await stat(f)).size).toBe(2);
    await expect(stat(join(mnt, "later"))).rejects.toMatchObject({ code: "ENOENT" });
    await rename(f, join(mnt, "later"));
    expect(await readFile(join(mnt, "later"), "utf8")).toBe("ab");
    await expect(stat(f)).rejects.toMatchObject({ code: "ENOENT" });
    await unlink(join(mnt, "later"));
  });

  it.runIf(driver === "kernel")("drops setuid and setgid bits when another user writes", async () => {
    const f = join(mnt, "suid");
    await chmod(base, 0o755);
    await writeFile(f, "#!/bin/sh\n");
    await chmod(f, 0o6777);
    await run("setpriv", ["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", `echo x >> ${f}`]);
    expect((await stat(join(src, "suid"))).mode & 0o7777).toBe(0o777);
    expect((await stat(f)).mode & 0o7777).toBe(0o777);
    await unlink(f);
  });

  it("refuses a second mount on a live mount point, and detaches a dead one", async () => {
    await expect(mountFs(new PassthroughFs(src), mnt)).rejects.toMatchObject({ code: "ALREADY_EXISTS" });
    await m!.unmount();
    expect(await isFuseMountPoint(mnt)).toBe(false);
    m = await mountFs(new PassthroughFs(src), mnt, { driver });
    expect(await readdir(mnt)).toEqual(["hello.txt"]);
  });

  it("makes writes fail with EROFS on a read-only mount", async () => {
    const ro = join(base, "ro");
    const r = await mountFs(new PassthroughFs(src), ro, { readOnly: true, driver });
    try {
      expect(await readFile(join(ro, "hello.txt"), "utf8")).toBe("hello\n");
      await expect(writeFile(join(ro, "new"), "x")).rejects.toMatchObject({ code: "EROFS" });
      await expect(writeFile(join(ro, "hello.txt"), "x")).rejects.toMatchObject({ code: "EROFS" });
      await expect(mkdir(join(ro, "d"))).rejects.toMatchObject({ code: "EROFS" });
      await expect(unlink(join(ro, "hello.txt"))).rejects.toMatchObject({ code: "EROFS" });
    } finally {
      await r.unmount();
    }
  });
});

describe("mountFs with prepareNext (kernel driver)", () => {
  it("serves each mount, the later ones from a reader thread started before they were asked for", async () => {
    const base = await mkdtemp(join(tmpdir(), "strata-fuse-next-"));
    const src = join(base, "src");
    await mkdir(src);
    await writeFile(join(src, "f.txt"), "f\n");
    const mounts: FuseMount[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        const m = await mountFs(new PassthroughFs(src), join(base, `m${i}`), { prepareNext: true });
        mounts.push(m);
        expect((await run("cat", [join(base, `m${i}`, "f.txt")])).stdout).toBe("f\n");
      }
      await mounts.shift()!.unmount();
      expect((await run("cat", [join(base, "m2", "f.txt")])).stdout).toBe("f\n");
    } finally {
      for (const m of mounts) await m.unmount().catch(() => undefined);
      await rm(base, { recursive: true, force: true });
    }
  });

  it("keeps answering a busy mount while other busy mounts of the process are unmounted (one poll loop serves them all)", async () => {
    const within = <T,>(ms: number, what: string, p: Promise<T>) =>
      Promise.race([p, new Promise<never>((_, rej) => setTimeout(() => rej(new Error(`${what}: no answer in ${ms} ms`)), ms).unref())]);
    const base = await mkdtemp(join(tmpdir(), "strata-fuse-poll-"));
    const src = join(base, "src");
    await mkdir(src);
    await writeFile(join(src, "f.txt"), "f\n");
    const busy = await mountFs(new PassthroughFs(src), join(base, "busy"), { prepareNext: true });
    const hammer = (dir: string) => run("timeout", ["60", "sh", "-c", `while [ ! -e ${join(base, "stop")} ] && cat ${join(dir, "f.txt")} >/dev/null 2>&1; do :; done`]).catch(() => undefined);
    // Another process keeps the busy mount's device polled (a request every few microseconds)
    // the whole time.
    const onBusy = hammer(join(base, "busy"));
    try {
      for (let i = 0; i < 12; i++) {
        const dir = join(base, `m${i}`);
        const m = await within(15_000, `mount ${i}`, mountFs(new PassthroughFs(src), dir, { prepareNext: true }));
        expect((await run("timeout", ["10", "cat", join(dir, "f.txt")])).stdout).toBe("f\n");
        // Unmounted while busy too: a request it read last may be taken after it ended. Then
        // nothing else of this process is active, so a device left polled with no poll coming
        // would never be read again: `timeout` makes that a failure instead of a hung suite.
        const onThis = hammer(dir);
        // A process inside it keeps asking after the unmount detached it, until the abort.
        const child = spawn("timeout", ["20", process.execPath, "-e", `process.chdir(${JSON.stringify(dir)}); const fs = require("fs"); fs.readdirSync("."); process.stdout.write("in\\n"); for (;;) { try { fs.readdirSync("."); } catch { process.exit(0); } }`], { stdio: ["ignore", "pipe", "ignore"] });
        const inside = new Promise<void>((res) => child.on("close", () => res()));
        await new Promise<void>((res) => child.stdout.once("data", () => res()));
        await within(15_000, `unmount ${i}`, Promise.all([m.unmount(), onThis, inside]));
        expect((await run("timeout", ["10", "cat", join(base, "busy", "f.txt")])).stdout, `after unmount ${i}`).toBe("f\n");
      }
    } finally {
      await writeFile(join(base, "stop"), "");
      // The unmount aborts the session: a process still waiting on the busy mount gets an error.
      await busy.unmount().catch(() => undefined);
      await within(20_000, "the busy mount's last reader", onBusy).catch(() => undefined);
      await rm(base, { recursive: true, force: true });
    }
  }, 60_000);
});
