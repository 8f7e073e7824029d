/**
 * Sandboxes from the SDK: `Container` (the fluent, high-level handle) and `SandboxClient` with
 * its `Sandbox` handles (the lower level). Both talk to the local node agent through an
 * `AgentClient`; when no agent answers on `$STRATA_HOME/agent.sock`, one is started detached
 * (`strata agent`, log in `$STRATA_HOME/logs/agent.log`) and stays running for later calls.
 *
 * ```ts
 * const c = await new Container({ image: Image.debianSlim(), cpu: 1, memory: "1Gi" })
 *   .mountVolume("data", "/data")
 *   .forkVolume("training", "attempt-1", "/work")
 *   .run();
 * const r = await c.exec("sh", "-c", "ls /data > /work/listing");
 * await c.stop();   // /work's writes become a version of attempt-1, /data's of data
 * ```
 */
import type { Readable, Writable } from "node:stream";
import type { AgentClient, BuildImageResult, GpuRequest, NetworkSpec, SandboxRecord, StopSandboxResult, VolumeMountRequest, VolumeSyncResult } from "../agent/index.js";
import { AgentError, parseEgressEntry } from "../agent/index.js";
import { StrataError } from "../metadata/index.js";
import { connectLocalAgent } from "./local-agent.js";
import { parseSize } from "./config.js";
import { Image } from "./image.js";

/** What a finished `exec` returns; stdout and stderr are byte-exact. */
export interface ExecOutput {
  exitCode: number;
  stdout: Buffer;
  stderr: Buffer;
  /** stdout decoded as UTF-8. */
  stdoutText: string;
  /** stderr decoded as UTF-8. */
  stderrText: string;
  /** True when the sandbox was killed for exceeding its memory limit (exitCode is then 137 or the like). */
  oom: boolean;
  /** The signal sent with `kill()` when the process died of it. */
  signal?: NodeJS.Signals;
}

/** How a process ended (`ContainerProcess.wait()`). */
export interface ProcessExit {
  exitCode: number;
  oom: boolean;
  signal?: NodeJS.Signals;
}

/** A process running in a sandbox. */
export interface ContainerProcess {
  /** Its stdout, streamed. */
  stdout: Readable;
  /** Its stderr, streamed. */
  stderr: Readable;
  /** Its stdin when spawned with `stdin: true` (end it to close the process's stdin), else null. */
  stdin: Writable | null;
  /** Sends a signal (default SIGTERM); no-op once it ended. */
  kill(signal?: NodeJS.Signals): void;
  /** Resolves once it ended and its output was read; rejects only when the agent is lost. */
  wait(): Promise<ProcessExit>;
}

/** Options of `spawn`. */
export interface SpawnOptions {
  /** Give the process a stdin pipe. Default false (empty stdin). */
  stdin?: boolean;
  /** Extra environment. */
  env?: Record<string, string>;
  /** Working directory. */
  cwd?: string;
  /** "uid[:gid]". */
  user?: string;
}

/** Resource and identity options shared by `Container` and `SandboxClient.create`. */
export interface SandboxOptions {
  /** Default `Image.debianSlim()`. */
  image?: Image;
  /** The sandbox id (a-z, 0-9, `_.-`, up to 63); default generated. */
  name?: string;
  /** CPU cores, e.g. 2, "0.5". Default unlimited. */
  cpu?: number | string;
  /** Memory limit: bytes, or a size like "4Gi", "512M". Default unlimited. */
  memory?: number | string;
  /** GPUs: "TYPE", "TYPE:N" or `{type, count}`; fails NO_GPU when the node has none. */
  gpu?: string | GpuRequest;
  /** Lifetime: milliseconds, or "90s", "30m", "1h". Default none. */
  lifetime?: number | string;
  /** Environment of every process. */
  env?: Record<string, string>;
  /** Working directory of processes; default the image's. */
  workdir?: string;
  /** The provenance label "run" of versions its volumes sync; default the sandbox id. */
  runId?: string;
  /**
   * The sandbox's network. Default "none": loopback only. `{ egress: [...] }`: outbound traffic
   * only to these destinations ("10.0.0.1", "10.0.0.0/8", "example.internal", each optionally
   * ":PORT"; host names resolved at start), everything else (the host included) dropped.
   */
  network?: "none" | { egress: string[] };
}

/** Options of `SandboxClient.create`. */
export interface SandboxCreateOptions extends SandboxOptions {
  /** Volumes to mount. */
  volumes?: VolumeMountRequest[];
}

/** Parses a duration ("500ms", "90s", "30m", "1h", "1d" or plain ms) into milliseconds. */
export function parseDuration(v: number | string, what = "duration"): number {
  if (typeof v === "number") return v;
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(v);
  if (!m) throw new StrataError("INVALID_ARGUMENT", `parse ${what} ${JSON.stringify(v)}: not a duration`, { hint: "use e.g. 90s, 30m, 1h" });
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[(m[2] ?? "ms") as "ms"];
  return Math.round(Number(m[1]) * mult);
}

/**
 * The agent's network spec for a `SandboxOptions.network`: undefined or "none" → `{ mode: "none" }`,
 * `{ egress: [...] }` → `{ mode: "egress", allow }`. Each entry's syntax is checked here (nothing
 * is resolved): a bad entry fails INVALID_SPEC, as the agent would; anything else INVALID_ARGUMENT.
 */
export function parseNetwork(v: SandboxOptions["network"]): NetworkSpec {
  if (v === undefined || v === "none") return { mode: "none" };
  if (typeof v === "object" && v !== null && Array.isArray(v.egress) && v.egress.every((a) => typeof a === "string")) {
    for (const a of v.egress) parseEgressEntry(a);
    return { mode: "egress", allow: [...v.egress] };
  }
  throw new StrataError("INVALID_ARGUMENT", `parse network ${JSON.stringify(v)}: want "none" or { egress: [...] }`, { hint: 'e.g. network: { egress: ["10.0.0.1:8080"] }' });
}

/** Parses "TYPE" or "TYPE:N" into a GPU request. */
export function parseGpu(v: string | GpuRequest): GpuRequest {
  if (typeof v !== "string") return { type: v.type, count: v.count ?? 1 };
  const m = /^([A-Za-z0-9_.-]+)(?::(\d+))?$/.exec(v);
  if (!m || (m[2] !== undefined && Number(m[2]) < 1)) throw new StrataError("INVALID_ARGUMENT", `parse gpu ${JSON.stringify(v)}: want TYPE or TYPE:N`, { hint: "e.g. --gpu a100:2" });
  return { type: m[1]!, count: m[2] ? Number(m[2]) : 1 };
}

/** The agent's create request for `o`; bad options fail here, before any agent is asked. */
export function createRequest(o: SandboxCreateOptions) {
  const cpu = o.cpu === undefined ? undefined : Number(o.cpu);
  if (cpu !== undefined && !(cpu > 0)) throw new StrataError("INVALID_ARGUMENT", `parse cpu ${JSON.stringify(o.cpu)}: want a positive number`);
  return {
    image: (o.image ?? Image.debianSlim()).spec,
    ...(o.name ? { id: o.name } : {}),
    ...(cpu !== undefined ? { cpu } : {}),
    ...(o.memory !== undefined ? { memoryBytes: typeof o.memory === "number" ? o.memory : parseSize(o.memory, "memory") } : {}),
    ...(o.gpu !== undefined ? { gpu: parseGpu(o.gpu) } : {}),
    ...(o.lifetime !== undefined ? { lifetimeMs: parseDuration(o.lifetime, "lifetime") } : {}),
    ...(o.env ? { env: o.env } : {}),
    ...(o.workdir ? { workdir: o.workdir } : {}),
    ...(o.runId ? { runId: o.runId } : {}),
    ...(o.network !== undefined ? { network: parseNetwork(o.network) } : {}),
    volumes: o.volumes ?? [],
  };
}

function collect(s: Readable): Promise<Buffer> {
  return new Promise((res, rej) => {
    const parts: Buffer[] = [];
    s.on("data", (b: Buffer) => parts.push(b));
    s.on("end", () => res(Buffer.concat(parts)));
    s.on("error", rej);
  });
}

/** A sandbox on the node agent, by id. */
export class Sandbox {
  constructor(
    private readonly agent: AgentClient,
    /** The sandbox id. */
    readonly id: string,
  ) {}

  /** Runs `cmd args…` to completion and returns its exit code and output. */
  async exec(cmd: string, ...args: string[]): Promise<ExecOutput> {
    const p = await this.spawn([cmd, ...args]);
    const [stdout, stderr, r] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
    return { exitCode: r.exitCode, stdout, stderr, stdoutText: stdout.toString("utf8"), stderrText: stderr.toString("utf8"), oom: r.oom, ...(r.signal ? { signal: r.signal } : {}) };
  }

  /** Starts `argv` and returns the running process (streams, stdin, kill, wait). */
  async spawn(argv: string[], opts: SpawnOptions = {}): Promise<ContainerProcess> {
    if (!argv.length) throw new StrataError("INVALID_ARGUMENT", "spawn process: empty command");
    const p = await this.agent.exec(this.id, { argv, ...opts });
    return { stdout: p.stdout, stderr: p.stderr, stdin: p.stdin, kill: (s) => p.kill(s), wait: () => p.wait() };
  }

  /** Writes a file in the sandbox's own filesystem (not a volume), creating parents. */
  putFile(path: string, data: Buffer | string, opts: { mode?: number } = {}): Promise<void> {
    return this.agent.putFile(this.id, path, data, opts);
  }

  /** Reads a file of the sandbox's own filesystem; NOT_FOUND when missing. */
  readFile(path: string): Promise<Buffer> {
    return this.agent.readFile(this.id, path);
  }

  /** Makes each writable volume's writes so far one new version. */
  syncVolumes(): Promise<VolumeSyncResult[]> {
    return this.agent.syncVolumes(this.id);
  }

  /** Its current record. */
  async info(): Promise<SandboxRecord> {
    const r = (await this.agent.list()).find((s) => s.id === this.id);
    if (!r) throw AgentError.NOT_FOUND(this.id);
    return r;
  }

  /** Stops it: syncs writable volumes (unless `sync: false`: then their writes are dropped), unmounts, tears down. Idempotent. */
  stop(opts: { sync?: boolean } = {}): Promise<StopSandboxResult> {
    return this.agent.stop(this.id, opts);
  }
}

/** Options of `SandboxClient`. */
export interface SandboxClientOptions {
  /** Environment to configure from (STRATA_HOME…). Default `process.env`. */
  env?: NodeJS.ProcessEnv;
  /** An agent to use instead of the local one. */
  agent?: AgentClient;
  /** Start a local agent when none answers. Default true. */
  startAgent?: boolean;
}

/** The lower-level sandbox API over one node agent. */
export class SandboxClient {
  private static shared: SandboxClient | undefined;
  private agentP: Promise<AgentClient> | undefined;

  constructor(private readonly opts: SandboxClientOptions = {}) {
    if (opts.agent) this.agentP = Promise.resolve(opts.agent);
  }

  /** The client configured from `process.env`, made on first use. */
  static default(): SandboxClient {
    SandboxClient.shared ??= new SandboxClient();
    return SandboxClient.shared;
  }

  /** The agent connection (started or connected on first use). */
  agent(): Promise<AgentClient> {
    this.agentP ??= connectLocalAgent(this.opts.env ?? process.env, { start: this.opts.startAgent !== false });
    this.agentP.catch(() => (this.agentP = undefined));
    return this.agentP;
  }

  /** Creates and starts a sandbox; resolves once it can exec. */
  async create(opts: SandboxCreateOptions = {}): Promise<Sandbox> {
    const req = createRequest(opts); // bad options fail before an agent is started for them
    const agent = await this.agent();
    const rec = await agent.create(req);
    return new Sandbox(agent, rec.id);
  }

  /** A handle on an existing sandbox (no check that it exists). */
  async get(id: string): Promise<Sandbox> {
    return new Sandbox(await this.agent(), id);
  }

  /** Every sandbox the agent knows. */
  async list(): Promise<SandboxRecord[]> {
    return (await this.agent()).list();
  }

  /** Builds an image on the agent; `cached` tells whether it was already built. */
  async buildImage(image: Image): Promise<BuildImageResult> {
    return (await this.agent()).buildImage(image.spec);
  }

  /** Closes the connection (the agent and its sandboxes keep running). Idempotent. */
  async close(): Promise<void> {
    const p = this.agentP;
    this.agentP = undefined;
    if (p && !this.opts.agent) await (await p.catch(() => undefined))?.close();
  }
}

/** Options of `Container.mountVolume`. */
export interface MountVolumeOptions {
  /** Writes fail with EROFS. */
  readOnly?: boolean;
  /** Mount this version (read-only). */
  at?: string;
  /** Fork this volume into `name` first, then mount the fork writable. */
  forkFrom?: string;
}

/** Options of `new Container`. */
export interface ContainerOptions extends SandboxOptions {
  /** The client to run on; default `SandboxClient.default()`. */
  client?: SandboxClient;
}

/** A sandbox described fluently, then `run()`; after that it forwards to its `Sandbox`. */
export class Container {
  private readonly volumes: VolumeMountRequest[] = [];
  private sandbox: Sandbox | undefined;

  constructor(private readonly opts: ContainerOptions = {}) {}

  /** Mounts volume `name` at `path` (created empty on first use when writable). Before `run()` only. */
  mountVolume(name: string, path: string, opts: MountVolumeOptions = {}): this {
    if (this.sandbox) throw new StrataError("INVALID_ARGUMENT", `mount volume ${JSON.stringify(name)}: the container already runs`);
    this.volumes.push({ name, path, ...opts });
    return this;
  }

  /** Forks `src` into a new volume `newName` and mounts it writable at `path`. */
  forkVolume(src: string, newName: string, path: string): this {
    return this.mountVolume(newName, path, { forkFrom: src });
  }

  /** Starts it; resolves to this container once it can exec. */
  async run(): Promise<this> {
    if (this.sandbox) return this;
    const client = this.opts.client ?? SandboxClient.default();
    this.sandbox = await client.create({ ...this.opts, volumes: this.volumes });
    return this;
  }

  private sb(): Sandbox {
    if (!this.sandbox) throw new StrataError("INVALID_ARGUMENT", "use container: call run() first");
    return this.sandbox;
  }

  /** The sandbox id (after `run()`). */
  get id(): string {
    return this.sb().id;
  }

  /** Runs a command to completion. */
  exec(cmd: string, ...args: string[]): Promise<ExecOutput> {
    return this.sb().exec(cmd, ...args);
  }

  /** Starts a process: streamed output, optional stdin, kill, wait. */
  spawn(argv: string[], opts: SpawnOptions = {}): Promise<ContainerProcess> {
    return this.sb().spawn(argv, opts);
  }

  /** Writes a file in the sandbox's own filesystem. */
  putFile(path: string, data: Buffer | string, opts: { mode?: number } = {}): Promise<void> {
    return this.sb().putFile(path, data, opts);
  }

  /** Reads a file of the sandbox's own filesystem. */
  readFile(path: string): Promise<Buffer> {
    return this.sb().readFile(path);
  }

  /** Makes the writes in its volumes versions now. */
  syncVolumes(): Promise<VolumeSyncResult[]> {
    return this.sb().syncVolumes();
  }

  /** Syncs its volumes (unless `sync: false`), unmounts them and tears the sandbox down. */
  stop(opts: { sync?: boolean } = {}): Promise<StopSandboxResult> {
    return this.sb().stop(opts);
  }
}
