/**
 * One sandbox test environment: a temp STRATA_HOME on the embedded file store (or `extra`'s
 * store), the CLI run as separate processes from the sources, a `SandboxClient` in this process,
 * and the agent they start on demand; `cleanup()` stops that agent (SIGTERM) and removes it all.
 */
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { TEST_IMAGE_CACHE } from "../../agent/testing.js";
import { SandboxClient, stopLocalAgent } from "../../sdk/index.js";

const ROOT = resolve(__dirname, "../..");

/** A finished CLI run. */
export interface Result {
  code: number;
  stdout: Buffer;
  stderr: string;
}

/** A sandbox test environment. */
export interface Env {
  /** The temp dir everything lives under (`home/` is STRATA_HOME). */
  base: string;
  /** STRATA_HOME: `base/home`. */
  home: string;
  env: NodeJS.ProcessEnv;
  /** Runs `strata ARGS…` to completion. */
  cli(...args: string[]): Promise<Result>;
  /** Runs `strata ARGS…` and returns stdout; throws on a non-zero exit. */
  ok(...args: string[]): Promise<string>;
  client: SandboxClient;
  cleanup(): Promise<void>;
}

/** Builds an environment; `extra` overrides variables (e.g. STRATA_STORE for S3). */
export async function makeEnv(extra: NodeJS.ProcessEnv = {}): Promise<Env> {
  const base = await mkdtemp(join(tmpdir(), "strata-sandbox-"));
  const home = join(base, "home");
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    STRATA_HOME: home,
    STRATA_IMAGE_CACHE: TEST_IMAGE_CACHE,
    AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED: "true",
  };
  delete env.STRATA_STORE;
  delete env.STRATA_AGENT_SOCKET;
  Object.assign(env, extra);
  const cli = (...args: string[]) =>
    new Promise<Result>((res) => {
      execFile(process.execPath, ["--import", "tsx", join(ROOT, "sdk/main.ts"), ...args], { env, cwd: ROOT, encoding: "buffer", maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
        const code = err ? ((err as { code?: number }).code ?? 1) : 0;
        res({ code: typeof code === "number" ? code : 1, stdout, stderr: stderr.toString("utf8") });
      });
    });
  const ok = async (...args: string[]) => {
    const r = await cli(...args);
    if (r.code !== 0) throw new Error(`strata ${args.join(" ")} exited ${r.code}: ${r.stderr}`);
    return r.stdout.toString("utf8");
  };
  const client = new SandboxClient({ env });
  return {
    base, home, env, cli, ok, client,
    async cleanup() {
      await client.close();
      await stopLocalAgent(home);
      await rm(base, { recursive: true, force: true });
    },
  };
}

