/**
 * Sandbox networking on real runsc, real network namespaces and real nftables.
 *
 * The test builds its own little network: a namespace `strata-test-srv-<pid>` joined to the host
 * by a veth (host end 10.214.0.1/29; inside 10.214.0.2 and 10.214.0.3), a TCP server inside it on
 * ports 18080 and 18081 of both addresses, and TCP servers on the host end (10.214.0.1). Nothing
 * leaves the machine: every address probed is one of these. A sandbox in egress mode reaches the
 * allow-listed address:port pairs only; one in mode none has no route at all (ENETUNREACH or
 * EHOSTUNREACH); teardown leaves no namespace, veth, filter chain or map element behind.
 * net.ipv4.ip_forward: the forwarding cases turn it off first (only while no egress sandbox of
 * any agent is on the host) and put back the value it had at the end.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createServer, type Server } from "node:net";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { Readable } from "node:stream";
import { egressNames, GvisorRuntime, IP_FORWARD_SAVED, type Runtime, type SandboxState } from "../agent/index.js";
import { runCommand, mustRun } from "../agent/exec-util.js";
import { testImage } from "../agent/testing.js";
import { Container, SandboxClient, stopLocalAgent } from "../sdk/index.js";
import { makeEnv, type Env } from "./support/sandbox-env.js";

const SRV_NS = `strata-test-srv-${process.pid}`;
const SRV_IF = `sts${(process.pid & 0xffffff).toString(16)}`;
const HOST_IP = "10.214.0.1";
const SRV_A = "10.214.0.2";
const SRV_B = "10.214.0.3";

/** Python run inside a sandbox: for each "HOST:PORT" argument prints "HOST:PORT ok <greeting>" or "HOST:PORT fail <errno>". */
const PROBE = `
import socket, sys
for t in sys.argv[1:]:
    h, p = t.rsplit(":", 1)
    try:
        s = socket.create_connection((h, int(p)), timeout=2)
        print(t, "ok", s.recv(200).decode().strip())
        s.close()
    except OSError as e:
        print(t, "fail", e.errno if e.errno is not None else type(e).__name__)
`;

function collect(s: Readable): Promise<Buffer> {
  return new Promise((res, rej) => {
    const parts: Buffer[] = [];
    s.on("data", (b: Buffer) => parts.push(b));
    s.on("end", () => res(Buffer.concat(parts)));
    s.on("error", rej);
  });
}

async function probe(rt: Runtime, id: string, targets: string[]): Promise<Map<string, string>> {
  const p = rt.exec(id, { argv: ["python3", "-c", PROBE, ...targets] });
  const [out, err, r] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
  if (r.exitCode !== 0) throw new Error(`probe failed: ${err.toString()}`);
  return parseProbe(out.toString());
}

function parseProbe(text: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const line of text.trim().split("\n")) {
    const [t, ...rest] = line.split(" ");
    m.set(t!, rest.join(" "));
  }
  return m;
}

function hostServer(port: number, greeting: string): Promise<Server> {
  return new Promise((res, rej) => {
    const s = createServer((c) => c.end(`${greeting}\n`));
    s.once("error", rej);
    s.listen(port, HOST_IP, () => res(s));
  });
}

/** What is left on the host of sandbox `id`'s network: a list of descriptions, empty when nothing. */
async function leftovers(id: string): Promise<string[]> {
  const n = egressNames(id);
  const out: string[] = [];
  if ((await runCommand(["ip", "netns", "list"])).stdout.toString().split("\n").some((l) => l.split(" ")[0] === n.netns)) out.push(`netns ${n.netns}`);
  if ((await runCommand(["ip", "link", "show", n.hostIf])).code === 0) out.push(`veth ${n.hostIf}`);
  if ((await runCommand(["nft", "list", "chain", "inet", "strata", n.chain])).code === 0) out.push(`chain ${n.chain}`);
  if ((await runCommand(["nft", "list", "map", "inet", "strata", "sandboxes"])).stdout.toString().includes(`"${n.hostIf}"`)) out.push(`map element ${n.hostIf}`);
  return out;
}

const IP_FORWARD = "/proc/sys/net/ipv4/ip_forward";
const sleep = (ms: number) => new Promise((res) => setTimeout(res, ms));

async function forwarding(): Promise<string> {
  return (await readFile(IP_FORWARD, "utf8")).trim();
}

async function saved(): Promise<string | undefined> {
  return (await readFile(IP_FORWARD_SAVED, "utf8").catch(() => undefined))?.trim();
}

/** Polls (bounded) until net.ipv4.ip_forward reads `want`; returns what it read last. */
async function forwardingBecomes(want: string): Promise<string> {
  for (let i = 0; i < 150 && (await forwarding()) !== want; i++) await sleep(100);
  return forwarding();
}

/**
 * Waits (bounded) until no egress sandbox of any agent on this host has its filter in place and
 * the last teardown has put net.ipv4.ip_forward back. A stopped sandbox's network is torn down in
 * the background after `stop` returns, and the restore comes after its filter element is gone: on
 * a host that had forwarding off, the saved value outlives the element for a moment.
 */
async function egressIdle(): Promise<boolean> {
  for (let i = 0; i < 200; i++) {
    const r = await runCommand(["nft", "-j", "list", "map", "inet", "strata", "sandboxes"]);
    if ((r.code !== 0 || !r.stdout.toString().includes('"elem"')) && (await saved()) === undefined) return true;
    await sleep(100);
  }
  return false;
}

/**
 * Runs `fn` with net.ipv4.ip_forward turned off (once no egress sandbox is left on the host, so
 * that no one else's traffic depends on it), then puts back the value it had and removes the
 * saved value.
 */
async function withForwardingOff(fn: () => Promise<void>): Promise<void> {
  const before = await forwarding();
  expect(await egressIdle(), "another egress sandbox runs on this host, or the last teardown left forwarding on").toBe(true);
  expect(await saved()).toBeUndefined();
  await writeFile(IP_FORWARD, "0\n");
  try {
    await fn();
  } finally {
    await rm(IP_FORWARD_SAVED, { force: true });
    await writeFile(IP_FORWARD, `${before}\n`);
  }
}

describe("sandbox networks (real runsc, netns, nftables)", () => {
  let dir: string;
  let rt: GvisorRuntime;
  let server: ChildProcess | undefined;
  const hostServers: Server[] = [];
  let allowedPort = 0;
  let deniedPort = 0;

  beforeAll(async () => {
    await testImage();
    dir = await mkdtemp(join(tmpdir(), "strata-net-"));
    rt = new GvisorRuntime({ stateDir: join(dir, "state"), cgroupParent: `/strata-test-net-${process.pid}` });
    await runCommand(["ip", "netns", "del", SRV_NS]);
    await mustRun(["ip", "netns", "add", SRV_NS]);
    await mustRun(["ip", "link", "add", SRV_IF, "type", "veth", "peer", "name", "eth0", "netns", SRV_NS]);
    await mustRun(["ip", "addr", "add", `${HOST_IP}/29`, "dev", SRV_IF]);
    await mustRun(["ip", "link", "set", SRV_IF, "up"]);
    for (const a of [SRV_A, SRV_B]) await mustRun(["ip", "-n", SRV_NS, "addr", "add", `${a}/29`, "dev", "eth0"]);
    await mustRun(["ip", "-n", SRV_NS, "link", "set", "eth0", "up"]);
    await mustRun(["ip", "-n", SRV_NS, "link", "set", "lo", "up"]);
    await mustRun(["ip", "-n", SRV_NS, "route", "add", "default", "via", HOST_IP]);
    const script =
      'const net = require("net"); let n = 0;' +
      "for (const port of [18080, 18081]) net.createServer((c) => c.end(`hello ${c.localAddress}:${c.localPort}\\n`)).listen(port, \"0.0.0.0\", () => { if (++n === 2) console.log(\"ready\"); });";
    server = spawn("ip", ["netns", "exec", SRV_NS, process.execPath, "-e", script], { stdio: ["ignore", "pipe", "inherit"] });
    await new Promise<void>((res, rej) => {
      server!.stdout!.once("data", () => res());
      server!.once("exit", (c) => rej(new Error(`server in ${SRV_NS} exited with ${c}`)));
    });
    hostServers.push(await hostServer(0, "hello host"), await hostServer(0, "hello host, not allowed"));
    allowedPort = (hostServers[0]!.address() as { port: number }).port;
    deniedPort = (hostServers[1]!.address() as { port: number }).port;
  }, 600_000);

  afterAll(async () => {
    await rt?.close();
    server?.kill("SIGKILL");
    for (const s of hostServers) s.close();
    await runCommand(["ip", "link", "del", SRV_IF]);
    await runCommand(["ip", "netns", "del", SRV_NS]);
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("egress reaches allow-listed address:port pairs (host side and another namespace) and nothing else; teardown leaves nothing", async () => {
    const sb = await rt.create({
      rootfs: (await testImage()).rootfs,
      network: { mode: "egress", allow: [`${HOST_IP}:${allowedPort}`, `${SRV_A}:18080`] },
    });
    expect(await leftovers(sb.id)).toHaveLength(4);
    const r = await probe(rt, sb.id, [`${HOST_IP}:${allowedPort}`, `${SRV_A}:18080`, `${SRV_A}:18081`, `${SRV_B}:18080`, `${HOST_IP}:${deniedPort}`]);
    expect(r.get(`${HOST_IP}:${allowedPort}`)).toBe("ok hello host");
    expect(r.get(`${SRV_A}:18080`)).toBe(`ok hello ${SRV_A}:18080`);
    expect(r.get(`${SRV_A}:18081`)).toMatch(/^fail /);
    expect(r.get(`${SRV_B}:18080`)).toMatch(/^fail /);
    expect(r.get(`${HOST_IP}:${deniedPort}`)).toMatch(/^fail /);
    await rt.stop(sb.id);
    await rt.close();
    expect(await leftovers(sb.id)).toEqual([]);
    rt = new GvisorRuntime({ stateDir: join(dir, "state"), cgroupParent: `/strata-test-net-${process.pid}` });
  });

  it("an allow-listed address without a port allows every port of it", async () => {
    const sb = await rt.create({ rootfs: (await testImage()).rootfs, network: { mode: "egress", allow: [`${SRV_B}/32`] } });
    const r = await probe(rt, sb.id, [`${SRV_B}:18080`, `${SRV_B}:18081`, `${SRV_A}:18080`]);
    expect(r.get(`${SRV_B}:18080`)).toBe(`ok hello ${SRV_B}:18080`);
    expect(r.get(`${SRV_B}:18081`)).toBe(`ok hello ${SRV_B}:18081`);
    expect(r.get(`${SRV_A}:18080`)).toMatch(/^fail /);
    await rt.stop(sb.id);
  });

  it("network none has loopback only and no route anywhere", async () => {
    const sb = await rt.create({ rootfs: (await testImage()).rootfs });
    const p = rt.exec(sb.id, { argv: ["python3", "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"] });
    const [out] = await Promise.all([collect(p.stdout), p.wait()]);
    expect(out.toString().trim()).toBe("['lo']");
    const r = await probe(rt, sb.id, [`${HOST_IP}:${allowedPort}`, `${SRV_A}:18080`]);
    expect(r.get(`${HOST_IP}:${allowedPort}`)).toMatch(/^fail (101|113)$/);
    expect(r.get(`${SRV_A}:18080`)).toMatch(/^fail (101|113)$/);
    expect(await leftovers(sb.id)).toEqual([]);
    await rt.stop(sb.id);
  });

  it("rejects bad allow-lists with INVALID_SPEC and leaves nothing behind", async () => {
    const rootfs = (await testImage()).rootfs;
    for (const allow of [["10.0.0.1:99999"], ["fe80::1"], ["10.0.0.0/40"], ["not a host"]]) {
      await expect(rt.create({ id: "bad-net", rootfs, network: { mode: "egress", allow } })).rejects.toMatchObject({ code: "INVALID_SPEC" });
    }
    expect(await leftovers("bad-net")).toEqual([]);
  });

  it("an egress sandbox outlives its runtime's process (SIGKILL): a new runtime adopts it with its filter, or discards it leaving nothing", async () => {
    // The first runtime lives in a child process that prints the sandboxes' states and is then killed.
    const script = join(dir, "first-runtime.mts");
    await writeFile(script, [
      `import { GvisorRuntime } from ${JSON.stringify(resolve(__dirname, "../agent/gvisor-runtime.ts"))};`,
      `const rt = new GvisorRuntime({ stateDir: ${JSON.stringify(join(dir, "state"))}, cgroupParent: "/strata-test-net-${process.pid}" });`,
      `const spec = { rootfs: ${JSON.stringify((await testImage()).rootfs)}, network: { mode: "egress", allow: ["${SRV_A}:18080"] } };`,
      `const a = await rt.create({ ...spec, id: "kept-${process.pid}" });`,
      `const b = await rt.create({ ...spec, id: "dropped-${process.pid}" });`,
      `console.log(JSON.stringify([await rt.state(a.id), await rt.state(b.id)]));`,
      `setInterval(() => {}, 1000);`,
    ].join("\n"));
    const child = spawn(process.execPath, ["--import", "tsx", script], { cwd: resolve(__dirname, ".."), stdio: ["ignore", "pipe", "inherit"] });
    const line = await new Promise<string>((res, rej) => {
      let buf = "";
      child.stdout!.on("data", (b: Buffer) => {
        buf += b.toString();
        if (buf.includes("\n")) res(buf.split("\n")[0]!);
      });
      child.once("exit", (c) => rej(new Error(`first runtime exited with ${c}`)));
    });
    const [kept, dropped] = JSON.parse(line) as [SandboxState, SandboxState];
    child.kill("SIGKILL");
    await new Promise((res) => child.once("exit", res));

    const handle = await rt.adopt(kept);
    expect(handle).toMatchObject({ id: kept.id, state: "running" });
    const r = await probe(rt, kept.id, [`${SRV_A}:18080`, `${SRV_B}:18080`]);
    expect(r.get(`${SRV_A}:18080`)).toBe(`ok hello ${SRV_A}:18080`);
    expect(r.get(`${SRV_B}:18080`)).toMatch(/^fail /);
    await rt.discard(dropped);
    expect(await leftovers(dropped.id)).toEqual([]);
    expect(await rt.adopt(dropped)).toBeNull();
    await rt.stop(kept.id);
    await rt.close();
    expect(await leftovers(kept.id)).toEqual([]);
    rt = new GvisorRuntime({ stateDir: join(dir, "state"), cgroupParent: `/strata-test-net-${process.pid}` });
  });

  it("turns net.ipv4.ip_forward on for egress, saving its value, and puts that back when the last egress sandbox is torn down", async () => {
    await withForwardingOff(async () => {
      const rootfs = (await testImage()).rootfs;
      const network = { mode: "egress" as const, allow: [`${SRV_A}:18080`] };
      const a = await rt.create({ rootfs, network });
      expect(await forwarding()).toBe("1");
      expect(await saved()).toBe("0");
      expect((await probe(rt, a.id, [`${SRV_A}:18080`])).get(`${SRV_A}:18080`)).toBe(`ok hello ${SRV_A}:18080`);
      const b = await rt.create({ rootfs, network });
      await rt.stop(a.id);
      for (let i = 0; i < 100 && (await leftovers(a.id)).length; i++) await sleep(100);
      expect(await leftovers(a.id)).toEqual([]);
      expect(await forwarding()).toBe("1");
      expect((await probe(rt, b.id, [`${SRV_A}:18080`])).get(`${SRV_A}:18080`)).toBe(`ok hello ${SRV_A}:18080`);
      await rt.stop(b.id);
      expect(await forwardingBecomes("0")).toBe("0");
      expect(await saved()).toBeUndefined();
      const none = await rt.create({ rootfs });
      expect(await forwarding()).toBe("0");
      await rt.stop(none.id);
    });
  });

  describe("through the agent and the SDK", () => {
    let e: Env;

    beforeAll(async () => {
      e = await makeEnv();
    }, 600_000);

    afterAll(async () => {
      await e?.cleanup();
    });

    it("new Container({ network: { egress } }) reaches only its allow-list; the record shows it; stop tears the network down", async () => {
      const c = await new Container({ client: e.client, network: { egress: [`${SRV_A}:18080`] } }).run();
      const r = parseProbe((await c.exec("python3", "-c", PROBE, `${SRV_A}:18080`, `${SRV_B}:18080`)).stdoutText);
      expect(r.get(`${SRV_A}:18080`)).toBe(`ok hello ${SRV_A}:18080`);
      expect(r.get(`${SRV_B}:18080`)).toMatch(/^fail /);
      const rec = (await e.client.list()).find((s) => s.id === c.id)!;
      expect(rec.network).toEqual({ mode: "egress", allow: [`${SRV_A}:18080`] });
      await c.stop();
      // Teardown runs in the agent's background after stop; wait (bounded) until it is done.
      for (let i = 0; i < 100 && (await leftovers(c.id)).length; i++) await new Promise((res) => setTimeout(res, 100));
      expect(await leftovers(c.id)).toEqual([]);
      const plain = await new Container({ client: e.client }).run();
      expect((await e.client.list()).find((s) => s.id === plain.id)!.network).toEqual({ mode: "none" });
      expect(parseProbe((await plain.exec("python3", "-c", PROBE, `${SRV_A}:18080`)).stdoutText).get(`${SRV_A}:18080`)).toMatch(/^fail (101|113)$/);
      await plain.stop();
      await expect(new Container({ client: e.client, network: { egress: ["10.0.0.1:0"] } }).run()).rejects.toMatchObject({ code: "INVALID_SPEC" });
    });

    it("strata run --egress (repeated and comma-separated) reaches only its allow-list; sandbox ls --json shows the allow-list", async () => {
      const r = await e.cli(
        "run", "--name", `cli-egress-${process.pid}`, "--egress", `${SRV_A}:18080`, "--egress", `${HOST_IP}:${allowedPort},${SRV_B}/32`, "--",
        "python3", "-c", PROBE, `${SRV_A}:18080`, `${SRV_A}:18081`, `${SRV_B}:18081`, `${HOST_IP}:${allowedPort}`, `${HOST_IP}:${deniedPort}`,
      );
      expect(r.code, r.stderr).toBe(0);
      const p = parseProbe(r.stdout.toString());
      expect(p.get(`${SRV_A}:18080`)).toBe(`ok hello ${SRV_A}:18080`);
      expect(p.get(`${SRV_A}:18081`)).toMatch(/^fail /);
      expect(p.get(`${SRV_B}:18081`)).toBe(`ok hello ${SRV_B}:18081`);
      expect(p.get(`${HOST_IP}:${allowedPort}`)).toBe("ok hello host");
      expect(p.get(`${HOST_IP}:${deniedPort}`)).toMatch(/^fail /);
      for (let i = 0; i < 100 && (await leftovers(`cli-egress-${process.pid}`)).length; i++) await new Promise((res) => setTimeout(res, 100));
      expect(await leftovers(`cli-egress-${process.pid}`)).toEqual([]);

      const held = await e.client.create({ network: { egress: [`${SRV_A}:18080`, `${SRV_B}/32`] } });
      try {
        const ls = JSON.parse(await e.ok("sandbox", "ls", "--json")) as { id: string; network?: unknown }[];
        expect(ls.find((s) => s.id === held.id)?.network).toEqual({ mode: "egress", allow: [`${SRV_A}:18080`, `${SRV_B}/32`] });
        expect(ls.find((s) => s.id === `cli-egress-${process.pid}`)?.network).toEqual({ mode: "egress", allow: [`${SRV_A}:18080`, `${HOST_IP}:${allowedPort}`, `${SRV_B}/32`] });
      } finally {
        await held.stop();
      }
    });

    it("a restarted agent puts net.ipv4.ip_forward back: after stopping a killed agent's egress sandbox, and when the killed agent had torn down its last one but not restored", async () => {
      const home = e.home;
      await withForwardingOff(async () => {
        const sb = await e.client.create({ network: { egress: [`${SRV_A}:18080`] }, volumes: [{ name: "fwd", path: "/v" }] });
        expect(await forwarding()).toBe("1");
        expect(await saved()).toBe("0");
        const pid = Number((await readFile(join(home, "agent.pid"), "utf8")).trim());
        process.kill(pid, "SIGKILL");
        for (let i = 0; i < 100 && (await runCommand(["kill", "-0", String(pid)])).code === 0; i++) await sleep(50);
        await e.client.close();
        // The next agent stops the sandbox (its volume's mount died with the first agent), tears its network down, restores.
        const next = new SandboxClient({ env: e.env });
        try {
          expect((await next.list()).find((s) => s.id === sb.id)).toMatchObject({ state: "stopped", exit: { reason: "agent_restart" } });
          expect(await forwardingBecomes("0")).toBe("0");
          expect(await leftovers(sb.id)).toEqual([]);
          expect(await saved()).toBeUndefined();
        } finally {
          await next.close();
        }

        // An agent that died after its last teardown but before the restore left the saved value behind.
        await stopLocalAgent(home);
        await writeFile(IP_FORWARD_SAVED, "0\n");
        await writeFile(IP_FORWARD, "1\n");
        const third = new SandboxClient({ env: e.env });
        try {
          await third.list();
          expect(await forwarding()).toBe("0");
          expect(await saved()).toBeUndefined();
        } finally {
          await third.close();
        }
      });
    });
  });
});
