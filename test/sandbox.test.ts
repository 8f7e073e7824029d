/**
 * Sandboxes end to end: the node agent (`strata agent`, started on demand as a detached process),
 * real runsc, real FUSE mounts of volumes bind-mounted into the sandboxes, the embedded file
 * store, and one case on S3 (Ceph RGW from the global setup). The CLI runs as separate processes
 * (the TypeScript sources through tsx); the SDK cases (`Container`, `SandboxClient`) run in this
 * process against the same agent. Each environment's agent is stopped (SIGTERM) in afterAll.
 */
import { existsSync, lstatSync, readdirSync, readlinkSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { testImage } from "../agent/testing.js";
import { Container, Image } from "../sdk/index.js";
import { makeTestS3Store, type TestS3Store } from "./support/s3.js";
import { makeEnv, type Env } from "./support/sandbox-env.js";

interface LsItem {
  path: string;
  kind: string;
  target?: string;
}

async function lsVolume(e: Env, name: string): Promise<LsItem[]> {
  return JSON.parse(await e.ok("ls", name, "-r", "--json")) as LsItem[];
}

async function logOf(e: Env, name: string): Promise<{ id: string; labels: Record<string, string> }[]> {
  return JSON.parse(await e.ok("log", name, "--json")) as { id: string; labels: Record<string, string> }[];
}

describe("sandboxes with volumes (file store)", () => {
  let e: Env;

  beforeAll(async () => {
    await testImage();
    e = await makeEnv();
    const src = join(e.base, "in.txt");
    await writeFile(src, "hello from a volume\n");
    await e.ok("volume", "create", "data");
    await e.ok("put", "data", src, "/in.txt");
  }, 600_000);

  afterAll(async () => {
    await e?.cleanup();
  });

  it("strata run sees the volume, streams output, exits with the command's code, and syncs a version labelled with the sandbox", async () => {
    const before = await logOf(e, "data");
    const r = await e.cli("run", "-v", "data:/data", "--", "sh", "-c", "cat /data/in.txt; echo out > /data/out.txt; echo to-stderr >&2; exit 3");
    expect(r.stdout.toString()).toBe("hello from a volume\n");
    expect(r.stderr).toContain("to-stderr");
    expect(r.code).toBe(3);
    const log = await logOf(e, "data");
    expect(log.length).toBe(before.length + 1);
    expect(log[0]!.labels.sandbox).toMatch(/^sb-/);
    expect(log[0]!.labels.run).toBe(log[0]!.labels.sandbox);
    expect(await e.ok("cat", "data", "/out.txt")).toBe("out\n");
  });

  it("--fork leaves the source unchanged and the fork holds the writes", async () => {
    const head = (await logOf(e, "data"))[0]!.id;
    const r = await e.cli("run", "--fork", "data:run1:/work", "--", "sh", "-c", "cat /work/in.txt && echo mine > /work/run1.txt");
    expect(r.code).toBe(0);
    expect(r.stdout.toString()).toBe("hello from a volume\n");
    expect((await logOf(e, "data"))[0]!.id).toBe(head);
    expect((await lsVolume(e, "data")).map((i) => i.path)).not.toContain("run1.txt");
    expect(await e.ok("cat", "run1", "/run1.txt")).toBe("mine\n");
    const again = await e.cli("run", "--fork", "data:run1:/work", "--", "true");
    expect(again.code).toBe(1);
    expect(again.stderr).toContain("ALREADY_EXISTS");
  });

  it("three parallel Containers, each on its own fork, see only their own writes", async () => {
    const cs = await Promise.all([1, 2, 3].map((i) => new Container({ client: e.client, cpu: 1, memory: "512Mi" }).forkVolume("data", `par-${i}`, "/data").run()));
    const writes = await Promise.all(cs.map((c, i) => c.exec("sh", "-c", `echo ${i + 1} > /data/file-${i + 1}.txt && ls /data`)));
    for (const [i, w] of writes.entries()) {
      expect(w.exitCode).toBe(0);
      expect(w.stdoutText.split("\n")).toContain(`file-${i + 1}.txt`);
      expect(w.stdoutText).not.toMatch(new RegExp(`file-[^${i + 1}]`));
    }
    const stops = await Promise.all(cs.map((c) => c.stop()));
    for (const [i, s] of stops.entries()) {
      expect(s.volumes).toHaveLength(1);
      expect(s.volumes[0]!.name).toBe(`par-${i + 1}`);
      expect(s.volumes[0]!.changed).toBe(true);
    }
    for (const i of [1, 2, 3]) {
      const names = (await lsVolume(e, `par-${i}`)).map((x) => x.path).filter((p) => p.startsWith("file-"));
      expect(names).toEqual([`file-${i}.txt`]);
    }
    expect((await lsVolume(e, "data")).map((x) => x.path).filter((p) => p.startsWith("file-"))).toEqual([]);
  });

  it("exec returns the exit code and byte-exact stdout and stderr; spawn takes stdin and kill; files in the sandbox's own filesystem", async () => {
    const c = await new Container({ client: e.client }).run();
    try {
      const r = await c.exec("python3", "-c", "import sys; sys.stdout.buffer.write(bytes(range(256))*64); sys.stderr.buffer.write(b'\\x00\\xff\\xfeerr'); sys.exit(7)");
      expect(r.exitCode).toBe(7);
      expect(r.oom).toBe(false);
      expect(r.stdout.equals(Buffer.concat(Array(64).fill(Buffer.from(Array.from({ length: 256 }, (_, i) => i)))))).toBe(true);
      expect(r.stderr.equals(Buffer.from([0x00, 0xff, 0xfe, ...Buffer.from("err")]))).toBe(true);
      expect((await c.exec("sh", "-c", "echo héllo")).stdoutText).toBe("héllo\n");

      const p = await c.spawn(["sh", "-c", "tr a-z A-Z; echo done >&2"], { stdin: true });
      const out: Buffer[] = [];
      p.stdout.on("data", (b: Buffer) => out.push(b));
      const err: Buffer[] = [];
      p.stderr.on("data", (b: Buffer) => err.push(b));
      p.stdin!.write("abc\n");
      p.stdin!.end("xyz\n");
      expect((await p.wait()).exitCode).toBe(0);
      expect(Buffer.concat(out).toString()).toBe("ABC\nXYZ\n");
      expect(Buffer.concat(err).toString()).toBe("done\n");

      const sleeper = await c.spawn(["sleep", "600"]);
      sleeper.kill("SIGKILL");
      const k = await sleeper.wait();
      expect(k.exitCode).toBe(137);
      expect(k.signal).toBe("SIGKILL");

      const bin = Buffer.from([0, 1, 2, 255, 254, 10, 13]);
      await c.putFile("/tmp/x/y.bin", bin);
      expect((await c.readFile("/tmp/x/y.bin")).equals(bin)).toBe(true);
      await expect(c.readFile("/tmp/none")).rejects.toMatchObject({ code: "NOT_FOUND" });
    } finally {
      await c.stop();
    }
  });

  it("sandbox ls --json, sandbox exec and sandbox stop work across CLI processes", async () => {
    const sb = await e.client.create({ cpu: 1, memory: "256Mi", volumes: [{ name: "lsvol", path: "/v" }] });
    const ls = JSON.parse(await e.ok("sandbox", "ls", "--json")) as Record<string, unknown>[];
    const mine = ls.find((s) => s.id === sb.id)!;
    expect(Object.keys(mine).sort()).toEqual(["cpu", "gpu", "id", "image", "memory", "network", "node", "state", "volumes"]);
    expect(mine).toMatchObject({ state: "running", cpu: 1, memory: 256 << 20, gpu: null, volumes: [{ name: "lsvol", path: "/v", readOnly: false }], network: { mode: "none" } });
    expect(mine.image).toMatch(/^[0-9a-f]{64}$/);
    const ex = await e.cli("sandbox", "exec", sb.id, "--", "sh", "-c", "echo in-sandbox > /v/f.txt; cat /v/f.txt; exit 4");
    expect(ex.code).toBe(4);
    expect(ex.stdout.toString()).toBe("in-sandbox\n");
    const stop = await e.ok("sandbox", "stop", sb.id);
    expect(stop).toMatch(/^lsvol\t[0-9a-f]{64}\n$/);
    expect(await e.ok("cat", "lsvol", "/f.txt")).toBe("in-sandbox\n");
    const after = JSON.parse(await e.ok("sandbox", "ls", "--json")) as Record<string, unknown>[];
    expect(after.find((s) => s.id === sb.id)?.state).toBe("stopped");
    const gone = await e.cli("sandbox", "exec", sb.id, "--", "true");
    expect(gone.code).toBe(1);
    expect(gone.stderr).toMatch(/NOT_RUNNING|NOT_FOUND/);
  });

  it("arguments after -- belong to the command, --help and -h included (run and sandbox exec)", async () => {
    const r = await e.cli("run", "--no-sync", "--", "sh", "-c", 'echo "$@"', "sh", "--help", "-h");
    expect(r.code).toBe(0);
    expect(r.stdout.toString()).toBe("--help -h\n");
    const sb = await e.client.create({});
    try {
      const x = await e.cli("sandbox", "exec", sb.id, "--", "sh", "-c", 'echo "$@"', "sh", "-h", "--help");
      expect(x.code).toBe(0);
      expect(x.stdout.toString()).toBe("-h --help\n");
    } finally {
      await sb.stop();
    }
    const help = await e.cli("run", "--no-sync", "--help", "--", "true");
    expect(help.code).toBe(0);
    expect(help.stdout.toString()).toMatch(/^usage: strata run /);
  });

  it("a memory bomb is reported as OOM, by the SDK and by strata run (exit 137)", async () => {
    const bomb = "x = []\nwhile True: x.append(bytearray(16 << 20))";
    const c = await new Container({ client: e.client, memory: "256Mi" }).run();
    const r = await c.exec("python3", "-c", bomb);
    expect(r.oom).toBe(true);
    expect((await c.stop()).sandbox.exit).toMatchObject({ oom: true });
    const cli = await e.cli("run", "--memory", "256Mi", "--", "python3", "-c", bomb);
    expect(cli.code).toBe(137);
    expect(cli.stderr).toMatch(/^strata: .*\(OOM\)$/m);
  });

  it("symlinks to / and .. written in a sandbox stay symlinks: sync and strata get never follow them", async () => {
    const r = await e.cli("run", "-v", "links:/data", "--", "sh", "-c", "ln -s / /data/root && ln -s ../.. /data/up && mkdir /data/d && ln -s ../../../etc /data/d/etc && echo ok > /data/d/f");
    expect(r.code).toBe(0);
    const items = await lsVolume(e, "links");
    expect(items.find((i) => i.path === "root")).toMatchObject({ kind: "symlink", target: "/" });
    expect(items.find((i) => i.path === "up")).toMatchObject({ kind: "symlink", target: "../.." });
    expect(items.filter((i) => i.path.startsWith("root/") || i.path.startsWith("up/"))).toEqual([]);
    const outer = join(e.base, "get-outer");
    await mkdir(outer);
    const dest = join(outer, "dest");
    await e.ok("get", "links", "/", dest);
    expect(readdirSync(outer)).toEqual(["dest"]);
    expect(readdirSync(dest).sort()).toEqual(["d", "root", "up"]);
    expect(lstatSync(join(dest, "root")).isSymbolicLink()).toBe(true);
    expect(readlinkSync(join(dest, "root"))).toBe("/");
    expect(readlinkSync(join(dest, "up"))).toBe("../..");
    expect(readlinkSync(join(dest, "d", "etc"))).toBe("../../../etc");
    expect(readdirSync(join(dest, "d")).sort()).toEqual(["etc", "f"]);
  });

  it("stop({ sync: false }) makes no version and drops the writes", async () => {
    await e.ok("volume", "create", "nosync");
    const c = await new Container({ client: e.client }).mountVolume("nosync", "/n").run();
    expect((await c.exec("sh", "-c", "echo x > /n/x.txt")).exitCode).toBe(0);
    const s = await c.stop({ sync: false });
    expect(s.volumes).toEqual([]);
    expect(await logOf(e, "nosync")).toEqual([]);
    const again = await new Container({ client: e.client }).mountVolume("nosync", "/n").run();
    expect((await again.exec("ls", "-A", "/n")).stdoutText).toBe("");
    await again.stop();
    expect(await logOf(e, "nosync")).toEqual([]);
  });

  it("Image's fluent API returns new images; an identical spec is not built again; strata image build prints the same hash twice", async () => {
    const base = Image.debianSlim();
    const withEnv = base.env({ GREETING: "hi" });
    const marker = `m-${Date.now()}`;
    const withBoth = withEnv.runCommands(`echo ${marker} > /marker`).workdir("/srv");
    expect(base.spec.steps).toEqual([]);
    expect(withEnv.spec.steps).toHaveLength(1);
    expect(withBoth.spec.steps).toHaveLength(3);
    const first = await e.client.buildImage(withBoth);
    expect(first.cached).toBe(false);
    const second = await e.client.buildImage(Image.debianSlim().env({ GREETING: "hi" }).runCommands(`echo ${marker} > /marker`).workdir("/srv"));
    expect(second).toEqual({ hash: first.hash, cached: true });
    const c = await new Container({ client: e.client, image: withBoth }).run();
    expect((await c.exec("sh", "-c", 'cat /marker; echo "$GREETING"; pwd')).stdoutText).toBe(`${marker}\nhi\n/srv\n`);
    await c.stop();
    const spec = join(e.base, "spec.json");
    await writeFile(spec, JSON.stringify(withEnv.spec));
    const h1 = (await e.ok("image", "build", spec)).trim();
    const h2 = (await e.ok("image", "build", spec)).trim();
    expect(h1).toMatch(/^[0-9a-f]{64}$/);
    expect(h2).toBe(h1);
    const dockerfile = join(e.base, "Dockerfile");
    await writeFile(dockerfile, 'FROM debian:bookworm-slim\nENV GREETING=hi\n');
    expect((await e.ok("image", "build", dockerfile)).trim()).toBe(h1);
  });

  it("a GPU request fails with NO_GPU on a node without one (the real detector finds none here), and bad flags are usage errors", async () => {
    const r = await e.cli("run", "--gpu", "a100:1", "--", "true");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^strata: create sandbox: this node has no gpu a100 \(it has none\) \(NO_GPU\)$/m);
    expect(r.stderr).toMatch(/^hint: /m);
    expect(r.stderr).not.toMatch(/\n\s+at /);
    const bad = await e.cli("run", "-v", "nocolon", "--", "true");
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/^hint: usage: strata run /m);
    await expect(new Container({ client: e.client, gpu: "h100:2" }).run()).rejects.toMatchObject({ code: "NO_GPU" });
    expect(existsSync(join(e.base, "home", "agent.sock"))).toBe(true);
  });

  it("--egress: each bad entry is a usage error (exit 2, one line, a hint, no stack) before any sandbox starts; --help documents it", async () => {
    const cases: [string, RegExp][] = [
      ["10.0.0.1:99999", /^strata: run: bad --egress "10\.0\.0\.1:99999": port must be 1-65535 \(USAGE\)$/m],
      ["10.0.0.1:80,fe80::1", /^strata: run: bad --egress "fe80::1": IPv6 is not supported \(USAGE\)$/m],
      ["10.0.0.0/40", /^strata: run: bad --egress "10\.0\.0\.0\/40": bad prefix length \(want 0-32\) \(USAGE\)$/m],
      ["10.0.0.1,,10.0.0.2", /^strata: run: bad --egress "10\.0\.0\.1,,10\.0\.0\.2": empty entry \(USAGE\)$/m],
      ["not a host", /^strata: run: bad --egress "not a host": not an IPv4 address, CIDR or host name .*\(USAGE\)$/m],
    ];
    const before = (await e.client.list()).length;
    for (const [value, line] of cases) {
      const r = await e.cli("run", "--egress", "10.0.0.9", "--egress", value, "--", "true");
      expect(r.code, value).toBe(2);
      expect(r.stderr, value).toMatch(line);
      expect(r.stderr.split("\n")[1], value).toMatch(/^hint: usage: strata run .*--egress ADDR\[:PORT\]/);
      expect(r.stderr, value).not.toMatch(/\n\s+at /);
    }
    expect((await e.client.list()).length).toBe(before);
    // A raw agent caller skips the SDK's checks: the agent checks the syntax itself, before the
    // fork (of a volume that does not exist) would fail the create with NOT_FOUND.
    const agent = await e.client.agent();
    await expect(
      agent.create({ image: { base: { kind: "debian-slim" }, steps: [] }, volumes: [{ name: "never-made", path: "/d", forkFrom: "no-such-volume" }], network: { mode: "egress", allow: ["10.0.0.9", "10.0.0.1:99999"] } }),
    ).rejects.toMatchObject({ code: "INVALID_SPEC", message: expect.stringContaining('"10.0.0.1:99999"') });
    expect((await e.client.list()).length).toBe(before);
    const help = await e.cli("run", "--help");
    expect(help.code).toBe(0);
    expect(help.stdout.toString()).toMatch(/^usage: strata run .*\[--egress ADDR\[:PORT\]\[,ADDR\[:PORT\]\.\.\.\]\]\.\.\./);
    expect(help.stdout.toString()).toMatch(/^ {2}--egress {6}.*IPv4 address, a CIDR .* host name/m);
    expect(help.stdout.toString()).toContain("own network namespace");
  });
});

describe("sandboxes with volumes on S3", () => {
  let s3: TestS3Store;
  let e: Env;

  beforeAll(async () => {
    await testImage();
    s3 = await makeTestS3Store();
    e = await makeEnv({
      STRATA_STORE: `s3://${s3.bucket}/sandbox`,
      STRATA_S3_ENDPOINT: s3.config.endpoint,
      AWS_ACCESS_KEY_ID: s3.config.accessKeyId,
      AWS_SECRET_ACCESS_KEY: s3.config.secretAccessKey,
      AWS_REGION: s3.config.region,
    });
  }, 600_000);

  afterAll(async () => {
    await e?.cleanup();
    await s3?.cleanup();
  });

  it("strata run writes a version of the volume in the bucket; a fork sees it", async () => {
    const r = await e.cli("run", "-v", "s3data:/data", "--", "sh", "-c", "seq 1 1000 > /data/seq.txt && echo written");
    expect(r.code).toBe(0);
    expect(r.stdout.toString()).toBe("written\n");
    const log = await logOf(e, "s3data");
    expect(log).toHaveLength(1);
    const f = await e.cli("run", "--fork", "s3data:s3fork:/w", "--", "sh", "-c", "wc -l < /w/seq.txt");
    expect(f.stdout.toString().trim()).toBe("1000");
  });
});
