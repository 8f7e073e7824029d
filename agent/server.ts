/**
 * The node agent: `AgentService` owns this node's sandboxes, the FUSE mounts of their volumes
 * (a mount needs a live serving process, so the agent is a long-lived one) and its GPUs, and
 * `serveAgent` exposes any `AgentClient` over gRPC (proto/agent.proto).
 *
 * Layout under `stateDir`: `mounts/<sandbox id>/<n>/` the host mount point of the sandbox's n-th
 * volume, bind-mounted into its bundle; `sandboxes.db` the durable records (sandbox-store.ts).
 * Invariants: a sandbox's volumes are mounted before it starts and unmounted only after nothing
 * in it runs; a stop syncs every writable volume (provenance labels `sandbox` and `run`) before it
 * unmounts, unless asked not to, in which case the staged writes are discarded. A sandbox that
 * ends by itself (lifetime, OOM, its init dying) is stopped the same way, with a sync. A mount
 * point directory is removed with rmdir only, never recursively: a mount that failed to detach
 * must not have its volume's files deleted through it.
 *
 * After a crash (kill -9 included), `recover()` in the next agent process reads the records:
 * - a running sandbox without volumes is adopted: listed, exec and stop work, its lifetime still
 *   ends it, its GPUs stay reserved;
 * - a sandbox with volumes is stopped (reason "agent_restart"): its volumes were FUSE mounts
 *   served by the dead process, and a bind mount of a dead FUSE connection inside a running
 *   sandbox cannot be revived (a new mount at the same host path is a new file system the
 *   sandbox's gofer never sees), so it could only ever read "transport endpoint is not
 *   connected" there. Its dead mount points are detached, and each writable volume's staged
 *   writes (they survive the crash in `<stagingRoot>/<env>/<volume>/`, which this code never
 *   deletes) are synced as its stop would have done; if that sync fails they stay staged and
 *   the next mount of the volume recovers them;
 * - a sandbox that died meanwhile, or whose create or stop the crash interrupted, is cleaned up
 *   the same way (runsc state, network, bundle, mount points, staged writes synced);
 * - the forks an interrupted create made (its record names them from before they were made) are
 *   deleted when nothing was written to them and no other sandbox uses them; one that has
 *   versions beyond the fork point (someone committed to it meanwhile) is kept and reported;
 * - then the runtime puts back host settings no remaining sandbox needs (`Runtime.settle`:
 *   net.ipv4.ip_forward once no egress sandbox is left).
 */
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readdir, rmdir, unlink } from "node:fs/promises";
import { hostname } from "node:os";
import { isAbsolute, join, posix } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { isCode } from "../metadata/index.js";
import type { FileCopyCache, FuseMount, MountedVolume, MountFs, Repository } from "../volumefs/index.js";

/**
 * The storage layer, loaded when the agent first mounts a volume: `agent/index.ts` is also the
 * client's entry, and a `strata run` process must not pay for loading S3, SQLite and FUSE code.
 */
const volumefs = () => import("../volumefs/index.js");
import {
  ERROR_METADATA_KEY,
  grpcTarget,
  loadAgentService,
  networkFromWire,
  recordToWire,
  syncsToWire,
  toWireError,
  type AgentClient,
  type BuildImageResult,
  type CreateSandboxRequest,
  type SandboxRecord,
  type StopSandboxResult,
  type VolumeSyncResult,
} from "./client.js";
import { AgentError } from "./errors.js";
import { GpuAllocator, NvidiaGpuInventory, sandboxGpus, type GpuAllocation, type GpuInventory } from "./gpu.js";
import { sandboxSpecFor, type ImageBuilder, type ImageSpec } from "./image.js";
import { parseEgressEntry } from "./network.js";
import type { ExecOptions, ExecProcess, NetworkSpec, Runtime, SandboxExit, SandboxHandle, SandboxState } from "./runtime.js";
import { SqliteSandboxStore, type PendingFork, type SandboxStore, type StoredSandbox } from "./sandbox-store.js";

/** Options of `AgentService`. */
export interface AgentServiceOptions {
  /** The sandbox runtime (a `GvisorRuntime` in production). */
  runtime: Runtime;
  /** Builds and caches images. */
  images: ImageBuilder;
  /** The store volumes live in. */
  repo: Repository;
  /** Where mount points and the sandbox records live; created if missing. */
  stateDir: string;
  /** Staging directories of mounted volumes (e.g. $STRATA_HOME/staging). */
  stagingRoot: string;
  /** Whole-file copies of stored files that volume mounts let the kernel read (MountedVolumeOptions.copies). */
  copies?: FileCopyCache;
  /** This node's name in records. Default the host name. */
  node?: string;
  /** This node's GPUs. Default `NvidiaGpuInventory` (nvidia-smi and /dev/nvidia*; none on a node without). */
  gpus?: GpuInventory;
  /** Where sandbox records are kept. Default `SqliteSandboxStore` at `<stateDir>/sandboxes.db`. */
  store?: SandboxStore;
  /** How long a stopped sandbox stays listed, in ms. Default 10 minutes. */
  keepStoppedMs?: number;
}

/** What `recover()` found. */
export interface RecoveryReport {
  /** Sandboxes still running and now served by this agent. */
  adopted: string[];
  /** Sandboxes stopped or found dead, and cleaned up (their volumes' staged writes synced). */
  cleaned: string[];
  /** Sandboxes that could not be cleaned up now (their records stay for the next start), with why. */
  failed: { id: string; error: string }[];
  /** Forks made for sandboxes whose create the crash interrupted, deleted: nothing was written to them. */
  forksDeleted: string[];
  /** Such forks kept, with why: they have versions beyond the fork point, or another sandbox mounts them. */
  forksKept: { volume: string; sandbox: string; reason: string }[];
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
  phase: StoredSandbox["phase"];
  runtime: SandboxState | null;
  deadline: number | null;
  syncOnStop: boolean;
  gpus?: GpuAllocation;
  /** The forks its create makes (saved before the first is made); emptied once it runs. */
  forks: PendingFork[];
  stopping?: Promise<StopSandboxResult>;
}

function checkNetwork(n: NetworkSpec | undefined): NetworkSpec {
  if (n === undefined || n.mode === "none") return { mode: "none" };
  if (n.mode !== "egress") throw AgentError.INVALID_SPEC(`network mode ${JSON.stringify((n as { mode: unknown }).mode)}`, 'use "none" or "egress"');
  if (!Array.isArray(n.allow) || !n.allow.every((a) => typeof a === "string" && a.length > 0)) {
    throw AgentError.INVALID_SPEC("network allow", "must be a list of addresses, CIDRs or host names, each optionally with :PORT");
  }
  // The syntax of each entry now, before create has built, forked or mounted anything.
  for (const a of n.allow) parseEgressEntry(a);
  return { mode: "egress", allow: [...n.allow] };
}

/** The node agent in-process: an `AgentClient` whose sandboxes run here. */
export class AgentService implements AgentClient {
  private readonly sandboxes = new Map<string, Entry>();
  private readonly node: string;
  private readonly gpus: GpuAllocator;
  private readonly store: SandboxStore;
  private closed = false;

  constructor(private readonly opts: AgentServiceOptions) {
    this.node = opts.node ?? hostname();
    this.gpus = new GpuAllocator(opts.gpus ?? new NvidiaGpuInventory());
    this.store = opts.store ?? new SqliteSandboxStore(join(opts.stateDir, "sandboxes.db"));
  }

  /**
   * Takes over what an earlier agent process on the same state directory left (see the file's
   * doc): adopts running sandboxes without volumes, stops and cleans up the rest. Call once,
   * before serving. Never fails for one sandbox: a sandbox that cannot be cleaned keeps its record
   * for the next attempt.
   */
  async recover(): Promise<RecoveryReport> {
    const report: RecoveryReport = { adopted: [], cleaned: [], failed: [], forksDeleted: [], forksKept: [] };
    const stored = await this.store.all();
    for (const s of stored) {
      const id = s.record.id;
      if (this.sandboxes.has(id)) continue;
      try {
        let wasRunning = false;
        if (s.phase === "running" && s.runtime) {
          const handle = await this.opts.runtime.adopt(s.runtime);
          if (handle && s.record.volumes.length === 0) {
            await this.adopt(s, handle);
            report.adopted.push(id);
            continue;
          }
          if (handle) {
            wasRunning = true;
            await this.opts.runtime.stop(id);
          }
        } else {
          await this.opts.runtime.discard(s.runtime ?? { id, spec: { rootfs: "/" } });
        }
        const reason = s.record.exit?.reason ?? (s.phase === "stopping" ? "stopped" : wasRunning ? "agent_restart" : "exited");
        await this.cleanUp(s, { reason, oom: s.record.exit?.oom ?? false }, stored, report);
        report.cleaned.push(id);
      } catch (err) {
        report.failed.push({ id, error: toWireError(err).message });
      }
    }
    await this.opts.runtime.settle();
    return report;
  }

  private async adopt(s: StoredSandbox, handle: SandboxHandle): Promise<void> {
    const id = s.record.id;
    const entry: Entry = { record: { ...s.record, state: "running" }, mounts: [], phase: "running", runtime: s.runtime, deadline: s.deadline, syncOnStop: s.syncOnStop, forks: [] };
    if (s.record.gpu && s.gpuUuids.length) {
      entry.gpus = await this.gpus.reserve(id, s.record.gpu.type, s.gpuUuids);
      entry.record.gpu = { ...s.record.gpu, devices: entry.gpus.devices.map((d) => ({ index: d.index, uuid: d.uuid, name: d.name })) };
    }
    this.sandboxes.set(id, entry);
    entry.runtime = await this.opts.runtime.state(id).catch(() => s.runtime);
    await this.save(entry);
    this.watchExit(entry, handle);
  }

  /**
   * Removes the mount points of a sandbox of an earlier process that no longer runs, syncs its
   * volumes' staged writes, drops the forks its unfinished create made (`dropFork`), forgets its
   * record. `stored` is every record recovery found.
   */
  private async cleanUp(s: StoredSandbox, exit: SandboxExit, stored: StoredSandbox[], report: RecoveryReport): Promise<void> {
    const id = s.record.id;
    const root = join(this.opts.stateDir, "mounts", id);
    for (const n of await readdir(root).catch(() => [] as string[])) {
      const dir = join(root, n);
      await (await volumefs()).forceUnmount(dir);
      await rmdir(dir).catch(() => undefined);
    }
    await rmdir(root).catch(() => undefined);
    const volumes: VolumeSyncResult[] = [];
    for (const v of s.record.volumes) if (!v.readOnly && !v.at) volumes.push(await this.recoverVolume(s, v.name));
    for (const f of s.forks) await this.dropFork(s, f, stored, report);
    await this.store.delete(id);
    const record: SandboxRecord = { ...s.record, state: "stopped", exit, ...(s.record.gpu ? { gpu: { ...s.record.gpu, devices: [] } } : {}) };
    const entry: Entry = { record, mounts: [], phase: "stopping", runtime: null, deadline: null, syncOnStop: false, forks: [] };
    entry.stopping = Promise.resolve({ sandbox: record, volumes });
    this.sandboxes.set(id, entry);
    this.forgetLater(entry);
  }

  /**
   * Deletes fork `f` that the unfinished create of sandbox `s` made, when it is that fork (forked
   * from `f.from`, created after the intent), no other sandbox's record names it, and it has no
   * version beyond the fork point; a fork with new versions is kept and reported. A fork that was
   * never made, or a volume of that name that is not this fork, is left alone. Fails (and the
   * record stays for the next start) only when the store cannot be read or written.
   */
  private async dropFork(s: StoredSandbox, f: PendingFork, stored: StoredSandbox[], report: RecoveryReport): Promise<void> {
    const keep = (reason: string) => report.forksKept.push({ volume: f.volume, sandbox: s.record.id, reason });
    const user = stored.find((o) => o.record.id !== s.record.id && (o.record.volumes.some((v) => v.name === f.volume) || o.forks.some((g) => g.volume === f.volume)))
      ?? [...this.sandboxes.values()].find((e) => e.record.id !== s.record.id && e.record.state !== "stopped" && e.record.volumes.some((v) => v.name === f.volume));
    let v;
    try {
      v = await this.opts.repo.volume(f.volume);
    } catch (err) {
      if (isCode(err, "UNKNOWN_VOLUME")) return;
      throw err;
    }
    if (v.forkedFrom?.volume !== f.from || v.createdAt < f.since) return;
    if (user) return void keep(`sandbox ${JSON.stringify(user.record.id)} uses it`);
    if (v.seq !== 0 || v.head !== v.forkedFrom.version) return void keep("it has versions beyond the fork point");
    // Its staging directory goes with it (else it stays on the host, and a later volume of the
    // name would start by setting it aside).
    try {
      (await volumefs()).StagingDir.remove(this.opts.stagingRoot, this.opts.repo.env, f.volume, false);
    } catch (err) {
      if (isCode(err, "CONFLICT") || isCode(err, "ALREADY_EXISTS")) return void keep("changes are staged for it on this host");
      throw err;
    }
    await this.opts.repo.deleteVolume(f.volume);
    report.forksDeleted.push(f.volume);
  }

  /** Syncs (or, after a stop without sync, drops) the staged writes a dead sandbox left in volume `name`. */
  private async recoverVolume(s: StoredSandbox, name: string): Promise<VolumeSyncResult> {
    const labels = { sandbox: s.record.id, run: s.record.runId };
    let fs: MountedVolume | undefined;
    try {
      fs = await (await volumefs()).MountedVolume.open({ repo: this.opts.repo, volume: name, stagingRoot: this.opts.stagingRoot, labels });
      if (!s.syncOnStop) {
        await fs.reload({ discard: true });
        return { name, version: null, changed: false };
      }
      const r = await fs.sync({ labels, message: `sandbox ${s.record.id} (after agent restart)` });
      return { name, version: r.version, changed: r.changed };
    } catch (err) {
      return { name, version: null, changed: false, error: toWireError(err).message };
    } finally {
      await fs?.close().catch(() => undefined);
    }
  }

  async create(req: CreateSandboxRequest): Promise<SandboxRecord> {
    if (this.closed) throw AgentError.RUNTIME("create sandbox", new Error("agent is shutting down"));
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
    const network = checkNetwork(req.network);
    const gpuReq = req.gpu && req.gpu.count > 0 ? req.gpu : undefined;
    const entry: Entry = {
      record: {
        id, node: this.node, state: "running", image: "", cpu: req.cpu || null, memoryBytes: req.memoryBytes || null,
        gpu: null, volumes: [], startedAt: Date.now(), runId: req.runId || id, labels: { ...req.labels }, network,
      },
      mounts: [], phase: "creating", runtime: null, deadline: null, syncOnStop: true,
      forks: volumes.filter((v) => v.forkFrom).map((v) => ({ volume: v.name, from: v.forkFrom!, since: Date.now() })),
    };
    this.sandboxes.set(id, entry);
    const forked: string[] = [];
    let saved = false;
    try {
      if (gpuReq) {
        entry.gpus = await this.gpus.allocate(id, gpuReq.type, gpuReq.count);
        entry.record.gpu = { type: gpuReq.type, count: gpuReq.count, devices: entry.gpus.devices.map((d) => ({ index: d.index, uuid: d.uuid, name: d.name })) };
      }
      const image = await this.opts.images.build(req.image);
      entry.record.image = image.hash;
      const runId = entry.record.runId;
      const labels = { sandbox: id, run: runId };
      await this.save(entry);
      saved = true;
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
        const { MountedVolume, mountFs } = await volumefs();
        const fs = await MountedVolume.open({
          repo: this.opts.repo, volume: v.name, at: v.at || undefined, readOnly, stagingRoot: this.opts.stagingRoot, labels, mountpoint: dir, copies: this.opts.copies,
        });
        let fuse: FuseMount;
        try {
          fuse = await mountFs(fs, dir, { readOnly, immutable: !!v.at, name: `strata-${v.name}`, prepareNext: true });
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
        id, env: req.env, labels: req.labels, network,
        mounts: entry.mounts.map((m, i) => ({ source: m.dir, destination: entry.record.volumes[i]!.path, readOnly: !m.writable })),
        ...(req.cpu ? { cpu: req.cpu } : {}),
        ...(req.memoryBytes ? { memoryBytes: req.memoryBytes } : {}),
        ...(req.lifetimeMs ? { lifetimeMs: req.lifetimeMs } : {}),
        ...(req.workdir ? { workdir: req.workdir } : {}),
        ...(entry.gpus ? { gpus: sandboxGpus(entry.gpus) } : {}),
      });
      // Saved before runsc runs: a crash from here on leaves a record the next agent cleans up by.
      // The first save, above, came before any fork: a crash after a fork leaves it in `forks`.
      entry.runtime = { id, spec };
      await this.save(entry);
      const handle = await this.opts.runtime.create(spec);
      entry.record.startedAt = handle.startedAt;
      entry.deadline = req.lifetimeMs ? handle.startedAt + req.lifetimeMs : null;
      entry.runtime = await this.opts.runtime.state(id).catch(() => entry.runtime);
      entry.phase = "running";
      entry.forks = [];
      await this.save(entry);
      this.watchExit(entry, handle);
    } catch (err) {
      this.sandboxes.delete(id);
      this.gpus.release(id);
      for (const m of entry.mounts) await m.fuse.unmount().catch(() => undefined);
      await this.removeMountDirs(id);
      for (const name of forked) {
        await volumefs().then((v) => v.StagingDir.remove(this.opts.stagingRoot, this.opts.repo.env, name, true)).catch(() => undefined);
        await this.opts.repo.deleteVolume(name).catch(() => undefined);
      }
      if (saved) await this.store.delete(id).catch(() => undefined);
      throw err;
    }
    return structuredClone(entry.record);
  }

  private watchExit(entry: Entry, handle: SandboxHandle): void {
    void handle.exited.then((exit: SandboxExit) => {
      entry.record.exit = exit;
      if (!entry.stopping && !this.closed) void this.stop(entry.record.id).catch(() => undefined);
    });
  }

  private async save(entry: Entry): Promise<void> {
    await this.store.put({
      record: entry.record, phase: entry.phase, mounts: entry.mounts.map((m) => ({ name: m.name, dir: m.dir, writable: m.writable })),
      gpuUuids: entry.gpus?.devices.map((d) => d.uuid) ?? [], deadline: entry.deadline, syncOnStop: entry.syncOnStop, runtime: entry.runtime,
      forks: entry.forks,
    });
  }

  private async removeMountDirs(id: string): Promise<void> {
    const root = join(this.opts.stateDir, "mounts", id);
    for (const n of await readdir(root).catch(() => [] as string[])) await rmdir(join(root, n)).catch(() => undefined);
    await rmdir(root).catch(() => undefined);
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
    entry.phase = "stopping";
    entry.syncOnStop = sync;
    await this.save(entry).catch(() => undefined);
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
    await this.removeMountDirs(rec.id);
    this.gpus.release(rec.id);
    if (rec.gpu) rec.gpu = { ...rec.gpu, devices: [] };
    rec.state = "stopped";
    rec.exit ??= { reason: "stopped", oom: false };
    await this.store.delete(rec.id).catch(() => undefined);
    this.forgetLater(entry);
    return { sandbox: structuredClone(rec), volumes };
  }

  private forgetLater(entry: Entry): void {
    setTimeout(() => {
      if (this.sandboxes.get(entry.record.id) === entry) this.sandboxes.delete(entry.record.id);
    }, this.opts.keepStoppedMs ?? 600_000).unref();
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
    return [...this.sandboxes.values()].filter((e) => e.phase !== "creating").map((e) => structuredClone(e.record));
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

  /** Stops every sandbox (syncing its volumes), then the runtime, then closes the records. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all([...this.sandboxes.values()].map((e) => (e.stopping ??= this.finish(e, true)).catch(() => undefined)));
    await this.opts.runtime.close();
    await this.store.close();
  }

  private entry(id: string, op: string): Entry {
    const e = this.sandboxes.get(id);
    if (!e || e.phase === "creating") throw AgentError.NOT_FOUND(id, op);
    return e;
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
      if (r.network) req.network = networkFromWire(r.network);
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
