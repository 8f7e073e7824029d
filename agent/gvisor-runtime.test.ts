import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Readable } from "node:stream";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentError } from "./errors.js";
import { GvisorRuntime } from "./gvisor-runtime.js";
import type { BuiltImage } from "./image.js";
import type { ExecOptions, Runtime } from "./runtime.js";
import { testImage } from "./testing.js";

function collect(s: Readable): Promise<Buffer> {
  return new Promise((res, rej) => {
    const chunks: Buffer[] = [];
    s.on("data", (b: Buffer) => chunks.push(b));
    s.on("end", () => res(Buffer.concat(chunks)));
    s.on("error", rej);
  });
}

async function run(rt: Runtime, id: string, opts: ExecOptions, input?: Buffer) {
  const p = rt.exec(id, opts);
  if (input) p.stdin!.end(input);
  const [stdout, stderr, r] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
  return { ...r, stdout, stderr };
}

describe("GvisorRuntime", () => {
  let image: BuiltImage;
  let dir: string;
  let rt: GvisorRuntime;

  beforeAll(async () => {
    image = await testImage();
    dir = await mkdtemp(join(tmpdir(), "strata-agent-"));
    rt = new GvisorRuntime({ stateDir: join(dir, "state"), cgroupParent: `/strata-test-${process.pid}` });
  }, 600_000);

  afterAll(async () => {
    await rt?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("runs a gVisor kernel that sees only its own processes", async () => {
    const sb = await rt.create({ rootfs: image.rootfs });
    const version = await run(rt, sb.id, { argv: ["cat", "/proc/version"] });
    expect(version.exitCode).toBe(0);
    expect(version.stdout.toString()).not.toBe(await readFile("/proc/version", "utf8"));
    const procs = await run(rt, sb.id, { argv: ["ls", "/proc"] });
    const pids = procs.stdout.toString().split(/\s+/).filter((n) => /^\d+$/.test(n)).map(Number);
    expect(pids.length).toBeGreaterThan(0);
    expect(pids.length).toBeLessThan(5);
    expect(pids).not.toContain(process.pid);
    await rt.stop(sb.id);
  });

  it("returns exit code, stdout and stderr exactly, binary-safe both ways", async () => {
    const host = await mkdtemp(join(dir, "mnt-"));
    const sb = await rt.create({ rootfs: image.rootfs, env: { GREETING: "hi there" }, mounts: [{ source: host, destination: "/data" }] });
    const r = await run(rt, sb.id, { argv: ["sh", "-c", 'printf "%s\\n" "$GREETING"; printf "to err" >&2; exit 7'] });
    expect(r).toMatchObject({ exitCode: 7, oom: false });
    expect(r.stdout.toString()).toBe("hi there\n");
    expect(r.stderr.toString()).toBe("to err");

    const bin = await run(rt, sb.id, { argv: ["sh", "-c", "head -c 1000000 /dev/urandom | tee /data/random.bin"] });
    expect(bin.exitCode).toBe(0);
    expect(bin.stdout.length).toBe(1_000_000);
    expect(bin.stdout.equals(await readFile(join(host, "random.bin")))).toBe(true);

    const input = randomBytes(2_000_000);
    const echo = await run(rt, sb.id, { argv: ["cat"], stdin: true }, input);
    expect(echo.exitCode).toBe(0);
    expect(echo.stdout.equals(input)).toBe(true);

    const cwd = await run(rt, sb.id, { argv: ["sh", "-c", "pwd; id -u; echo $EXTRA"], cwd: "/tmp", user: "1000:1000", env: { EXTRA: "x" } });
    expect(cwd.stdout.toString()).toBe("/tmp\n1000\nx\n");
    await rt.stop(sb.id);
  });

  it("delivers kill() to the process and reports the signal", async () => {
    const sb = await rt.create({ rootfs: image.rootfs });
    const p = rt.exec(sb.id, { argv: ["sh", "-c", "echo ready; exec sleep 60"] });
    const first = await new Promise<string>((res) => p.stdout.once("data", (b: Buffer) => res(b.toString())));
    expect(first).toBe("ready\n");
    p.kill("SIGKILL");
    const r = await p.wait();
    expect(r.exitCode).toBe(137);
    expect(r.signal).toBe("SIGKILL");
    await rt.stop(sb.id);
  });

  it("puts and reads files in the sandbox's own filesystem, not in the image", async () => {
    const sb = await rt.create({ rootfs: image.rootfs });
    const data = randomBytes(100_000);
    await rt.putFile(sb.id, "/opt/new/dir/file.bin", data);
    expect((await rt.readFile(sb.id, "/opt/new/dir/file.bin")).equals(data)).toBe(true);
    await expect(stat(join(image.rootfs, "opt/new"))).rejects.toThrow();
    const missing = await rt.readFile(sb.id, "/no/such/file").catch((e: unknown) => e);
    expect(missing).toBeInstanceOf(AgentError);
    expect((missing as AgentError).code).toBe("NOT_FOUND");
    await rt.stop(sb.id);
  });

  it("bind-mounts host dirs read-write and read-only", async () => {
    const rw = await mkdtemp(join(dir, "rw-"));
    const ro = await mkdtemp(join(dir, "ro-"));
    await writeFile(join(ro, "given.txt"), "from host\n");
    const sb = await rt.create({
      rootfs: image.rootfs,
      mounts: [{ source: rw, destination: "/data" }, { source: ro, destination: "/ref", readOnly: true }],
    });
    const w = await run(rt, sb.id, { argv: ["sh", "-c", "echo written > /data/out.txt && cat /ref/given.txt"] });
    expect(w.exitCode).toBe(0);
    expect(w.stdout.toString()).toBe("from host\n");
    expect(await readFile(join(rw, "out.txt"), "utf8")).toBe("written\n");
    const denied = await run(rt, sb.id, { argv: ["sh", "-c", "echo no > /ref/x"] });
    expect(denied.exitCode).not.toBe(0);
    expect(denied.stderr.toString()).toMatch(/Read-only file system/);
    await expect(stat(join(ro, "x"))).rejects.toThrow();
    await rt.stop(sb.id);
  });

  it("has no interface but loopback with network none", async () => {
    const sb = await rt.create({ rootfs: image.rootfs, network: { mode: "none" } });
    const r = await run(rt, sb.id, { argv: ["python3", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"] });
    expect(r.stdout.toString().trim()).toBe("['lo']");
    await rt.stop(sb.id);
  });

  it("applies the requested limits to the host cgroup", async () => {
    const sb = await rt.create({ rootfs: image.rootfs, cpu: 0.5, memoryBytes: 300 << 20, pidsLimit: 64 });
    const cg = `strata-test-${process.pid}/${sb.id}`;
    expect((await readFile(`/sys/fs/cgroup/cpu/${cg}/cpu.cfs_quota_us`, "utf8")).trim()).toBe("50000");
    expect((await readFile(`/sys/fs/cgroup/cpu/${cg}/cpu.cfs_period_us`, "utf8")).trim()).toBe("100000");
    expect(Number(await readFile(`/sys/fs/cgroup/memory/${cg}/memory.limit_in_bytes`, "utf8"))).toBe(300 << 20);
    expect((await readFile(`/sys/fs/cgroup/pids/${cg}/pids.max`, "utf8")).trim()).toBe("64");
    await rt.stop(sb.id);
  });

  it("kills only the sandbox that exceeds its memory and reports OOM", async () => {
    const bomb = await rt.create({ rootfs: image.rootfs, memoryBytes: 200 << 20 });
    const calm = await rt.create({ rootfs: image.rootfs, memoryBytes: 200 << 20 });
    const r = await run(rt, bomb.id, {
      argv: ["python3", "-c", "x = []\nwhile True: x.append(bytearray(16 << 20))"],
    });
    expect(r.exitCode).not.toBe(0);
    expect(r.oom).toBe(true);
    expect(await bomb.exited).toEqual({ reason: "oom", oom: true });
    expect((await rt.info(bomb.id)).state).toBe("stopped");
    expect(() => rt.exec(bomb.id, { argv: ["true"] })).toThrow(/not running/);
    const ok = await run(rt, calm.id, { argv: ["echo", "alive"] });
    expect(ok.stdout.toString()).toBe("alive\n");
    expect((await rt.info(calm.id)).state).toBe("running");
    await rt.stop(calm.id);
  });

  it("stops a sandbox when its lifetime ends", async () => {
    const sb = await rt.create({ rootfs: image.rootfs, lifetimeMs: 1000, labels: { run: "lifetime" } });
    expect((await rt.list()).find((s) => s.id === sb.id)?.labels).toEqual({ run: "lifetime" });
    expect(await sb.exited).toEqual({ reason: "lifetime", oom: false });
    const err = (() => {
      try {
        rt.exec(sb.id, { argv: ["true"] });
      } catch (e) {
        return e;
      }
    })();
    expect((err as AgentError).code).toBe("NOT_RUNNING");
  });

  it("runs nothing in a sandbox once stop() has returned", async () => {
    const host = await mkdtemp(join(dir, "tick-"));
    const sb = await rt.create({ rootfs: image.rootfs, mounts: [{ source: host, destination: "/data" }] });
    const p = rt.exec(sb.id, { argv: ["sh", "-c", "i=0; while :; do i=$((i+1)); echo $i > /data/n.tmp && mv /data/n.tmp /data/n; done"] });
    p.stdout.resume();
    p.stderr.resume();
    while (!(await stat(join(host, "n")).catch(() => undefined))) await new Promise((r) => setTimeout(r, 20));
    await rt.stop(sb.id, { graceMs: 200 });
    const after = await readFile(join(host, "n"), "utf8");
    await new Promise((r) => setTimeout(r, 500));
    expect(await readFile(join(host, "n"), "utf8")).toBe(after);
    expect((await p.wait()).exitCode).not.toBe(0);
    await rt.stop(sb.id);
  });

  it("rejects bad specs and unknown ids with codes", async () => {
    await expect(rt.create({ rootfs: "relative/path" })).rejects.toMatchObject({ code: "INVALID_SPEC" });
    await expect(rt.create({ rootfs: image.rootfs, id: "Bad Id" })).rejects.toMatchObject({ code: "INVALID_SPEC" });
    await expect(rt.create({ rootfs: image.rootfs, user: "nobody-here" })).rejects.toMatchObject({ code: "INVALID_SPEC" });
    await expect(rt.stop("missing")).rejects.toMatchObject({ code: "NOT_FOUND" });
    expect(() => rt.exec("missing", { argv: ["true"] })).toThrow(AgentError);
  });
});
