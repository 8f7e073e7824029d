/**
 * `AgentClient`: what the SDK, the CLI and (later) the scheduler need from a node agent, and
 * `GrpcAgentClient`, its implementation over the agent's gRPC service (proto/agent.proto).
 * `AgentService` (server.ts) implements the same interface in-process.
 */
import { existsSync } from "node:fs";
import { hostname } from "node:os";
import { PassThrough, Writable } from "node:stream";
import { fileURLToPath } from "node:url";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { StrataError } from "../metadata/index.js";
import { AgentError, type AgentErrorCode } from "./errors.js";
import type { ImageSpec } from "./image.js";
import type { ExecOptions, ExecProcess, ExecResult, NetworkSpec, SandboxExit } from "./runtime.js";

/** A GPU request: a product type (e.g. "a100") and how many. */
export interface GpuRequest {
  type: string;
  /** At least 1. */
  count: number;
}

/** GPUs a sandbox was given. */
export interface SandboxGpu extends GpuRequest {
  /** The devices it holds, in index order (empty once it stopped and released them). */
  devices: { index: number; uuid: string; name: string }[];
}

/** A volume to mount into a new sandbox. */
export interface VolumeMountRequest {
  /** The volume's name; created empty on first use when mounted writable at its head. */
  name: string;
  /** Absolute path inside the sandbox. */
  path: string;
  /** Writes fail with EROFS. Default false. */
  readOnly?: boolean;
  /** A version (id prefix, "head~N") to mount instead of the head; implies read-only. */
  at?: string;
  /** Fork this volume into `name` first (fails ALREADY_EXISTS if `name` exists), then mount `name` writable. */
  forkFrom?: string;
}

/** What `create` needs. */
export interface CreateSandboxRequest {
  /** The image, built (or found in the cache) by the agent. */
  image: ImageSpec;
  /** Sandbox id (/^[a-z0-9][a-z0-9_.-]{0,62}$/); default generated. */
  id?: string;
  /** CPU cores, fractional allowed. Default unlimited. */
  cpu?: number;
  /** Memory limit in bytes. Default unlimited. */
  memoryBytes?: number;
  /**
   * GPUs, whole devices of one type (matched as agent/gpu.ts says); fails NO_GPU when the node
   * has fewer of that type, GPU_UNAVAILABLE when other sandboxes hold them.
   */
  gpu?: GpuRequest;
  /** Milliseconds after start at which the sandbox is stopped (and its volumes synced). */
  lifetimeMs?: number;
  /** Environment of every process, over the image's. */
  env?: Record<string, string>;
  /** Working directory of exec'd processes; default the image's. */
  workdir?: string;
  /** Volumes, mounted through FUSE on the node and bind-mounted in. */
  volumes?: VolumeMountRequest[];
  /** The provenance label "run" of versions its volumes sync; default the sandbox id. */
  runId?: string;
  /** Free-form labels, returned by `list`. */
  labels?: Record<string, string>;
  /** Default `{ mode: "none" }` (loopback only); `{ mode: "egress", allow }` for an allow-listed way out. */
  network?: NetworkSpec;
}

/** A volume as mounted in a sandbox. */
export interface SandboxVolume {
  name: string;
  path: string;
  readOnly: boolean;
  at?: string;
  forkedFrom?: string;
}

/** A sandbox as the agent records it. */
export interface SandboxRecord {
  id: string;
  /** The node (host name) it runs on. */
  node: string;
  /** "stopping" while its volumes sync and unmount. */
  state: "running" | "stopping" | "stopped";
  /** The image hash. */
  image: string;
  /** CPU cores, or null for unlimited. */
  cpu: number | null;
  /** Memory limit in bytes, or null for unlimited. */
  memoryBytes: number | null;
  /** The GPUs it asked for and holds; null without. */
  gpu: SandboxGpu | null;
  volumes: SandboxVolume[];
  /** Milliseconds since the epoch. */
  startedAt: number;
  runId: string;
  labels: Record<string, string>;
  /** Its network: `{ mode: "none" }` or the egress allow-list as resolved. */
  network: NetworkSpec;
  /** Set once it stopped. */
  exit?: SandboxExit;
}

/** The outcome of syncing one volume of a sandbox. */
export interface VolumeSyncResult {
  name: string;
  /** The volume's head after the sync (null: still empty). */
  version: string | null;
  /** False when there was nothing to commit. */
  changed: boolean;
  /** Set when the sync failed; the writes stay staged on the node. */
  error?: string;
}

/** What `stop` returns. */
export interface StopSandboxResult {
  sandbox: SandboxRecord;
  /** One entry per writable volume that was synced; empty with `sync: false`. */
  volumes: VolumeSyncResult[];
}

/** What `buildImage` returns. */
export interface BuildImageResult {
  hash: string;
  /** True when nothing had to be built. */
  cached: boolean;
}

/**
 * A node agent. Unknown sandbox ids fail with AgentError NOT_FOUND, stopped ones NOT_RUNNING;
 * errors of other layers (an unknown volume) keep their code.
 */
export interface AgentClient {
  /** Builds the image, forks and mounts the volumes, starts the sandbox; resolves once `exec` can run. */
  create(req: CreateSandboxRequest): Promise<SandboxRecord>;
  /** Starts a process; resolves once it runs. Its `wait()` rejects only when the agent is lost. */
  exec(id: string, opts: ExecOptions): Promise<ExecProcess>;
  /** Stops it; syncs each writable volume first unless `sync` is false (then the writes are dropped). Idempotent. */
  stop(id: string, opts?: { sync?: boolean }): Promise<StopSandboxResult>;
  /** Every sandbox, running or stopped within the last minutes, oldest first. */
  list(): Promise<SandboxRecord[]>;
  /** Writes a file in the sandbox's own filesystem (not a volume), creating parents. */
  putFile(id: string, path: string, data: Buffer | string, opts?: { mode?: number }): Promise<void>;
  /** Reads a file of the sandbox's own filesystem; NOT_FOUND when missing. */
  readFile(id: string, path: string): Promise<Buffer>;
  /** Makes each writable volume's staged writes one new version now. */
  syncVolumes(id: string): Promise<VolumeSyncResult[]>;
  /** Builds an image into the node's cache; instant for a cached spec. */
  buildImage(spec: ImageSpec): Promise<BuildImageResult>;
  /** Releases the connection (an in-process agent: stops everything). Idempotent. */
  close(): Promise<void>;
}

/** The metadata key carrying a failed call's Strata error as JSON. */
export const ERROR_METADATA_KEY = "strata-error-bin";

/** A Strata error as it travels over the wire. */
export interface WireError {
  code: string;
  message: string;
  hint?: string;
}

/** The wire form of any error. */
export function toWireError(err: unknown): WireError {
  if (err instanceof StrataError) return { code: err.code, message: err.message, ...(err.hint ? { hint: err.hint } : {}) };
  const e = err as NodeJS.ErrnoException;
  return { code: "RUNTIME", message: e?.message ?? String(err) };
}

/** Rebuilds an error from its wire form: an AgentError for agent codes, else a StrataError with the same code. */
export function fromWireError(w: WireError): StrataError {
  const agentCodes: AgentErrorCode[] = ["INVALID_SPEC", "NOT_FOUND", "ALREADY_EXISTS", "NOT_RUNNING", "RUNTIME", "NETWORK", "IMAGE_NOT_FOUND", "IMAGE_STEP_FAILED", "DOCKERFILE", "IO", "NO_GPU", "GPU_UNAVAILABLE", "AGENT_UNAVAILABLE"];
  if ((agentCodes as string[]).includes(w.code)) return new AgentError(w.code as AgentErrorCode, w.message, { hint: w.hint });
  return new StrataError(w.code, w.message, { hint: w.hint });
}

/** The path of agent.proto (next to the sources, also when running from a compiled build). */
export function agentProtoPath(): string {
  const here = fileURLToPath(new URL("./proto/agent.proto", import.meta.url));
  if (existsSync(here)) return here;
  return fileURLToPath(new URL("../../agent/proto/agent.proto", import.meta.url));
}

/** Loads the service definition (field names in camelCase, 64-bit numbers as JS numbers). */
export function loadAgentService(): grpc.ServiceClientConstructor {
  const def = protoLoader.loadSync(agentProtoPath(), { keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true });
  const pkg = grpc.loadPackageDefinition(def) as unknown as { strata: { agent: { v1: { Agent: grpc.ServiceClientConstructor } } } };
  return pkg.strata.agent.v1.Agent;
}

/** The grpc target of an address: a socket path ("/x/agent.sock" or "unix:…") or "host:port". */
export function grpcTarget(address: string): string {
  if (address.startsWith("unix:")) return address;
  if (address.startsWith("/")) return `unix://${address}`;
  return address;
}

// ---- wire conversions (shared with server.ts) ----

/** Wire form of a SandboxRecord. */
export type WireRecord = Record<string, unknown>;

/** A SandboxRecord in the proto's shape. */
export function recordToWire(r: SandboxRecord): WireRecord {
  return {
    id: r.id, node: r.node, state: r.state, image: r.image, cpu: r.cpu ?? 0, memoryBytes: r.memoryBytes ?? 0,
    gpu: r.gpu ?? undefined, startedAt: r.startedAt, exitReason: r.exit?.reason ?? "", oom: r.exit?.oom ?? false,
    runId: r.runId, labels: r.labels, network: networkToWire(r.network),
    volumes: r.volumes.map((v) => ({ name: v.name, path: v.path, readOnly: v.readOnly, at: v.at ?? "", forkedFrom: v.forkedFrom ?? "" })),
  };
}

/** A SandboxRecord from the proto's shape. */
export function recordFromWire(w: WireRecord): SandboxRecord {
  const g = w.gpu as { type: string; count: number; devices?: { index: number; uuid: string; name: string }[] } | null | undefined;
  const rec: SandboxRecord = {
    id: w.id as string, node: w.node as string, state: w.state as SandboxRecord["state"], image: w.image as string,
    cpu: (w.cpu as number) || null, memoryBytes: (w.memoryBytes as number) || null,
    gpu: g && g.type ? { type: g.type, count: g.count, devices: (g.devices ?? []).map((d) => ({ index: d.index, uuid: d.uuid, name: d.name })) } : null,
    volumes: ((w.volumes as Record<string, unknown>[]) ?? []).map((v) => {
      const out: SandboxVolume = { name: v.name as string, path: v.path as string, readOnly: v.readOnly as boolean };
      if (v.at) out.at = v.at as string;
      if (v.forkedFrom) out.forkedFrom = v.forkedFrom as string;
      return out;
    }),
    startedAt: w.startedAt as number, runId: w.runId as string, labels: { ...(w.labels as Record<string, string>) },
    network: networkFromWire(w.network),
  };
  if (w.exitReason) rec.exit = { reason: w.exitReason as SandboxExit["reason"], oom: w.oom as boolean };
  return rec;
}

/** Wire form of a network spec. */
export function networkToWire(n: NetworkSpec | undefined): { mode: string; allow: string[] } {
  return n?.mode === "egress" ? { mode: "egress", allow: [...n.allow] } : { mode: "none", allow: [] };
}

/** A network spec from its wire form (absent or empty mode: none). */
export function networkFromWire(w: unknown): NetworkSpec {
  const n = w as { mode?: string; allow?: string[] } | null | undefined;
  return n?.mode === "egress" ? { mode: "egress", allow: [...(n.allow ?? [])] } : { mode: "none" };
}

/** Wire form of volume sync results. */
export function syncsToWire(list: VolumeSyncResult[]): Record<string, unknown>[] {
  return list.map((v) => ({ name: v.name, version: v.version ?? "", changed: v.changed, error: v.error ?? "" }));
}

function syncsFromWire(list: Record<string, unknown>[] | undefined): VolumeSyncResult[] {
  return (list ?? []).map((v) => {
    const out: VolumeSyncResult = { name: v.name as string, version: (v.version as string) || null, changed: v.changed as boolean };
    if (v.error) out.error = v.error as string;
    return out;
  });
}

/** Options of `GrpcAgentClient.connect`. */
export interface GrpcAgentClientOptions {
  /** How long to wait for the agent to answer, in ms. Default 2000. */
  connectTimeoutMs?: number;
}

type Unary = (req: unknown, md: grpc.Metadata, cb: (err: grpc.ServiceError | null, res: unknown) => void) => void;

/** `AgentClient` over gRPC (a unix socket or TCP). */
export class GrpcAgentClient implements AgentClient {
  private closed = false;

  private constructor(
    /** The address it talks to. */
    readonly address: string,
    private readonly client: grpc.Client,
  ) {}

  /** Connects and waits until the agent answers a ping; fails AGENT_UNAVAILABLE. */
  static async connect(address: string, opts: GrpcAgentClientOptions = {}): Promise<GrpcAgentClient> {
    const Agent = loadAgentService();
    const client = new Agent(grpcTarget(address), grpc.credentials.createInsecure(), {
      "grpc.max_receive_message_length": 256 << 20,
      "grpc.max_send_message_length": 256 << 20,
    });
    const c = new GrpcAgentClient(address, client);
    try {
      await new Promise<void>((res, rej) => client.waitForReady(Date.now() + (opts.connectTimeoutMs ?? 2000), (e) => (e ? rej(e) : res())));
      await c.call("ping", {});
    } catch (err) {
      client.close();
      throw err instanceof StrataError && err.code !== "RUNTIME" ? err : AgentError.AGENT_UNAVAILABLE(address, err);
    }
    return c;
  }

  private call<T>(method: string, req: unknown): Promise<T> {
    if (this.closed) return Promise.reject(AgentError.AGENT_UNAVAILABLE(this.address, new Error("client is closed")));
    const fn = (this.client as unknown as Record<string, Unary>)[method]!.bind(this.client);
    return new Promise((resolve, reject) => {
      fn(req, new grpc.Metadata(), (err, res) => (err ? reject(this.translate(err)) : resolve(res as T)));
    });
  }

  private translate(err: grpc.ServiceError): Error {
    const raw = err.metadata?.get(ERROR_METADATA_KEY)?.[0];
    if (raw) {
      try {
        return fromWireError(JSON.parse(Buffer.from(raw as Buffer).toString("utf8")) as WireError);
      } catch {
        // fall through: not our error metadata
      }
    }
    return AgentError.AGENT_UNAVAILABLE(this.address, new Error(err.details || err.message));
  }

  async create(req: CreateSandboxRequest): Promise<SandboxRecord> {
    const w = await this.call<WireRecord>("create", {
      imageSpecJson: JSON.stringify(req.image), id: req.id ?? "", cpu: req.cpu ?? 0, memoryBytes: req.memoryBytes ?? 0,
      gpu: req.gpu, lifetimeMs: req.lifetimeMs ?? 0, env: req.env ?? {}, runId: req.runId ?? "", labels: req.labels ?? {},
      workdir: req.workdir ?? "", network: networkToWire(req.network),
      volumes: (req.volumes ?? []).map((v) => ({ name: v.name, path: v.path, readOnly: !!v.readOnly, at: v.at ?? "", forkFrom: v.forkFrom ?? "" })),
    });
    return recordFromWire(w);
  }

  async exec(id: string, opts: ExecOptions): Promise<ExecProcess> {
    if (this.closed) throw AgentError.AGENT_UNAVAILABLE(this.address, new Error("client is closed"));
    const call = (this.client as unknown as { exec(): grpc.ClientDuplexStream<unknown, Record<string, unknown>> }).exec();
    const stdout = new PassThrough();
    const stderr = new PassThrough();
    let result: ExecResult | undefined;
    let startErr: Error | undefined;
    let resolveStarted!: () => void;
    let rejectStarted!: (e: Error) => void;
    const started = new Promise<void>((res, rej) => ((resolveStarted = res), (rejectStarted = rej)));
    const done = new Promise<ExecResult>((resolve, reject) => {
      const finish = (err?: Error) => {
        stdout.end();
        stderr.end();
        if (result) resolve(result);
        else reject(err ?? startErr ?? AgentError.AGENT_UNAVAILABLE(this.address, new Error("exec stream ended without an exit")));
        rejectStarted(startErr ?? err ?? AgentError.AGENT_UNAVAILABLE(this.address, new Error("exec stream ended before start")));
      };
      call.on("data", (m: Record<string, unknown>) => {
        switch (m.msg) {
          case "started": resolveStarted(); break;
          case "stdout": stdout.write(m.stdout as Buffer); break;
          case "stderr": stderr.write(m.stderr as Buffer); break;
          case "exit": {
            const e = m.exit as { exitCode: number; signal: string; oom: boolean };
            result = { exitCode: e.exitCode, oom: e.oom };
            if (e.signal) result.signal = e.signal as NodeJS.Signals;
            call.end();
            break;
          }
          case "errorJson": startErr = fromWireError(JSON.parse(m.errorJson as string) as WireError); break;
        }
      });
      call.on("end", () => finish());
      call.on("error", (e: grpc.ServiceError) => finish(this.translate(e)));
    });
    done.catch(() => undefined);
    call.write({ start: { id, argv: opts.argv, env: opts.env ?? {}, cwd: opts.cwd ?? "", user: opts.user ?? "", stdin: !!opts.stdin } });
    const stdin = opts.stdin
      ? new Writable({
          write: (chunk: Buffer, _enc, cb) => {
            if (result) return cb();
            call.write({ stdin: chunk }, () => cb());
          },
          final: (cb) => {
            if (!result) call.write({ stdinEof: true });
            cb();
          },
        })
      : null;
    await started;
    return {
      stdout,
      stderr,
      stdin,
      kill: (signal: NodeJS.Signals = "SIGTERM") => {
        if (!result) call.write({ kill: signal });
      },
      wait: () => done,
    };
  }

  async stop(id: string, opts: { sync?: boolean } = {}): Promise<StopSandboxResult> {
    const r = await this.call<{ sandbox: WireRecord; volumes: Record<string, unknown>[] }>("stop", { id, noSync: opts.sync === false });
    return { sandbox: recordFromWire(r.sandbox), volumes: syncsFromWire(r.volumes) };
  }

  async list(): Promise<SandboxRecord[]> {
    const r = await this.call<{ sandboxes: WireRecord[] }>("list", {});
    return (r.sandboxes ?? []).map(recordFromWire);
  }

  async putFile(id: string, path: string, data: Buffer | string, opts: { mode?: number } = {}): Promise<void> {
    await this.call("putFile", { id, path, data: Buffer.from(data), mode: opts.mode ?? 0 });
  }

  async readFile(id: string, path: string): Promise<Buffer> {
    const r = await this.call<{ data: Buffer }>("readFile", { id, path });
    return Buffer.from(r.data ?? Buffer.alloc(0));
  }

  async syncVolumes(id: string): Promise<VolumeSyncResult[]> {
    const r = await this.call<{ volumes: Record<string, unknown>[] }>("syncVolumes", { id });
    return syncsFromWire(r.volumes);
  }

  async buildImage(spec: ImageSpec): Promise<BuildImageResult> {
    return this.call<BuildImageResult>("buildImage", { imageSpecJson: JSON.stringify(spec) });
  }

  /** The agent's node name and process id. */
  async ping(): Promise<{ node: string; pid: number }> {
    return this.call("ping", {});
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.client.close();
  }
}

/** This machine's node name, as agents report it. */
export function nodeName(): string {
  return hostname();
}
