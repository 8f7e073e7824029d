/**
 * `GvisorRuntime`: sandboxes under runsc, one OCI bundle each.
 *
 * Layout under `stateDir`:
 * - `runsc/`          runsc's `--root` (its own state files);
 * - `bundles/<id>/`   config.json of each sandbox (the rootfs is the image's, shared, read-only;
 *                     writes go to a `--overlay2=root:memory` overlay counted in the sandbox's memory).
 * Host cgroups (v1): `<cgroupParent>/<id>` in every controller, created by runsc from
 * `linux.cgroupsPath`; `memory.oom_control`'s `oom_kill` there tells an OOM death.
 * Every runsc command of one sandbox gets the same global flags (runsc re-reads them each time).
 * A sandbox is "running" from `create` until `stop`, its lifetime, OOM or its init dying; after
 * that, `runsc delete`, network teardown and removal of the bundle run in the background.
 * Sandboxes outlive this object's process (runsc detaches them): `state()` describes one as JSON,
 * and a later GvisorRuntime on the same `stateDir` takes it over with `adopt()` (it asks
 * `runsc state` whether it still runs) or removes its remains with `discard()`.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { constants as osConstants } from "node:os";
import { join, resolve } from "node:path";
import { bundleConfig, envList, gpuEnv, resolveUser } from "./bundle.js";
import { AgentError } from "./errors.js";
import { commandError, runCommand } from "./exec-util.js";
import { findEgress, restoreForwarding, setupEgress, teardownEgress, type EgressNetwork } from "./network.js";
import type {
  ExecOptions,
  ExecProcess,
  ExecResult,
  Runtime,
  SandboxExit,
  SandboxHandle,
  SandboxInfo,
  SandboxSpec,
  SandboxState,
  StopOptions,
  StopReason,
} from "./runtime.js";

/** Options of `GvisorRuntime`. */
export interface GvisorRuntimeOptions {
  /** Directory for runsc state and bundles; created if missing. Required. */
  stateDir: string;
  /** The runsc binary. Default "runsc" (on PATH). */
  runsc?: string;
  /** Where each sandbox's root overlay lives: "memory" (default) or a host directory. */
  overlay?: "memory" | string;
  /** cgroup parent of every sandbox, relative to each controller root. Default "/strata". */
  cgroupParent?: string;
  /** Extra global runsc flags (e.g. ["--platform=kvm"]). Default none. */
  runscFlags?: string[];
  /** How often to check that sandboxes still run, in ms. Default 250. */
  watchIntervalMs?: number;
  /** How long a stopped sandbox stays visible to `list()`/`info()`, in ms. Default 10 minutes. */
  keepStoppedMs?: number;
}

interface Sandbox {
  id: string;
  spec: SandboxSpec;
  flags: string[];
  bundle: string;
  cgroup: string;
  startedAt: number;
  labels: Record<string, string>;
  uid: number;
  gid: number;
  pid: number;
  net?: EgressNetwork;
  exit?: SandboxExit;
  resolveExit: (e: SandboxExit) => void;
  exited: Promise<SandboxExit>;
  stopping?: Promise<void>;
  lifetime?: NodeJS.Timeout;
  teardown?: Promise<void>;
}

const ID_RE = /^[a-z0-9][a-z0-9_.-]{0,62}$/;

/** The `Runtime` under gVisor's runsc. Needs root, cgroups v1, and runsc from Debian 13. */
export class GvisorRuntime implements Runtime {
  private readonly opts: Required<Omit<GvisorRuntimeOptions, "runscFlags">> & { runscFlags: string[] };
  private readonly sandboxes = new Map<string, Sandbox>();
  private readonly background = new Set<Promise<void>>();
  private watcher: NodeJS.Timeout | undefined;
  private closed = false;
  private execSeq = 0;

  constructor(opts: GvisorRuntimeOptions) {
    this.opts = {
      stateDir: resolve(opts.stateDir),
      runsc: opts.runsc ?? "runsc",
      overlay: opts.overlay ?? "memory",
      cgroupParent: opts.cgroupParent ?? "/strata",
      runscFlags: opts.runscFlags ?? [],
      watchIntervalMs: opts.watchIntervalMs ?? 250,
      keepStoppedMs: opts.keepStoppedMs ?? 600_000,
    };
  }

  /** The runsc argv prefix (binary and global flags) that every command of a sandbox with `spec` uses. */
  runscArgv(spec: Pick<SandboxSpec, "network" | "gpus">): string[] {
    const overlay = this.opts.overlay === "memory" ? "root:memory" : `root:${resolve(this.opts.overlay)}`;
    return [
      this.opts.runsc,
      `--root=${join(this.opts.stateDir, "runsc")}`,
      `--overlay2=${overlay}`,
      `--network=${spec.network?.mode === "egress" ? "sandbox" : "none"}`,
      ...(spec.gpus?.devices.length ? ["--nvproxy"] : []),
      ...this.opts.runscFlags,
    ];
  }

  async create(spec: SandboxSpec): Promise<SandboxHandle> {
    if (this.closed) throw AgentError.RUNTIME("create sandbox", new Error("runtime is closed"));
    const id = spec.id ?? `sb-${randomBytes(6).toString("hex")}`;
    if (!ID_RE.test(id)) throw AgentError.INVALID_SPEC(`id ${JSON.stringify(id)}`, "use 1-63 of a-z, 0-9, '_', '.', '-'");
    if (this.sandboxes.has(id)) throw AgentError.ALREADY_EXISTS(id);
    if (spec.lifetimeMs !== undefined && !(spec.lifetimeMs > 0)) throw AgentError.INVALID_SPEC("lifetimeMs", "must be positive");
    if (spec.network?.mode === "egress" && !Array.isArray(spec.network.allow)) {
      throw AgentError.INVALID_SPEC("network.allow", "must be a list");
    }
    const { uid, gid } = await resolveUser(spec.rootfs, spec.user);
    const cgroup = `${this.opts.cgroupParent.replace(/\/$/, "")}/${id}`;
    const bundle = join(this.opts.stateDir, "bundles", id);
    const flags = this.runscArgv(spec);
    let resolveExit!: (e: SandboxExit) => void;
    const exited = new Promise<SandboxExit>((r) => (resolveExit = r));
    const sb: Sandbox = {
      id, spec, flags, bundle, cgroup, uid, gid, pid: 0, resolveExit, exited,
      startedAt: Date.now(), labels: { ...spec.labels },
    };
    this.sandboxes.set(id, sb);
    try {
      if (spec.network?.mode === "egress") sb.net = await setupEgress(id, spec.network.allow);
      const config = bundleConfig(spec, { cgroupsPath: cgroup, netnsPath: sb.net?.netnsPath, uid, gid });
      await mkdir(bundle, { recursive: true });
      await mkdir(join(this.opts.stateDir, "runsc"), { recursive: true });
      await writeFile(join(bundle, "config.json"), JSON.stringify(config, null, 1));
      const pidFile = join(bundle, "init.pid");
      if (sb.net) {
        // The network namespace needs runsc start under unshare (PLATFORM.md), so create and start apart.
        await this.runsc(sb, ["create", "--bundle", bundle, "--pid-file", pidFile, id], "create sandbox", true);
        const start = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs none /proc/sys/net && exec "$@"', "sh", ...flags, "start", id];
        const r = await runCommand(start);
        if (r.code !== 0) throw AgentError.RUNTIME(`start sandbox ${JSON.stringify(id)}`, commandError(["runsc", "start", id], r));
      } else {
        // One runsc process for create + start, and the pid from its pid file: cold start is on the hot path.
        await this.runsc(sb, ["run", "--detach", "--bundle", bundle, "--pid-file", pidFile, id], "start sandbox", true);
      }
      sb.pid = Number((await readFile(pidFile, "utf8")).trim());
    } catch (e) {
      this.sandboxes.delete(id);
      await this.cleanup(sb);
      throw e instanceof AgentError ? e : AgentError.RUNTIME(`create sandbox ${JSON.stringify(id)}`, e);
    }
    sb.startedAt = Date.now();
    if (spec.lifetimeMs !== undefined) {
      sb.lifetime = setTimeout(() => void this.halt(sb, "lifetime", 0), spec.lifetimeMs);
      sb.lifetime.unref();
    }
    this.ensureWatcher();
    return { ...this.describe(sb), exited };
  }

  exec(id: string, opts: ExecOptions): ExecProcess {
    const sb = this.running(id, "exec in sandbox");
    if (!opts.argv.length) throw AgentError.INVALID_SPEC("exec argv", "must not be empty");
    const env = envList({ ...gpuEnv(sb.spec), ...sb.spec.env, ...opts.env });
    const user = opts.user ?? `${sb.uid}:${sb.gid}`;
    const pidFile = join(sb.bundle, `exec-${++this.execSeq}.pid`);
    const argv = [
      ...sb.flags.slice(1), "exec", "--internal-pid-file", pidFile, "--cwd", opts.cwd ?? sb.spec.workdir ?? "/", "--user", user,
      ...env.flatMap((e) => ["--env", e]), id, ...opts.argv,
    ];
    const child = spawn(sb.flags[0]!, argv, { stdio: [opts.stdin ? "pipe" : "ignore", "pipe", "pipe"] });
    let sent: NodeJS.Signals | undefined;
    const done = new Promise<ExecResult>((resolveDone) => {
      let spawnError: Error | undefined;
      child.on("error", (e) => {
        spawnError = e;
      });
      child.on("close", (code, signal) => {
        void (async () => {
          const oom = await this.oomKilled(sb);
          if (oom) this.markExit(sb, "oom", true);
          await rm(pidFile, { force: true }).catch(() => undefined);
          const exitCode = code ?? (signal ? 128 + signalNumber(signal) : spawnError ? 127 : 1);
          const result: ExecResult = { exitCode, oom };
          if (sent && exitCode === 128 + signalNumber(sent)) result.signal = sent;
          resolveDone(result);
        })();
      });
    });
    child.stdin?.on("error", () => {});
    return {
      stdout: child.stdout!,
      stderr: child.stderr!,
      stdin: child.stdin ?? null,
      kill: (signal: NodeJS.Signals = "SIGTERM") => {
        if (child.exitCode !== null || child.signalCode !== null) return;
        sent = signal;
        void readFile(pidFile, "utf8").then(
          (pid) => runCommand([...sb.flags, "kill", "--pid", pid.trim(), id, signal]),
          () => child.kill(signal),
        );
      },
      wait: () => done,
    };
  }

  async stop(id: string, opts: StopOptions = {}): Promise<void> {
    const sb = this.sandboxes.get(id);
    if (!sb) throw AgentError.NOT_FOUND(id, "stop sandbox");
    await this.halt(sb, "stopped", opts.graceMs ?? 0);
  }

  async list(): Promise<SandboxInfo[]> {
    return [...this.sandboxes.values()].map((sb) => this.describe(sb));
  }

  async info(id: string): Promise<SandboxInfo> {
    const sb = this.sandboxes.get(id);
    if (!sb) throw AgentError.NOT_FOUND(id);
    return this.describe(sb);
  }

  async putFile(id: string, path: string, data: Buffer | string, opts: { mode?: number } = {}): Promise<void> {
    const mode = (opts.mode ?? 0o644).toString(8);
    const p = this.exec(id, {
      argv: ["sh", "-c", 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1" && chmod "$2" -- "$1"', "sh", path, mode],
      stdin: true,
    });
    const err = collect(p.stderr);
    p.stdout.resume();
    p.stdin!.end(data);
    const r = await p.wait();
    if (r.exitCode !== 0) {
      throw AgentError.IO(`put file ${JSON.stringify(path)} in sandbox ${JSON.stringify(id)}`, new Error((await err).toString().trim() || `exit code ${r.exitCode}`), { path });
    }
  }

  async readFile(id: string, path: string): Promise<Buffer> {
    const p = this.exec(id, { argv: ["cat", "--", path] });
    const [out, err, r] = await Promise.all([collect(p.stdout), collect(p.stderr), p.wait()]);
    if (r.exitCode === 0) return out;
    const text = err.toString().trim();
    if (/No such file or directory/.test(text)) {
      throw new AgentError("NOT_FOUND", `read file ${JSON.stringify(path)}: not found`, { op: "read file", path });
    }
    throw AgentError.IO(`read file ${JSON.stringify(path)} in sandbox ${JSON.stringify(id)}`, new Error(text || `exit code ${r.exitCode}`), { path });
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.sandboxes.values()].map((sb) => this.halt(sb, "stopped", 0)));
    while (this.background.size) await Promise.all([...this.background]);
    if (this.watcher) clearInterval(this.watcher);
    this.watcher = undefined;
  }

  async state(id: string): Promise<SandboxState> {
    const sb = this.sandboxes.get(id);
    if (!sb) throw AgentError.NOT_FOUND(id, "describe sandbox");
    return {
      id: sb.id, spec: sb.spec, flags: sb.flags, bundle: sb.bundle, cgroup: sb.cgroup, pid: sb.pid, uid: sb.uid, gid: sb.gid,
      startedAt: sb.startedAt, deadline: sb.spec.lifetimeMs !== undefined ? sb.startedAt + sb.spec.lifetimeMs : null,
      ...(sb.net ? { allowed: sb.net.allowed } : {}),
    };
  }

  async adopt(state: SandboxState): Promise<SandboxHandle | null> {
    if (this.closed) throw AgentError.RUNTIME("adopt sandbox", new Error("runtime is closed"));
    const { id, spec } = state;
    if (!ID_RE.test(id) || !spec || typeof spec.rootfs !== "string") throw AgentError.INVALID_SPEC(`state of sandbox ${JSON.stringify(id)}`, "needs a valid id and spec");
    if (this.sandboxes.has(id)) throw AgentError.ALREADY_EXISTS(id);
    const flags = this.stateFlags(state);
    const r = await runCommand([...flags, "state", id]).catch(() => undefined);
    let status = "";
    let pid = 0;
    try {
      const j = JSON.parse(r?.code === 0 ? r.stdout.toString() : "{}") as { status?: string; pid?: number };
      status = j.status ?? "";
      pid = j.pid ?? 0;
    } catch {
      status = "";
    }
    if (status !== "running" || !(pid > 0)) {
      await this.discard(state);
      return null;
    }
    let resolveExit!: (e: SandboxExit) => void;
    const exited = new Promise<SandboxExit>((res) => (resolveExit = res));
    const { uid, gid } = typeof state.uid === "number" && typeof state.gid === "number"
      ? { uid: state.uid, gid: state.gid }
      : await resolveUser(spec.rootfs, spec.user).catch(() => ({ uid: 0, gid: 0 }));
    const sb: Sandbox = {
      id, spec, flags, pid, uid, gid, resolveExit, exited,
      bundle: join(this.opts.stateDir, "bundles", id),
      cgroup: typeof state.cgroup === "string" ? state.cgroup : `${this.opts.cgroupParent.replace(/\/$/, "")}/${id}`,
      startedAt: typeof state.startedAt === "number" ? state.startedAt : Date.now(),
      labels: { ...spec.labels },
    };
    if (spec.network?.mode === "egress") sb.net = await findEgress(id, Array.isArray(state.allowed) ? (state.allowed as string[]) : spec.network.allow);
    this.sandboxes.set(id, sb);
    if (spec.lifetimeMs !== undefined) {
      const left = sb.startedAt + spec.lifetimeMs - Date.now();
      sb.lifetime = setTimeout(() => void this.halt(sb, "lifetime", 0), Math.max(0, left));
      sb.lifetime.unref();
    }
    this.ensureWatcher();
    return { ...this.describe(sb), exited };
  }

  async discard(state: SandboxState): Promise<void> {
    if (!ID_RE.test(state.id)) return;
    const flags = this.stateFlags(state);
    await runCommand([...flags, "kill", "--all", state.id, "SIGKILL"]).catch(() => undefined);
    await runCommand([...flags, "delete", "--force", state.id]).catch(() => undefined);
    await teardownEgress(state.id);
    await rm(join(this.opts.stateDir, "bundles", state.id), { recursive: true, force: true }).catch(() => undefined);
  }

  /** Restores net.ipv4.ip_forward when no egress sandbox is left on the host (network.ts). */
  async settle(): Promise<void> {
    await restoreForwarding();
  }

  /** The runsc flags a sandbox from an earlier process was started with (the stored ones, else derived from its spec). */
  private stateFlags(state: SandboxState): string[] {
    const stored = state.flags;
    return Array.isArray(stored) && stored.every((f) => typeof f === "string") && stored.length ? (stored as string[]) : this.runscArgv(state.spec ?? {});
  }

  private running(id: string, op: string): Sandbox {
    const sb = this.sandboxes.get(id);
    if (!sb) throw AgentError.NOT_FOUND(id, op);
    if (sb.exit) throw AgentError.NOT_RUNNING(id, op, sb.exit.reason);
    return sb;
  }

  private describe(sb: Sandbox): SandboxInfo {
    const info: SandboxInfo = { id: sb.id, state: sb.exit ? "stopped" : "running", startedAt: sb.startedAt, labels: { ...sb.labels } };
    if (sb.exit) info.exit = { ...sb.exit };
    return info;
  }

  private async runsc(sb: Sandbox, args: string[], op: string, detached = false): Promise<Buffer> {
    const argv = [...sb.flags, ...args];
    if (detached) {
      const code = await new Promise<number | null>((res, rej) => {
        const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
        const err: Buffer[] = [];
        child.stderr!.on("data", (b: Buffer) => err.push(b));
        child.on("error", rej);
        // "exit", not "close": `run --detach` leaves the sandbox holding stdio open. On failure, wait
        // for stderr's end, which may already have come (then there is no later "close" to wait for).
        child.on("exit", (c, signal) => {
          if (c === 0) return res(0);
          const fail = () => rej(AgentError.RUNTIME(`${op} ${JSON.stringify(sb.id)}`, new Error(Buffer.concat(err).toString().trim() || `runsc exited with ${c ?? signal}`)));
          if (child.stderr!.readableEnded || child.stderr!.destroyed) fail();
          else child.stderr!.once("close", fail);
        });
      });
      return Buffer.alloc(code ?? 0);
    }
    const r = await runCommand(argv);
    if (r.code !== 0) throw AgentError.RUNTIME(`${op} ${JSON.stringify(sb.id)}`, commandError(argv, r));
    return r.stdout;
  }

  private async oomKilled(sb: Sandbox): Promise<boolean> {
    const text = await readFile(`/sys/fs/cgroup/memory${sb.cgroup}/memory.oom_control`, "utf8").catch(() => "");
    const m = /oom_kill (\d+)/.exec(text);
    return m !== null && Number(m[1]) > 0;
  }

  private alive(sb: Sandbox): boolean {
    if (!sb.pid) return false;
    try {
      process.kill(sb.pid, 0);
      return true;
    } catch {
      return false;
    }
  }

  private ensureWatcher(): void {
    if (this.watcher) return;
    this.watcher = setInterval(() => void this.watch(), this.opts.watchIntervalMs);
    this.watcher.unref();
  }

  private async watch(): Promise<void> {
    for (const sb of this.sandboxes.values()) {
      if (sb.exit || !sb.pid) continue;
      const oom = await this.oomKilled(sb);
      if (oom || !this.alive(sb)) {
        this.markExit(sb, oom ? "oom" : "exited", oom);
        this.scheduleTeardown(sb);
      }
    }
  }

  private markExit(sb: Sandbox, reason: StopReason, oom: boolean): void {
    if (sb.exit) return;
    sb.exit = { reason, oom };
    if (sb.lifetime) clearTimeout(sb.lifetime);
    sb.resolveExit(sb.exit);
  }

  private halt(sb: Sandbox, reason: StopReason, graceMs: number): Promise<void> {
    if (sb.exit) {
      this.scheduleTeardown(sb);
      return sb.stopping ?? Promise.resolve();
    }
    sb.stopping ??= (async () => {
      if (graceMs > 0) {
        await runCommand([...sb.flags, "kill", "--all", sb.id, "SIGTERM"]);
        await Promise.race([sb.exited, new Promise((r) => setTimeout(r, graceMs).unref())]);
      }
      if (!sb.exit) {
        await runCommand([...sb.flags, "kill", "--all", sb.id, "SIGKILL"]);
        const oom = await this.oomKilled(sb);
        this.markExit(sb, oom ? "oom" : reason, oom);
      }
      this.scheduleTeardown(sb);
    })();
    return sb.stopping;
  }

  private scheduleTeardown(sb: Sandbox): void {
    if (sb.teardown) return;
    sb.teardown = (async () => {
      for (let i = 0; i < 200 && this.alive(sb); i++) await new Promise((r) => setTimeout(r, 50));
      await this.cleanup(sb);
      setTimeout(() => {
        if (this.sandboxes.get(sb.id) === sb) this.sandboxes.delete(sb.id);
      }, this.opts.keepStoppedMs).unref();
    })();
    const p = sb.teardown.finally(() => this.background.delete(p));
    this.background.add(p);
  }

  private async cleanup(sb: Sandbox): Promise<void> {
    await runCommand([...sb.flags, "delete", "--force", sb.id]).catch(() => undefined);
    await sb.net?.teardown();
    await rm(sb.bundle, { recursive: true, force: true }).catch(() => undefined);
  }
}

function signalNumber(signal: NodeJS.Signals): number {
  return (osConstants.signals as Record<string, number>)[signal] ?? 0;
}

function collect(stream: NodeJS.ReadableStream): Promise<Buffer> {
  return new Promise((res, rej) => {
    const chunks: Buffer[] = [];
    stream.on("data", (b: Buffer) => chunks.push(b));
    stream.on("end", () => res(Buffer.concat(chunks)));
    stream.on("error", rej);
  });
}
