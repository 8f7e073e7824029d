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
 * `runsc` on PATH). The client side (finding, reaching and starting the agent) is local-agent.ts;
 * only `strata agent` loads this module.
 */
import { mkdir, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { AgentError, AgentService, GvisorRuntime, ImageBuilder, NvidiaGpuInventory, serveAgent } from "../agent/index.js";
import { loadConfig, type StrataConfig } from "./config.js";
import { agentSocketPath, connectLocalAgent, readAgentPid } from "./local-agent.js";
import { processAlive } from "./process.js";

/** Where a command writes (the CLI's `CliIO`). */
interface AgentIO {
  stdout: NodeJS.WritableStream;
  stderr: NodeJS.WritableStream;
  env: NodeJS.ProcessEnv;
}

/** The agent's image cache: STRATA_IMAGE_CACHE, default `$STRATA_HOME/images`. */
export function agentImageCache(config: StrataConfig, env: NodeJS.ProcessEnv = process.env): string {
  return env.STRATA_IMAGE_CACHE ?? join(config.home, "images");
}

/** Takes `$STRATA_HOME/agent.pid` exclusively; fails ALREADY_EXISTS when a live agent holds it. */
async function takePidFile(path: string): Promise<void> {
  for (let i = 0; i < 2; i++) {
    try {
      await writeFile(path, `${process.pid}\n`, { flag: "wx" });
      return;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const pid = await readAgentPid(path);
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
    runtime, images, repo: strata.repo, stateDir, stagingRoot: strata.stagingRoot, copies: strata.copies, gpus: new NvidiaGpuInventory(),
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
