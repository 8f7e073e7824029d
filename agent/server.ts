/**
 * The node agent: `AgentService` owns this node's sandboxes and the FUSE mounts of their volumes
 * (a mount needs a live serving process, so the agent is a long-lived one), and `serveAgent`
 * exposes any `AgentClient` over gRPC (proto/agent.proto).
 *
 * Layout under `stateDir`: `mounts/<sandbox id>/<n>/` the host mount point of the sandbox's n-th
 * volume, bind-mounted into its bundle. Invariants: a sandbox's volumes are mounted before it
 * starts and unmounted only after nothing in it runs; a stop syncs every writable volume
 * (provenance labels `sandbox` and `run`) before it unmounts, unless asked not to, in which case
 * the staged writes are discarded. A sandbox that ends by itself (lifetime, OOM, its init dying)
 * is stopped the same way, with a sync. Records live in memory: an agent restart forgets them
 * (runsc state and staged writes stay on disk).
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, rm, unlink } from "node:fs/promises";
import { hostname } from "node:os";
import { isAbsolute, join, posix } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { isCode } from "../metadata/index.js";
import { MountedVolume, mountFs, type FuseMount, type MountFs, type Repository } from "../volumefs/index.js";
import {
  ERROR_METADATA_KEY,
  grpcTarget,
  loadAgentService,
  recordToWire,
  syncsToWire,
  toWireError,
  type AgentClient,
  type BuildImageResult,
  type CreateSandboxRequest,
  type GpuRequest,
  type SandboxRecord,
  type StopSandboxResult,
  type VolumeSyncResult,
} from "./client.js";
import { AgentError } from "./errors.js";
import { sandboxSpecFor, type ImageBuilder, type ImageSpec } from "./image.js";
import type { ExecOptions, ExecProcess, Runtime } from "./runtime.js";

/** Options of `AgentService`. */
export interface AgentServiceOptions {
  /** The sandbox runtime (a `GvisorRuntime` in production). */
  runtime: Runtime;
  /** Builds and caches images. */
  images: ImageBuilder;
  /** The store volumes live in. */
  repo: Repository;
  /** Where mount points live (`<stateDir>/mounts/`); created if missing. */
  stateDir: string;
  /** Staging directories of mounted volumes (e.g. $STRATA_HOME/staging). */
  stagingRoot: string;
  /** This node's name in records. Default the host name. */
  node?: string;
  /** GPUs this node has, by type. Default none. */
  gpus?: GpuRequest[];
  /** How long a stopped sandbox stays listed, in ms. Default 10 minutes. */
  keepStoppedMs?: number;
}

interface VolumeMount {
  name: string;
  dir: string;
  writable: boolean;
  fs: MountFs;
  fuse: FuseMount;
}

interface Entry {
  record: SandboxRecord;
  mounts: VolumeMount[];
  stopping?: Promise<StopSandboxResult>;
}

/** The node agent in-process: an `AgentClient` whose sandboxes run here. */
export class AgentService implements AgentClient {
  private readonly sandboxes = new Map<string, Entry>();
  private readonly node: string;
  private closed = false;

  constructor(private readonly opts: AgentServiceOptions) {
    this.node = opts.node ?? hostname();
  }

  async create(req: CreateSandboxRequest): Promise<SandboxRecord> {
    if (this.closed) throw AgentError.RUNTIME("create sandbox", new Error("agent is shutting down"));
    if (req.gpu && req.gpu.count > 0) this.checkGpu(req.gpu);
    const id = req.id || `sb-${randomBytes(6).toString("hex")}`;
    if (this.sandboxes.has(id)) throw AgentError.ALREADY_EXISTS(id);
    const volumes = req.volumes ?? [];
    const seen = new Set<string>();
    for (const v of volumes) {
      if (!isAbsolute(v.path) || posix.normalize(v.path) === "/") throw AgentError.INVALID_SPEC(`volume ${JSON.stringify(v.name)} path ${JSON.stringify(v.path)}`, "must be an absolute path below /");
      if (seen.has(posix.normalize(v.path))) throw AgentError.INVALID_SPEC(`volume path ${JSON.stringify(v.path)}`, "mounted twice");
      seen.add(posix.normalize(v.path));
      if (v.forkFrom && (v.at || v.readOnly)) throw AgentError.INVALID_SPEC(`volume ${JSON.stringify(v.name)}`, "a fork is mounted writable at its head");
    }
    const image = await this.opts.images.build(req.image);
    const runId = req.runId || id;
    const labels = { sandbox: id, run: runId };
    const entry: Entry = {
      record: {
        id, node: this.node, state: "running", image: image.hash, cpu: req.cpu || null, memoryBytes: req.memoryBytes || null,
        gpu: req.gpu && req.gpu.count > 0 ? { ...req.gpu } : null, volumes: [], startedAt: Date.now(), runId, labels: { ...req.labels },
      },
      mounts: [],
    };
    this.sandboxes.set(id, entry);
    const forked: string[] = [];
    try {
      for (const [i, v] of volumes.entries()) {
        const readOnly = !!v.readOnly || !!v.at;
        if (v.forkFrom) {
          await this.opts.repo.fork(v.forkFrom, v.name);
          forked.push(v.name);
        } else if (!readOnly) {
          await this.opts.repo.openOrCreate(v.name);
        }
        const dir = join(this.opts.stateDir, "mounts", id, String(i));
        await mkdir(dir, { recursive: true });
        const fs = await MountedVolume.open({
          repo: this.opts.repo, volume: v.name, at: v.at || undefined, readOnly, stagingRoot: this.opts.stagingRoot, labels, mountpoint: dir,
        });
        let fuse: FuseMount;
        try {
          fuse = await mountFs(fs, dir, { readOnly, immutable: !!v.at, name: `strata-${v.name}` });
        } catch (err) {
          await fs.close();
          throw err;
        }
        entry.mounts.push({ name: v.name, dir, writable: !readOnly, fs, fuse });
        entry.record.volumes.push({
          name: v.name, path: posix.normalize(v.path), readOnly,
          ...(v.at ? { at: v.at } : {}), ...(v.forkFrom ? { forkedFrom: v.forkFrom } : {}),
        });
      }
      const spec = sandboxSpecFor(image, {
        id, env: req.env, labels: req.labels,
        mounts: entry.mounts.map((m, i) => ({ source: m.dir, destination: entry.record.volumes[i]!.path, readOnly: !m.writable })),
        ...(req.cpu ? { cpu: req.cpu } : {}),
        ...(req.memoryBytes ? { memoryBytes: req.memoryBytes } : {}),
        ...(req.lifetimeMs ? { lifetimeMs: req.lifetimeMs } : {}),
        ...(req.workdir ? { workdir: req.workdir } : {}),
      });
      const handle = await this.opts.runtime.create(spec);
      entry.record.startedAt = handle.startedAt;
      void handle.exited.then((exit) => {
        entry.record.exit = exit;
        if (!entry.stopping && !this.closed) void this.stop(id).catch(() => undefined);
      });
    } catch (err) {
      this.sandboxes.delete(id);
      for (const m of entry.mounts) await m.fuse.unmount().catch(() => undefined);
      await rm(join(this.opts.stateDir, "mounts", id), { recursive: true, force: true }).catch(() => undefined);
      for (const name of forked) await this.opts.repo.deleteVolume(name).catch(() => undefined);
      throw err;
    }
    return structuredClone(entry.record);
  }

  async exec(id: string, opts: ExecOptions): Promise<ExecProcess> {
    this.entry(id, "exec in sandbox");
    return this.opts.runtime.exec(id, opts);
  }

  stop(id: string, opts: { sync?: boolean } = {}): Promise<StopSandboxResult> {
    let entry: Entry;
    try {
      entry = this.entry(id, "stop sandbox");
    } catch (err) {
      return Promise.reject(err);
    }
    entry.stopping ??= this.finish(entry, opts.sync !== false);
    return entry.stopping;
  }

  private async finish(entry: Entry, sync: boolean): Promise<StopSandboxResult> {
    const rec = entry.record;
    rec.state = "stopping";
    await this.opts.runtime.stop(rec.id).catch((err) => {
      if (!isCode(err, "NOT_FOUND")) throw err;
    });
    const info = await this.opts.runtime.info(rec.id).catch(() => undefined);
    if (info?.exit) rec.exit = info.exit;
    const volumes: VolumeSyncResult[] = [];
    for (const m of entry.mounts) {
      if (m.writable && sync) volumes.push(await this.syncOne(entry, m));
      else if (m.writable) await m.fs.reload({ discard: true }).catch(() => undefined);
      await m.fuse.unmount().catch(() => undefined);
    }
    await rm(join(this.opts.stateDir, "mounts", rec.id), { recursive: true, force: true }).catch(() => undefined);
    rec.state = "stopped";
    rec.exit ??= { reason: "stopped", oom: false };
    setTimeout(() => {
      if (this.sandboxes.get(rec.id) === entry) this.sandboxes.delete(rec.id);
    }, this.opts.keepStoppedMs ?? 600_000).unref();
    return { sandbox: structuredClone(rec), volumes };
  }

  private async syncOne(entry: Entry, m: VolumeMount): Promise<VolumeSyncResult> {
    try {
      const r = await m.fs.sync({ labels: { sandbox: entry.record.id, run: entry.record.runId }, message: `sandbox ${entry.record.id}` });
      return { name: m.name, version: r.version, changed: r.changed };
    } catch (err) {
      return { name: m.name, version: null, changed: false, error: toWireError(err).message };
    }
  }

  async list(): Promise<SandboxRecord[]> {
    return [...this.sandboxes.values()].map((e) => structuredClone(e.record));
  }

  async putFile(id: string, path: string, data: Buffer | string, opts?: { mode?: number }): Promise<void> {
    this.entry(id, "put file in sandbox");
    await this.opts.runtime.putFile(id, path, data, opts);
  }

  async readFile(id: string, path: string): Promise<Buffer> {
    this.entry(id, "read file in sandbox");
    return this.opts.runtime.readFile(id, path);
  }

  async syncVolumes(id: string): Promise<VolumeSyncResult[]> {
    const entry = this.entry(id, "sync volumes of sandbox");
    if (entry.stopping) throw AgentError.NOT_RUNNING(id, "sync volumes of sandbox", "stopping");
    const out: VolumeSyncResult[] = [];
    for (const m of entry.mounts) if (m.writable) out.push(await this.syncOne(entry, m));
    const failed = out.find((r) => r.error);
    if (failed) throw AgentError.IO(`sync volume ${JSON.stringify(failed.name)} of sandbox ${JSON.stringify(id)}`, new Error(failed.error));
    return out;
  }

  async buildImage(spec: ImageSpec): Promise<BuildImageResult> {
    const s = this.opts.images.stats;
    const before = s.basesBuilt + s.stepsRun;
    const image = await this.opts.images.build(spec);
    return { hash: image.hash, cached: s.basesBuilt + s.stepsRun === before };
  }

  /** Stops every sandbox (syncing its volumes), then the runtime. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.sandboxes.values()].map((e) => (e.stopping ??= this.finish(e, true)).catch(() => undefined)));
    await this.opts.runtime.close();
  }

  private entry(id: string, op: string): Entry {
    const e = this.sandboxes.get(id);
    if (!e) throw AgentError.NOT_FOUND(id, op);
    return e;
  }

  private checkGpu(gpu: GpuRequest): void {
    const have = (this.opts.gpus ?? []).filter((g) => g.type === gpu.type).reduce((n, g) => n + g.count, 0);
    const used = [...this.sandboxes.values()]
      .filter((e) => e.record.state !== "stopped" && e.record.gpu?.type === gpu.type)
      .reduce((n, e) => n + e.record.gpu!.count, 0);
    if (have - used < gpu.count) throw AgentError.NO_GPU(gpu.type, gpu.count);
  }
}

/** A running gRPC server. */
export interface AgentServer {
  /** The address it listens on (a socket path, or host:port with the bound port). */
  readonly address: string;
  /** Stops accepting calls and ends open ones; removes the socket file. Idempotent. */
  close(): Promise<void>;
}

function fail(err: unknown): grpc.ServiceError {
  const w = toWireError(err);
  const md = new grpc.Metadata();
  md.set(ERROR_METADATA_KEY, Buffer.from(JSON.stringify(w)));
  const status = w.code === "NOT_FOUND" ? grpc.status.NOT_FOUND
    : w.code === "INVALID_SPEC" ? grpc.status.INVALID_ARGUMENT
    : w.code === "NOT_RUNNING" ? grpc.status.FAILED_PRECONDITION
    : grpc.status.UNKNOWN;
  return Object.assign(new Error(w.message), { code: status, details: w.message, metadata: md }) as grpc.ServiceError;
}

type UnaryHandler = (call: grpc.ServerUnaryCall<Record<string, unknown>, unknown>, cb: grpc.sendUnaryData<unknown>) => void;

function unary(fn: (req: Record<string, unknown>) => Promise<unknown>): UnaryHandler {
  return (call, cb) => {
    fn(call.request).then((res) => cb(null, res), (err) => cb(fail(err)));
  };
}

function parseSpec(json: unknown): ImageSpec {
  try {
    return JSON.parse(String(json)) as ImageSpec;
  } catch (err) {
    throw AgentError.INVALID_SPEC("image spec", `not JSON: ${(err as Error).message}`);
  }
}

function execHandler(agent: AgentClient) {
  return (call: grpc.ServerDuplexStream<Record<string, unknown>, unknown>) => {
    let proc: ExecProcess | undefined;
    let ended = false;
    const pending: Record<string, unknown>[] = [];
    const end = () => {
      if (!ended) {
        ended = true;
        call.end();
      }
    };
    const input = (m: Record<string, unknown>) => {
      if (!proc) return void pending.push(m);
      if (m.msg === "stdin") proc.stdin?.write(m.stdin as Buffer);
      else if (m.msg === "stdinEof") proc.stdin?.end();
      else if (m.msg === "kill") proc.kill(m.kill as NodeJS.Signals);
    };
    let startedOnce = false;
    call.on("data", (m: Record<string, unknown>) => {
      if (m.msg !== "start") return input(m);
      if (startedOnce) return;
      startedOnce = true;
      const s = m.start as { id: string; argv: string[]; env: Record<string, string>; cwd: string; user: string; stdin: boolean };
      const opts: ExecOptions = { argv: s.argv, env: s.env, stdin: s.stdin };
      if (s.cwd) opts.cwd = s.cwd;
      if (s.user) opts.user = s.user;
      agent.exec(s.id, opts).then((p) => {
        proc = p;
        call.write({ started: true });
        p.stdout.on("data", (b: Buffer) => call.write({ stdout: b }));
        p.stderr.on("data", (b: Buffer) => call.write({ stderr: b }));
        for (const q of pending.splice(0)) input(q);
        p.wait().then((r) => {
          call.write({ exit: { exitCode: r.exitCode, signal: r.signal ?? "", oom: r.oom } });
          end();
        }, (err) => {
          call.write({ errorJson: JSON.stringify(toWireError(err)) });
          end();
        });
      }, (err) => {
        call.write({ errorJson: JSON.stringify(toWireError(err)) });
        end();
      });
    });
    call.on("cancelled", () => proc?.kill("SIGKILL"));
    call.on("error", () => proc?.kill("SIGKILL"));
  };
}

/**
 * Serves `agent` over gRPC at `address`: a socket path (a stale socket file is replaced) or
 * "host:port" (port 0 picks one). Resolves once it listens.
 */
export async function serveAgent(agent: AgentClient, address: string, info: { node?: string } = {}): Promise<AgentServer> {
  const server = new grpc.Server({ "grpc.max_receive_message_length": 256 << 20, "grpc.max_send_message_length": 256 << 20 });
  const isSocket = address.startsWith("/") || address.startsWith("unix:");
  const socketPath = isSocket ? address.replace(/^unix:(\/\/)?/, "") : undefined;
  server.addService(loadAgentService().service, {
    create: unary(async (r) => {
      const gpu = r.gpu as { type: string; count: number } | null;
      const req: CreateSandboxRequest = {
        image: parseSpec(r.imageSpecJson), env: r.env as Record<string, string>, labels: r.labels as Record<string, string>,
        volumes: (r.volumes as Record<string, unknown>[]).map((v) => ({
          name: v.name as string, path: v.path as string, readOnly: v.readOnly as boolean,
          ...(v.at ? { at: v.at as string } : {}), ...(v.forkFrom ? { forkFrom: v.forkFrom as string } : {}),
        })),
      };
      if (r.id) req.id = r.id as string;
      if (r.cpu) req.cpu = r.cpu as number;
      if (r.memoryBytes) req.memoryBytes = r.memoryBytes as number;
      if (gpu && gpu.type) req.gpu = { type: gpu.type, count: gpu.count || 1 };
      if (r.lifetimeMs) req.lifetimeMs = r.lifetimeMs as number;
      if (r.runId) req.runId = r.runId as string;
      if (r.workdir) req.workdir = r.workdir as string;
      return recordToWire(await agent.create(req));
    }),
    exec: execHandler(agent),
    stop: unary(async (r) => {
      const res = await agent.stop(r.id as string, { sync: !r.noSync });
      return { sandbox: recordToWire(res.sandbox), volumes: syncsToWire(res.volumes) };
    }),
    list: unary(async () => ({ sandboxes: (await agent.list()).map(recordToWire) })),
    putFile: unary(async (r) => {
      await agent.putFile(r.id as string, r.path as string, r.data as Buffer, r.mode ? { mode: r.mode as number } : {});
      return {};
    }),
    readFile: unary(async (r) => ({ data: await agent.readFile(r.id as string, r.path as string) })),
    syncVolumes: unary(async (r) => ({ volumes: syncsToWire(await agent.syncVolumes(r.id as string)) })),
    buildImage: unary(async (r) => agent.buildImage(parseSpec(r.imageSpecJson))),
    ping: unary(async () => ({ node: info.node ?? hostname(), pid: process.pid })),
  } as unknown as grpc.UntypedServiceImplementation);
  if (socketPath && existsSync(socketPath)) await unlink(socketPath);
  const port = await new Promise<number>((res, rej) =>
    server.bindAsync(grpcTarget(socketPath ?? address), grpc.ServerCredentials.createInsecure(), (e, p) => (e ? rej(AgentError.IO(`listen on ${address}`, e)) : res(p))),
  );
  let closing: Promise<void> | undefined;
  return {
    address: socketPath ?? address.replace(/:0$/, `:${port}`),
    close() {
      closing ??= (async () => {
        await Promise.race([new Promise<void>((res) => server.tryShutdown(() => res())), new Promise((res) => setTimeout(res, 2000).unref())]);
        server.forceShutdown();
        if (socketPath) await unlink(socketPath).catch(() => undefined);
      })();
      return closing;
    },
  };
}
