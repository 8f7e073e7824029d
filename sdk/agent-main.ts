/**
 * `strata agent`: the node agent's start-up file. It constructs, explicitly and only here, the
 * store connection (`Strata.connect`), the `GvisorRuntime`, the `ImageBuilder` and the
 * `AgentService`, and serves it over gRPC until SIGINT or SIGTERM (then every sandbox is stopped
 * and its volumes synced).
 *
 * Files under STRATA_HOME: `agent.sock` (the gRPC socket), `agent.pid` (created exclusively: one
 * agent per home), `agent/` (runsc state and volume mount points), `staging/` (staged writes of
 * mounted volumes), `images/` (the image cache; STRATA_IMAGE_CACHE overrides it),
 * `logs/agent.log` (the log of a daemonized agent). STRATA_RUNSC names the runsc binary (default
 * `runsc` on PATH).
 */
import { processAlive, terminateProcess } from "./process.js";
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { AgentError, AgentService, GrpcAgentClient, GvisorRuntime, ImageBuilder, NvidiaGpuInventory, serveAgent } from "../agent/index.js";
import { StrataError } from "../metadata/index.js";
import { loadConfig, type StrataConfig } from "./config.js";

/** Where a command writes (the CLI's `CliIO`). */
interface AgentIO {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  env: NodeJS.ProcessEnv;
}

/** The agent's socket for a configuration: `$STRATA_HOME/agent.sock`, or STRATA_AGENT_SOCKET. */
export function agentSocketPath(config: StrataConfig, env: NodeJS.ProcessEnv = process.env): string {
  return env.STRATA_AGENT_SOCKET ?? join(config.home, "agent.sock");
}

/** The agent's image cache: STRATA_IMAGE_CACHE, default `$STRATA_HOME/images`. */
export function agentImageCache(config: StrataConfig, env: NodeJS.ProcessEnv = process.env): string {
  return env.STRATA_IMAGE_CACHE ?? join(config.home, "images");
}

/**
 * The argv (after node) and cwd that run `strata agent` from the same code as this module: the
 * TypeScript sources through tsx, or the compiled build.
 */
function agentCommand(): { args: string[]; cwd: string } {
  const self = fileURLToPath(import.meta.url);
  const ts = self.endsWith(".ts");
  const main = join(dirname(self), ts ? "main.ts" : "main.js");
  const root = resolve(dirname(self), ts ? ".." : "../..");
  if (!existsSync(main)) throw new StrataError("IO", `start agent: ${main} not found`);
  return { args: ts ? ["--import", "tsx", main, "agent"] : [main, "agent"], cwd: root };
}


const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * A client of the local agent (the one serving `agentSocketPath`). When none answers and `start`
 * is true (the default), starts one detached (`strata agent --daemon`'s child, logging to
 * `$STRATA_HOME/logs/agent.log`) and waits up to 60 s for it; fails AGENT_UNAVAILABLE.
 */
export async function connectLocalAgent(env: NodeJS.ProcessEnv = process.env, opts: { start?: boolean } = {}): Promise<GrpcAgentClient> {
  const config = loadConfig(env);
  const socket = agentSocketPath(config, env);
  if (existsSync(socket)) {
    try {
      return await GrpcAgentClient.connect(socket, { connectTimeoutMs: 1000 });
    } catch (err) {
      if (opts.start === false) throw err;
    }
  } else if (opts.start === false) {
    throw AgentError.AGENT_UNAVAILABLE(socket, new Error("no agent socket"));
  }
  const child = await spawnDaemon(config, env);
  let exited: number | null | undefined;
  child.on("exit", (code) => (exited = code));
  for (const started = Date.now(); Date.now() - started < 60_000; ) {
    if (existsSync(socket)) {
      try {
        return await GrpcAgentClient.connect(socket, { connectTimeoutMs: 1000 });
      } catch {
        // not serving yet
      }
    }
    if (exited !== undefined && exited !== 0 && !(await otherAgentAlive(config))) break;
    await sleep(50);
  }
  const log = join(config.home, "logs", "agent.log");
  const tail = (await readFile(log, "utf8").catch(() => "")).trim().split("\n").slice(-3).join("; ");
  throw AgentError.AGENT_UNAVAILABLE(socket, new Error(tail ? `the agent did not start: ${tail}` : "the agent did not start within 60 s"));
}

/**
 * Stops the local agent of a STRATA_HOME, if one runs: SIGTERM (it syncs and unmounts what it
 * holds), then SIGKILL after `graceMs`. Resolves once it is gone.
 */
export async function stopLocalAgent(home: string, graceMs = 30_000): Promise<void> {
  const pid = Number((await readFile(join(home, "agent.pid"), "utf8").catch(() => "")).trim());
  await terminateProcess(pid, graceMs);
}

async function otherAgentAlive(config: StrataConfig): Promise<boolean> {
  const pid = Number((await readFile(join(config.home, "agent.pid"), "utf8").catch(() => "")).trim());
  return pid > 0 && processAlive(pid);
}

async function spawnDaemon(config: StrataConfig, env: NodeJS.ProcessEnv) {
  await mkdir(join(config.home, "logs"), { recursive: true });
  const log = openSync(join(config.home, "logs", "agent.log"), "a");
  const cmd = agentCommand();
  const child = spawn(process.execPath, cmd.args, { detached: true, stdio: ["ignore", log, log], cwd: cmd.cwd, env: { UV_THREADPOOL_SIZE: "16", ...env } });
  closeSync(log);
  child.unref();
  return child;
}

/** Takes `$STRATA_HOME/agent.pid` exclusively; fails ALREADY_EXISTS when a live agent holds it. */
async function takePidFile(path: string): Promise<void> {
  for (let i = 0; i < 2; i++) {
    try {
      await writeFile(path, `${process.pid}\n`, { flag: "wx" });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const pid = Number((await readFile(path, "utf8").catch(() => "")).trim());
      if (pid > 0 && processAlive(pid)) {
        throw new AgentError("ALREADY_EXISTS", `start agent: one already runs with pid ${pid}`, { op: "start agent", hint: `stop it with \`kill ${pid}\`` });
      }
      await rm(path, { force: true });
    }
  }
  throw new AgentError("ALREADY_EXISTS", `start agent: ${path} is held`, { op: "start agent" });
}

/**
 * Runs the agent in this process until SIGINT or SIGTERM; with `daemon`, starts it detached
 * instead and prints its pid once it answers. The node's GPUs are detected with nvidia-smi and
 * /dev/nvidia* (none found: GPU requests fail NO_GPU). Before serving, it takes over what a
 * killed agent of the same home left (`AgentService.recover`): running sandboxes without
 * volumes are adopted, the others stopped and their volumes' staged writes synced.
 */
export async function runAgent(io: AgentIO, opts: { daemon?: boolean } = {}): Promise<number> {
  const config = loadConfig(io.env);
  if (opts.daemon) {
    const c = await connectLocalAgent(io.env);
    const { pid } = await c.ping();
    await c.close();
    io.stdout.write(`${pid}\n`);
    return 0;
  }
  await mkdir(config.home, { recursive: true });
  const pidFile = join(config.home, "agent.pid");
  await takePidFile(pidFile);
  const { Strata } = await import("./client.js"); // the storage layer: only the agent needs it, not the CLI that starts it
  const strata = Strata.connect(config, { labels: { tool: "agent" } });
  const stateDir = join(config.home, "agent");
  const runtime = new GvisorRuntime({ stateDir, ...(io.env.STRATA_RUNSC ? { runsc: io.env.STRATA_RUNSC } : {}) });
  const images = new ImageBuilder({ cacheDir: agentImageCache(config, io.env) });
  const agent = new AgentService({
    runtime, images, repo: strata.repo, stateDir, stagingRoot: join(config.home, "staging"), gpus: new NvidiaGpuInventory(),
  });
  const socket = agentSocketPath(config, io.env);
  let server;
  try {
    const found = await agent.recover();
    if (found.adopted.length || found.cleaned.length) {
      io.stderr.write(`strata: agent adopted ${found.adopted.length} sandbox(es) [${found.adopted.join(" ")}], cleaned up ${found.cleaned.length} [${found.cleaned.join(" ")}]\n`);
    }
    for (const f of found.failed) io.stderr.write(`strata: agent could not clean up sandbox ${f.id} (kept for the next start): ${f.error}\n`);
    if (found.forksDeleted.length) io.stderr.write(`strata: agent deleted ${found.forksDeleted.length} unused fork(s) of interrupted creates [${found.forksDeleted.join(" ")}]\n`);
    for (const f of found.forksKept) io.stderr.write(`strata: agent kept fork ${f.volume} of interrupted sandbox ${f.sandbox}: ${f.reason}\n`);
    server = await serveAgent(agent, socket);
  } catch (err) {
    await agent.close();
    await strata.close();
    await rm(pidFile, { force: true });
    throw err;
  }
  process.on("unhandledRejection", (err) => io.stderr.write(`strata agent: unhandled: ${(err as Error)?.stack ?? String(err)}\n`));
  io.stderr.write(`strata: agent ${process.pid} serving ${server.address}\n`);
  const sig = await new Promise<NodeJS.Signals>((res) => {
    process.once("SIGINT", res);
    process.once("SIGTERM", res);
  });
  io.stderr.write(`strata: agent got ${sig}; stopping sandboxes\n`);
  await server.close();
  await agent.close();
  await strata.close();
  await rm(pidFile, { force: true });
  // fuse-native may keep handles on the event loop after the last unmount.
  setTimeout(() => process.exit(0), 200).unref();
  return 0;
}
