/**
 * The `Runtime` seam: what the agent's gRPC service, the SDK's `Container` and `strata run` need
 * from a sandbox runtime. A caller produces a `SandboxSpec` (plain JSON), gets a handle back, and
 * from then on addresses the sandbox by id. `GvisorRuntime` is the implementation under runsc.
 */
import type { Readable, Writable } from "node:stream";

/** The network a sandbox gets. */
export type NetworkSpec =
  /** No interface but loopback (the default). */
  | { mode: "none" }
  /**
   * Outbound traffic only to `allow`: IPv4 addresses, CIDRs ("10.0.0.0/8") or host names, which
   * are resolved once, at create time, each optionally with ":PORT" (then only that TCP/UDP
   * port). Everything else, including the host itself, is dropped.
   */
  | { mode: "egress"; allow: string[] };

/** A host directory bind-mounted into the sandbox (a volume's FUSE mount, or any dir). */
export interface MountSpec {
  /** Absolute path of an existing directory on the host. */
  source: string;
  /** Absolute path inside the sandbox; created if the image lacks it. */
  destination: string;
  /** True: writes fail with EROFS inside the sandbox. Default false. */
  readOnly?: boolean;
}

/** A character device node as the OCI spec's `linux.devices` wants it. */
export interface DeviceNode {
  /** Absolute path, the same on the host and in the sandbox (e.g. /dev/nvidia0). */
  path: string;
  major: number;
  minor: number;
}

/** GPUs given to a sandbox (whole devices, through gVisor's nvproxy). */
export interface SandboxGpus {
  /** The GPUs' UUIDs, in index order: the sandbox's NVIDIA_VISIBLE_DEVICES. */
  uuids: string[];
  /** Device nodes to create in the sandbox: each GPU's /dev/nvidiaN plus the driver's control nodes. */
  devices: DeviceNode[];
}

/** Everything needed to start one sandbox; JSON-serialisable. */
export interface SandboxSpec {
  /** Id to use; must match /^[a-z0-9][a-z0-9_.-]{0,62}$/. Default: generated. */
  id?: string;
  /** Absolute path of the image's root filesystem; used read-only, shared between sandboxes. */
  rootfs: string;
  /** Environment of every process, on top of a default PATH. */
  env?: Record<string, string>;
  /** Working directory of exec'd processes. Default "/". */
  workdir?: string;
  /** "uid[:gid]" or a user name from the image's /etc/passwd. Default "0:0". */
  user?: string;
  /** CPU cores (fractional allowed, e.g. 0.5); enforced as a CFS quota. Default: unlimited. */
  cpu?: number;
  /** Memory limit in bytes, for the whole sandbox (gVisor's own memory included). Default: unlimited. */
  memoryBytes?: number;
  /** Maximum number of host tasks of the sandbox. Default: unlimited. */
  pidsLimit?: number;
  /** Milliseconds after start at which the sandbox is stopped. Default: no limit. */
  lifetimeMs?: number;
  /** Default `{ mode: "none" }`. */
  network?: NetworkSpec;
  /** GPUs; runsc then runs with `--nvproxy`. Default none. */
  gpus?: SandboxGpus;
  /** Bind mounts, in order. */
  mounts?: MountSpec[];
  /** Free-form labels, returned by `list()`. */
  labels?: Record<string, string>;
}

/**
 * Why a sandbox stopped running: asked to, its lifetime ended, killed for memory, its init died,
 * or stopped by a restarted agent because what it depended on (its volumes' FUSE mounts, served
 * by the previous agent process) died with that process.
 */
export type StopReason = "stopped" | "lifetime" | "oom" | "exited" | "agent_restart";

/**
 * What a runtime needs to find one of its sandboxes again from another process (JSON; the
 * agent stores it). `{ id, spec }` alone is a valid state: the runtime derives the rest.
 */
export interface SandboxState {
  id: string;
  spec: SandboxSpec;
  /** Anything else the runtime keeps (pid, bundle, start time…). */
  [key: string]: unknown;
}

/** How a sandbox ended; `oom` is true when the host killed it for exceeding `memoryBytes`. */
export interface SandboxExit {
  reason: StopReason;
  oom: boolean;
}

/** A sandbox as `list()` and `create()` describe it. */
export interface SandboxInfo {
  id: string;
  /** "running" until it stops for any reason, then "stopped". */
  state: "running" | "stopped";
  /** Milliseconds since the epoch at which it started. */
  startedAt: number;
  labels: Record<string, string>;
  /** Set once stopped. */
  exit?: SandboxExit;
}

/** What `create()` returns. */
export interface SandboxHandle extends SandboxInfo {
  /** Resolves (never rejects) once the sandbox no longer runs, whatever the reason. */
  exited: Promise<SandboxExit>;
}

/** What to run with `exec()`. */
export interface ExecOptions {
  /** The program and its arguments; argv[0] is looked up in PATH. Must not be empty. */
  argv: string[];
  /** Added to (and overriding) the sandbox's environment. */
  env?: Record<string, string>;
  /** Working directory; default the sandbox's workdir. */
  cwd?: string;
  /** "uid[:gid]"; default the sandbox's user. */
  user?: string;
  /** True: `stdin` is a writable pipe the caller must end; false (default): stdin is empty. */
  stdin?: boolean;
}

/** How an exec'd process ended. */
export interface ExecResult {
  /** The exit code; 128+N when the process died of signal N (the shell convention). */
  exitCode: number;
  /** The signal the caller sent with `kill()` when the process died of it. */
  signal?: NodeJS.Signals;
  /** True when the whole sandbox was killed for exceeding its memory limit. */
  oom: boolean;
}

/** A running process inside a sandbox. */
export interface ExecProcess {
  /** The process's stdout, byte for byte. */
  stdout: Readable;
  /** The process's stderr, byte for byte (runsc's own errors may appear here too). */
  stderr: Readable;
  /** Its stdin when `ExecOptions.stdin` was true, else null. */
  stdin: Writable | null;
  /** Sends a signal (default SIGTERM) to the process; no-op once it has ended. */
  kill(signal?: NodeJS.Signals): void;
  /** Resolves when it has ended and its output has been read to the end; never rejects. */
  wait(): Promise<ExecResult>;
}

/** Options of `stop()`. */
export interface StopOptions {
  /** Milliseconds between SIGTERM to every process and SIGKILL. Default 0 (kill at once). */
  graceMs?: number;
}

/**
 * A sandbox runtime. Ids are unique per runtime. Every method but `exec` is async; unknown ids
 * fail with `AgentError` code NOT_FOUND, a stopped sandbox with NOT_RUNNING.
 */
export interface Runtime {
  /** Creates and starts a sandbox; resolves once a first `exec` can run. Fails INVALID_SPEC or RUNTIME. */
  create(spec: SandboxSpec): Promise<SandboxHandle>;
  /** Starts a process in a running sandbox; throws NOT_FOUND / NOT_RUNNING synchronously. */
  exec(id: string, opts: ExecOptions): ExecProcess;
  /** Stops a sandbox; resolves when nothing in it runs any more (cleanup continues in the background). Idempotent. */
  stop(id: string, opts?: StopOptions): Promise<void>;
  /** Every sandbox this runtime created that has not been stopped for longer than a moment, newest last. */
  list(): Promise<SandboxInfo[]>;
  /** One sandbox's state; NOT_FOUND if unknown. */
  info(id: string): Promise<SandboxInfo>;
  /** Writes a file inside the sandbox's own filesystem (not a volume's host dir), creating parents. */
  putFile(id: string, path: string, data: Buffer | string, opts?: { mode?: number }): Promise<void>;
  /** Reads a file inside the sandbox; fails NOT_FOUND (with `path` set) when it does not exist. */
  readFile(id: string, path: string): Promise<Buffer>;
  /** Stops every sandbox and waits for all background cleanup to finish. Idempotent. */
  close(): Promise<void>;
  /** The durable state of a sandbox it runs, for `adopt`/`discard` in a later process; NOT_FOUND if unknown. */
  state(id: string): Promise<SandboxState>;
  /**
   * Takes over a sandbox that an earlier process (of the same runtime configuration) started:
   * when it still runs, it becomes this runtime's (exec, stop, list; its lifetime still counts
   * from its start) and its handle is returned; when it no longer runs, what is left of it is
   * removed and null returned. Fails ALREADY_EXISTS when this runtime already has the id.
   */
  adopt(state: SandboxState): Promise<SandboxHandle | null>;
  /** Kills a sandbox an earlier process started (if it still runs) and removes what is left of it. Idempotent; never rejects. */
  discard(state: SandboxState): Promise<void>;
  /**
   * Called once a new process has adopted or discarded every sandbox an earlier one left: puts
   * back host-wide settings that no remaining sandbox needs (an earlier process may have died
   * before it could). Idempotent; never rejects.
   */
  settle(): Promise<void>;
}
