/**
 * Sandboxes: what the node agent adds on top of runsc, measured in one run.
 * - cold start to first output (image cached, one volume mounted), median of 20:
 *   bare `runsc run` of an equivalent bundle (same rootfs, overlay, cgroup limits, a bind-mounted
 *   host directory at /data) vs the SDK (`Container.run()` + exec, agent already running, volume
 *   mounted through FUSE) vs `strata run -v vol:/data -- echo` as a new CLI process: `bin/strata`
 *   running the build (the bundle in dist/cli/, built here first, as `scripts/setup.sh` builds it
 *   for a user), split by the CLI's STRATA_TIMING milestones into Node start-up, loading the CLI,
 *   connecting to the agent, creating the sandbox and exec to first output;
 * - parallel agents: fork one volume 8 times, start 8 sandboxes each on its own fork, each
 *   writes 100 files, stop all (sync): total wall time and per-sandbox p50/p99 (run → stop done).
 * Needs root, runsc and the test image cache (built on first use, about 60 s).
 */
import { execFile, spawn } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { bundleConfig, sandboxSpecFor } from "../agent/index.js";
import { TEST_IMAGE_CACHE, testImage } from "../agent/testing.js";
import { Container, SandboxClient, stopLocalAgent } from "../sdk/index.js";
import { median, report } from "./report.js";

const ROOT = resolve(fileURLToPath(new URL("..", import.meta.url)));
const RUNS = 20;
const PARALLEL = 8;
const FILES = 100;

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

/** Spawns argv; resolves ms until the first stdout byte, after the process exited with 0. */
async function firstOutput(argv: string[], env: NodeJS.ProcessEnv, cwd = ROOT): Promise<number> {
  return (await timed(argv, env, cwd)).ms;
}

/** Like firstOutput, and also the `strata: timing LABEL MS` lines (STRATA_TIMING) of its stderr. */
function timed(argv: string[], env: NodeJS.ProcessEnv, cwd = ROOT): Promise<{ ms: number; marks: Record<string, number> }> {
  return new Promise((res, rej) => {
    const t0 = performance.now();
    let first: number | undefined;
    let err = "";
    const child = spawn(argv[0]!, argv.slice(1), { env, cwd, stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.on("data", () => (first ??= performance.now() - t0));
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    child.on("error", rej);
    child.on("close", (code) => {
      if (code !== 0 || first === undefined) return rej(new Error(`${argv.slice(0, 4).join(" ")} exited ${code}: ${err.slice(-500)}`));
      const marks: Record<string, number> = {};
      for (const m of err.matchAll(/^strata: timing (\S+) ([\d.]+)$/gm)) marks[m[1]!] = Number(m[2]);
      res({ ms: first, marks });
    });
  });
}

/**
 * Builds dist/ as `scripts/setup.sh` does (`npm run build`), so that the CLI rows measure what a
 * user runs (`bin/strata`, which runs dist/cli/main.js); fails with the build's output when it fails.
 */
async function build(): Promise<string> {
  try {
    await promisify(execFile)("npm", ["run", "--silent", "build"], { cwd: ROOT, maxBuffer: 16 << 20 });
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string };
    throw new Error(`bench sandbox: \`npm run build\` failed; the CLI rows measure the compiled build (dist/):\n${`${e.stdout ?? ""}${e.stderr ?? ""}`.trim().slice(-2000)}`);
  }
  return join(ROOT, "bin/strata");
}

/** Runs the benchmark; prints and records its table. */
export async function run(): Promise<void> {
  const image = await testImage();
  const base = await mkdtemp(join(tmpdir(), "strata-bench-sandbox-"));
  const env: NodeJS.ProcessEnv = { ...process.env, STRATA_HOME: join(base, "home"), STRATA_IMAGE_CACHE: TEST_IMAGE_CACHE, AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true" };
  delete env.STRATA_STORE;
  const main = await build();
  const strata = (...args: string[]) => [process.execPath, main, ...args];
  const emptyScript = join(base, "empty.mjs");
  await writeFile(emptyScript, "process.stdout.write(\"x\");\n");
  const client = new SandboxClient({ env });
  try {
    await firstOutput(strata("volume", "create", "bench"), env).catch(() => 0);
    const seed = join(base, "seed.txt");
    await writeFile(seed, "seed\n");
    await firstOutput([...strata("put", "bench", seed, "/seed.txt")], env);

    // bare runsc: an equivalent bundle, create+start+run in one `runsc run`
    const hostDir = join(base, "hostdir");
    await mkdir(hostDir);
    const runscRoot = join(base, "runsc");
    await mkdir(runscRoot);
    const bare: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const id = `bench-bare-${process.pid}-${i}`;
      const bundle = join(base, "bundles", id);
      await mkdir(bundle, { recursive: true });
      const spec = sandboxSpecFor(image, { cpu: 1, memoryBytes: 512 << 20, mounts: [{ source: hostDir, destination: "/data" }] });
      const config = bundleConfig(spec, { cgroupsPath: `/strata/${id}`, uid: 0, gid: 0, init: ["sh", "-c", "echo hi"] });
      await writeFile(join(bundle, "config.json"), JSON.stringify(config));
      bare.push(await firstOutput(["runsc", `--root=${runscRoot}`, "--overlay2=root:memory", "--network=none", "run", "--bundle", bundle, id], env));
      await rm(bundle, { recursive: true, force: true });
    }

    // start the agent (not timed), then the SDK path
    await (await new Container({ client }).run()).stop();
    const sdk: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      const t0 = performance.now();
      const c = await new Container({ client, cpu: 1, memory: "512Mi" }).mountVolume("bench", "/data").run();
      const p = await c.spawn(["sh", "-c", "echo hi"]);
      await new Promise<void>((r) => p.stdout.once("data", () => r()));
      sdk.push(performance.now() - t0);
      p.stdout.resume();
      await p.wait();
      await c.stop({ sync: false });
    }

    // the CLI, a new process per run, interleaved with an empty Node script (same load on the machine)
    const cli: number[] = [];
    const node: number[] = [];
    const phases = { load: [] as number[], connect: [] as number[], create: [] as number[], exec: [] as number[] };
    for (let i = 0; i < RUNS; i++) {
      node.push(await firstOutput([process.execPath, emptyScript], env));
      const r = await timed(strata("run", "--cpu", "1", "--memory", "512Mi", "-v", "bench:/data", "--no-sync", "--", "sh", "-c", "echo hi"), { ...env, STRATA_TIMING: "1" });
      const m = r.marks as { loaded: number; connected: number; created: number; "first-output": number };
      cli.push(r.ms);
      phases.load.push(m.loaded);
      phases.connect.push(m.connected - m.loaded);
      phases.create.push(m.created - m.connected);
      phases.exec.push(m["first-output"] - m.created);
    }

    // parallel agents
    const forks = Array.from({ length: PARALLEL }, (_, i) => `bench-fork-${i}`);
    const t0 = performance.now();
    const per = await Promise.all(forks.map(async (name) => {
      const s0 = performance.now();
      const c = await new Container({ client, cpu: 1, memory: "512Mi" }).forkVolume("bench", name, "/data").run();
      const r = await c.exec("sh", "-c", `i=0; while [ $i -lt ${FILES} ]; do echo $i > /data/f$i.txt; i=$((i+1)); done; ls /data | wc -l`);
      if (r.exitCode !== 0 || r.stdoutText.trim() !== String(FILES + 1)) throw new Error(`bench: writes failed: ${r.stdoutText} ${r.stderrText}`);
      const s = await c.stop();
      if (!s.volumes[0]?.changed) throw new Error("bench: stop made no version");
      return performance.now() - s0;
    }));
    const wall = performance.now() - t0;

    const bareMs = median(bare);
    await report("sandbox", [
      { scenario: "cold start: bare runsc run (bundle, bind mount)", "median ms": median(bare), "p90 ms": pct(bare, 90), "× bare": 1 },
      { scenario: "cold start: SDK Container.run + exec, volume via FUSE", "median ms": median(sdk), "p90 ms": pct(sdk, 90), "× bare": median(sdk) / bareMs },
      { scenario: "cold start: strata run -v (new CLI process, bin/strata, built)", "median ms": median(cli), "p90 ms": pct(cli, 90), "× bare": median(cli) / bareMs },
      { scenario: "  Node start-up (an empty script, to first output)", "median ms": median(node), "p90 ms": pct(node, 90), "× bare": median(node) / bareMs },
      { scenario: "  CLI: process start to the run command loaded", "median ms": median(phases.load), "p90 ms": pct(phases.load, 90), "× bare": median(phases.load) / bareMs },
      { scenario: "  CLI: connect to the agent (gRPC, proto)", "median ms": median(phases.connect), "p90 ms": pct(phases.connect, 90), "× bare": median(phases.connect) / bareMs },
      { scenario: "  agent: create the sandbox (FUSE mount, runsc run)", "median ms": median(phases.create), "p90 ms": pct(phases.create, 90), "× bare": median(phases.create) / bareMs },
      { scenario: "  agent: exec to first output", "median ms": median(phases.exec), "p90 ms": pct(phases.exec, 90), "× bare": median(phases.exec) / bareMs },
      { scenario: `parallel: ${PARALLEL} forks × ${FILES} files, run→stop(sync) wall`, "median ms": wall, "p90 ms": "", "× bare": "" },
      { scenario: "parallel: per sandbox p50", "median ms": pct(per, 50), "p90 ms": "", "× bare": "" },
      { scenario: "parallel: per sandbox p99", "median ms": pct(per, 99), "p90 ms": "", "× bare": "" },
    ], `Time to the first byte of output with the image cached, median of ${RUNS}, on the embedded file store; bare runsc and Strata in the same run. The SDK row is the agent's own overhead (FUSE mount of a volume, gRPC, runsc run --detach then exec, vs one runsc run); the CLI row is \`bin/strata run\` on the build (the bundle in dist/cli/, built by the benchmark) as a new process; the indented rows split it by the CLI's STRATA_TIMING milestones (medians of per-run phases; "process start to loaded" includes Node's own start-up, shown alone on the row above it). Parallel: ${PARALLEL} sandboxes, each on its own fork of one volume, each writes ${FILES} files, then stop syncs each fork.`, { bare, sdk, cli, node, phases, parallel: { wall, per } });
  } finally {
    await client.close();
    await stopLocalAgent(join(base, "home"));
    await rm(base, { recursive: true, force: true });
  }
}
