/**
 * The client side of the local node agent: where it listens, how to reach it, and starting it
 * (detached, `strata agent` from the same build as this module) when none answers. The SDK's
 * sandbox classes and the CLI's sandbox commands use this; the agent itself (agent-main.ts, with
 * the runtime, the store and FUSE) is loaded only by `strata agent`.
 */
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync } from "node:fs";
import { mkdir, readFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { AgentError, GrpcAgentClient } from "../agent/index.js";
import { StrataError } from "../metadata/index.js";
import { loadConfig, type StrataConfig } from "./config.js";
import { processAlive, terminateProcess } from "./process.js";

/** The agent's socket for a configuration: `$STRATA_HOME/agent.sock`, or STRATA_AGENT_SOCKET. */
export function agentSocketPath(config: StrataConfig, env: NodeJS.ProcessEnv = process.env): string {
  return env.STRATA_AGENT_SOCKET ?? join(config.home, "agent.sock");
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
  await terminateProcess(await readAgentPid(join(home, "agent.pid")), graceMs);
}

/** The pid a pid file names; 0 when it is missing or empty. */
export async function readAgentPid(path: string): Promise<number> {
  return Number((await readFile(path, "utf8").catch(() => "")).trim()) || 0;
}

async function otherAgentAlive(config: StrataConfig): Promise<boolean> {
  const pid = await readAgentPid(join(config.home, "agent.pid"));
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
