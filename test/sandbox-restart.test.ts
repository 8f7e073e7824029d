/**
 * The agent's durable sandbox records, end to end on real runsc and FUSE: an agent killed with
 * SIGKILL, and the next agent on the same STRATA_HOME taking over what it left.
 * - a running sandbox without volumes is adopted: `sandbox ls` shows it, exec and stop work, and
 *   a lifetime still ends it;
 * - a running sandbox with a volume is stopped (reason "agent_restart"; its FUSE mount died with
 *   the old agent) and the writes it staged in the volume become a version;
 * - a sandbox that died while no agent ran is cleaned up (runsc state, bundle, mount points);
 * - an agent killed between forking a sandbox's volumes and starting it (the fault: a runsc,
 *   named by STRATA_RUNSC, that SIGKILLs the agent calling it): the next agent deletes the forks
 *   nothing was written to, and keeps and reports one that got a version meanwhile.
 */
import { existsSync, readdirSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCommand } from "../agent/exec-util.js";
import { testImage } from "../agent/testing.js";
import { SandboxClient, type SandboxRecord } from "../sdk/index.js";
import { processAlive } from "../sdk/process.js";
import { makeEnv, type Env } from "./support/sandbox-env.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));


/** Polls `list()` until `pred` holds for the sandbox `id` (bounded); returns its record. */
async function waitFor(client: SandboxClient, id: string, pred: (r: SandboxRecord | undefined) => boolean): Promise<SandboxRecord | undefined> {
  let rec: SandboxRecord | undefined;
  for (let i = 0; i < 300; i++) {
    rec = (await client.list()).find((s) => s.id === id);
    if (pred(rec)) return rec;
    await sleep(100);
  }
  return rec;
}

describe("an agent killed with SIGKILL, and the next one", () => {
  let e: Env;
  let home: string;
  let runscRoot: string;

  beforeAll(async () => {
    await testImage();
    e = await makeEnv();
    home = e.home;
    runscRoot = join(home, "agent", "runsc");
  }, 600_000);

  afterAll(async () => {
    await e?.cleanup();
  });

  it("adopts running sandboxes without volumes, stops those with volumes keeping their writes, cleans up dead ones", async () => {
    const first = e.client;
    const plain = await first.create({ name: "adopt-me", cpu: 1, memory: "256Mi" });
    const timed = await first.create({ name: "timed", lifetime: "6s" });
    const withVol = await first.create({ name: "with-vol", volumes: [{ name: "kept", path: "/v" }] });
    const doomed = await first.create({ name: "doomed" });
    expect((await withVol.exec("sh", "-c", "echo staged-before-crash > /v/f.txt && sync")).exitCode).toBe(0);
    expect((await plain.exec("sh", "-c", "echo state > /tmp/marker")).exitCode).toBe(0);

    const agentPid = Number((await readFile(join(home, "agent.pid"), "utf8")).trim());
    process.kill(agentPid, "SIGKILL");
    for (let i = 0; i < 100 && processAlive(agentPid); i++) await sleep(50);
    expect(processAlive(agentPid)).toBe(false);
    await first.close();

    // While no agent runs: the sandbox "doomed" dies (its sandbox process is killed).
    const st = await runCommand(["runsc", `--root=${runscRoot}`, "state", "doomed"]);
    const doomedPid = (JSON.parse(st.stdout.toString()) as { pid: number }).pid;
    process.kill(doomedPid, "SIGKILL");
    for (let i = 0; i < 100 && processAlive(doomedPid); i++) await sleep(50);

    const second = new SandboxClient({ env: e.env });
    try {
      const ls = await second.list();
      expect(ls.find((s) => s.id === "adopt-me")).toMatchObject({ state: "running", cpu: 1, memoryBytes: 256 << 20 });
      expect(ls.find((s) => s.id === "timed")?.state).toMatch(/running|stopping|stopped/);
      expect(ls.find((s) => s.id === "with-vol")).toMatchObject({ state: "stopped", exit: { reason: "agent_restart" } });
      expect(ls.find((s) => s.id === "doomed")).toMatchObject({ state: "stopped", exit: { reason: "exited" } });
      expect(Number((await readFile(join(home, "agent.pid"), "utf8")).trim())).not.toBe(agentPid);

      const cliLs = JSON.parse(await e.ok("sandbox", "ls", "--json")) as { id: string; state: string }[];
      expect(cliLs.find((s) => s.id === "adopt-me")?.state).toBe("running");

      const adopted = await second.get("adopt-me");
      const r = await adopted.exec("sh", "-c", "cat /tmp/marker; echo again");
      expect(r).toMatchObject({ exitCode: 0, stdoutText: "state\nagain\n" });
      const cliExec = await e.cli("sandbox", "exec", "adopt-me", "--", "sh", "-c", "exit 5");
      expect(cliExec.code).toBe(5);

      // The lifetime given to the first agent still ends the sandbox under the second.
      const t = await waitFor(second, "timed", (rec) => rec?.state === "stopped");
      expect(t).toMatchObject({ state: "stopped", exit: { reason: "lifetime" } });

      // The writes staged in the volume before the crash became a version, labelled with the sandbox.
      expect(await e.ok("cat", "kept", "/f.txt")).toBe("staged-before-crash\n");
      const log = JSON.parse(await e.ok("log", "kept", "--json")) as { labels: Record<string, string> }[];
      expect(log[0]!.labels.sandbox).toBe("with-vol");
      expect(existsSync(join(home, "staging", "main", "kept"))).toBe(true);

      const stopped = await adopted.stop();
      expect(stopped.sandbox).toMatchObject({ id: "adopt-me", state: "stopped", exit: { reason: "stopped" } });
      expect((await e.cli("sandbox", "exec", "adopt-me", "--", "true")).code).toBe(1);
      expect((await second.get("with-vol").then((s) => s.stop())).sandbox.state).toBe("stopped");

      // Nothing is left of the dead and stopped sandboxes: mount points, bundles, runsc state, records.
      expect(readdirSync(join(home, "agent", "mounts"))).toEqual([]);
      for (let i = 0; i < 100 && readdirSync(join(home, "agent", "bundles")).length; i++) await sleep(100);
      expect(readdirSync(join(home, "agent", "bundles"))).toEqual([]);
      const list = await runCommand(["runsc", `--root=${runscRoot}`, "list", "-quiet"]);
      expect(list.stdout.toString().trim()).toBe("");
      const mounts = await readFile("/proc/self/mounts", "utf8");
      expect(mounts).not.toContain(join(home, "agent", "mounts"));
    } finally {
      await second.close();
    }
  });
});

describe("an agent killed between forking a sandbox's volumes and starting it", () => {
  let e: Env;
  let home: string;

  beforeAll(async () => {
    await testImage();
    e = await makeEnv();
    home = e.home;
    await writeFile(join(e.base, "in.txt"), "source\n");
    await e.ok("volume", "create", "src");
    await e.ok("put", "src", join(e.base, "in.txt"), "/in.txt");
    await e.ok("volume", "create", "bystander");
  }, 600_000);

  afterAll(async () => {
    await e?.cleanup();
  });

  it("the next agent deletes the forks nothing was written to, keeps and reports one with a new version, leaves other volumes alone", async () => {
    const killer = join(e.base, "runsc-kills-its-caller");
    await writeFile(killer, "#!/bin/sh\nkill -9 $PPID\nsleep 5\nexit 1\n", { mode: 0o755 });
    const first = new SandboxClient({ env: { ...e.env, STRATA_RUNSC: killer } });
    const forks = ["fork-a", "fork-b", "fork-c"].map((name, i) => ({ name, path: `/w${i}`, forkFrom: "src" }));
    await expect(first.create({ name: "half-made", volumes: forks })).rejects.toThrow();
    await first.close();
    const agentPid = Number((await readFile(join(home, "agent.pid"), "utf8")).trim());
    for (let i = 0; i < 100 && processAlive(agentPid); i++) await sleep(50);
    expect(processAlive(agentPid)).toBe(false);
    const names = async () => (JSON.parse(await e.ok("volume", "ls", "--json")) as { name: string }[]).map((v) => v.name).sort();
    expect(await names()).toEqual(["bystander", "fork-a", "fork-b", "fork-c", "src"]);

    // While no agent runs, someone commits a version to fork-b.
    await writeFile(join(e.base, "new.txt"), "kept\n");
    await e.ok("put", "fork-b", join(e.base, "new.txt"), "/new.txt");

    const second = new SandboxClient({ env: e.env });
    try {
      expect((await second.list()).find((s) => s.id === "half-made")?.state).toBe("stopped");
      expect(await names()).toEqual(["bystander", "fork-b", "src"]);
      expect(await e.ok("cat", "fork-b", "/new.txt")).toBe("kept\n");
      expect(await e.ok("cat", "fork-b", "/in.txt")).toBe("source\n");
      expect(await e.ok("cat", "src", "/in.txt")).toBe("source\n");
      const log = await readFile(join(home, "logs", "agent.log"), "utf8");
      expect(log).toMatch(/^strata: agent deleted 2 unused fork\(s\) of interrupted creates \[fork-a fork-c\]$/m);
      expect(log).toMatch(/^strata: agent kept fork fork-b of interrupted sandbox half-made: it has versions beyond the fork point$/m);
      expect(readdirSync(join(home, "agent", "mounts"))).toEqual([]);
      expect(await readFile("/proc/self/mounts", "utf8")).not.toContain(join(home, "agent", "mounts"));
      // The names are free again: a run can fork into them.
      const again = await second.create({ volumes: [{ name: "fork-a", path: "/w", forkFrom: "src" }] });
      expect((await again.exec("cat", "/w/in.txt")).stdoutText).toBe("source\n");
      await again.stop();
    } finally {
      await second.close();
    }
  });
});
