/**
 * Sandboxes: what the node agent adds on top of runsc, measured in one run.
 * - cold start to first output (image cached, one volume mounted), median of 20:
 *   bare `runsc run` of an equivalent bundle (same rootfs, overlay, cgroup limits, a bind-mounted
 *   host directory at /data) vs the SDK (`Container.run()` + exec, agent already running, volume
 *   mounted through FUSE) vs `strata run -v vol:/data -- echo` as a new CLI process (sources
 *   through tsx, as in a development checkout: Node start-up and transpiling count);
 * - parallel agents: fork one volume 8 times, start 8 sandboxes each on its own fork, each
 *   writes 100 files, stop all (sync): total wall time and per-sandbox p50/p99 (run → stop done).
 * Needs root, runsc and the test image cache (built on first use, about 60 s).
 */
import { spawn } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { bundleConfig, sandboxSpecFor } from "../agent/index.js";
import { TEST_IMAGE_CACHE, testImage } from "../agent/testing.js";
import { Container, SandboxClient, stopLocalAgent } from "../sdk/index.js";
import { report } from "./report.js";

const ROOT = resolve(fileURLToPath(new URL("..", import.meta.url)));
const RUNS = 20;
const PARALLEL = 8;
const FILES = 100;

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

/** Spawns argv; resolves ms until the first stdout byte, after the process exited with 0. */
function firstOutput(argv: string[], env: NodeJS.ProcessEnv, cwd = ROOT): Promise<number> {
  return new Promise((res, rej) => {
    const t0 = performance.now();
    let first: number | undefined;
    let err = "";
    const child = spawn(argv[0]!, argv.slice(1), { env, cwd, stdio: ["ignore", "pipe", "pipe"] });
    child.stdout.on("data", () => (first ??= performance.now() - t0));
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    child.on("error", rej);
    child.on("close", (code) => (code === 0 && first !== undefined ? res(first) : rej(new Error(`${argv.slice(0, 4).join(" ")} exited ${code}: ${err.slice(-500)}`))));
  });
}

/** Runs the benchmark; prints and records its table. */
export async function run(): Promise<void> {
  const image = await testImage();
  const base = await mkdtemp(join(tmpdir(), "strata-bench-sandbox-"));
  const env: NodeJS.ProcessEnv = { ...process.env, STRATA_HOME: join(base, "home"), STRATA_IMAGE_CACHE: TEST_IMAGE_CACHE, AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true" };
  delete env.STRATA_STORE;
  const strata = (...args: string[]) => [process.execPath, "--import", "tsx", join(ROOT, "sdk/main.ts"), ...args];
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

    const cli: number[] = [];
    for (let i = 0; i < RUNS; i++) {
      cli.push(await firstOutput(strata("run", "--cpu", "1", "--memory", "512Mi", "-v", "bench:/data", "--no-sync", "--", "sh", "-c", "echo hi"), env));
    }
    const node: number[] = [];
    for (let i = 0; i < 5; i++) node.push(await firstOutput(strata("--help"), env));

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
      { scenario: "cold start: strata run -v (new CLI process)", "median ms": median(cli), "p90 ms": pct(cli, 90), "× bare": median(cli) / bareMs },
      { scenario: "  of which CLI start-up (strata --help)", "median ms": median(node), "p90 ms": pct(node, 90), "× bare": median(node) / bareMs },
      { scenario: `parallel: ${PARALLEL} forks × ${FILES} files, run→stop(sync) wall`, "median ms": wall, "p90 ms": "", "× bare": "" },
      { scenario: "parallel: per sandbox p50", "median ms": pct(per, 50), "p90 ms": "", "× bare": "" },
      { scenario: "parallel: per sandbox p99", "median ms": pct(per, 99), "p90 ms": "", "× bare": "" },
    ], `Time to the first byte of output with the image cached, median of ${RUNS}, on the embedded file store; bare runsc and Strata in the same run. The SDK row is the agent's own overhead (FUSE mount of a volume, gRPC, runsc create/start/exec vs one runsc run); the CLI row adds a Node process started through tsx. Parallel: ${PARALLEL} sandboxes, each on its own fork of one volume, each writes ${FILES} files, then stop syncs each fork.`, { bare, sdk, cli, node, parallel: { wall, per } });
  } finally {
    await client.close();
    await stopLocalAgent(join(base, "home"));
    await rm(base, { recursive: true, force: true });
  }
}
