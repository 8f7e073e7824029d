/**
 * OCI bundles for runsc: a directory holding `config.json`, whose root is the image's shared
 * rootfs (runsc is run with `--overlay2=root:…`, so writes land in a per-sandbox overlay and the
 * rootfs stays untouched). The container's init is a long sleep; work runs with `runsc exec`.
 */
import { readFile } from "node:fs/promises";
import { isAbsolute, join } from "node:path";
import { AgentError } from "./errors.js";
import type { SandboxSpec } from "./runtime.js";

/** PATH given to every process unless the spec's env sets one. */
export const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** The CFS period the CPU quota is expressed in, in microseconds. */
export const CPU_PERIOD_US = 100_000;

/** Inputs of `bundleConfig` beyond the spec. */
export interface BundleOptions {
  /** cgroup path, relative to each controller's root, e.g. "/strata/ID". */
  cgroupsPath: string;
  /** Path of a network namespace to join (egress mode); none: runsc's `--network=none`. */
  netnsPath?: string;
  /** Numeric user the init and default exec run as. */
  uid: number;
  gid: number;
  /** The init process's argv. Default `["sleep", "infinity"]`. */
  init?: string[];
}

const CAPS = [
  "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
  "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
  "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
];

/** The environment of the sandbox as "K=V" strings, with a default PATH. */
export function envList(env: Record<string, string> | undefined): string[] {
  const merged: Record<string, string> = { PATH: DEFAULT_PATH, HOME: "/root", ...env };
  return Object.entries(merged).map(([k, v]) => `${k}=${v}`);
}

/**
 * The environment GPUs add for the NVIDIA user-space libraries in the image: which devices are
 * visible, and which driver features. Empty without GPUs.
 */
export function gpuEnv(spec: Pick<SandboxSpec, "gpus">): Record<string, string> {
  if (!spec.gpus?.uuids.length) return {};
  return { NVIDIA_VISIBLE_DEVICES: spec.gpus.uuids.join(","), NVIDIA_DRIVER_CAPABILITIES: "compute,utility" };
}

/** The OCI runtime config (config.json) for one sandbox. Throws INVALID_SPEC on bad paths or limits. */
export function bundleConfig(spec: SandboxSpec, opts: BundleOptions): Record<string, unknown> {
  if (!isAbsolute(spec.rootfs)) throw AgentError.INVALID_SPEC("rootfs", "must be an absolute path");
  const workdir = spec.workdir ?? "/";
  if (!isAbsolute(workdir)) throw AgentError.INVALID_SPEC("workdir", "must be an absolute path");
  const mounts: Record<string, unknown>[] = [
    { destination: "/proc", type: "proc", source: "proc" },
    { destination: "/dev", type: "tmpfs", source: "tmpfs", options: ["nosuid", "strictatime", "mode=755", "size=65536k"] },
    { destination: "/dev/pts", type: "devpts", source: "devpts", options: ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"] },
    { destination: "/dev/shm", type: "tmpfs", source: "shm", options: ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"] },
    { destination: "/sys", type: "sysfs", source: "sysfs", options: ["nosuid", "noexec", "nodev", "ro"] },
    { destination: "/tmp", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev", "mode=1777"] },
  ];
  for (const m of spec.mounts ?? []) {
    if (!isAbsolute(m.source)) throw AgentError.INVALID_SPEC(`mount ${m.source}`, "source must be an absolute path");
    if (!isAbsolute(m.destination) || m.destination === "/") {
      throw AgentError.INVALID_SPEC(`mount ${m.destination}`, "destination must be an absolute path other than /");
    }
    mounts.push({ destination: m.destination, type: "bind", source: m.source, options: ["rbind", m.readOnly ? "ro" : "rw"] });
  }
  const resources: Record<string, unknown> = {};
  if (spec.cpu !== undefined) {
    if (!(spec.cpu > 0)) throw AgentError.INVALID_SPEC("cpu", "must be a positive number of cores");
    resources.cpu = { quota: Math.max(1000, Math.round(spec.cpu * CPU_PERIOD_US)), period: CPU_PERIOD_US };
  }
  if (spec.memoryBytes !== undefined) {
    if (!(spec.memoryBytes >= 16 * 1024 * 1024)) throw AgentError.INVALID_SPEC("memoryBytes", "must be at least 16 MiB");
    resources.memory = { limit: Math.floor(spec.memoryBytes) };
  }
  if (spec.pidsLimit !== undefined) {
    if (!(spec.pidsLimit >= 8)) throw AgentError.INVALID_SPEC("pidsLimit", "must be at least 8");
    resources.pids = { limit: Math.floor(spec.pidsLimit) };
  }
  const namespaces: Record<string, string>[] = [{ type: "pid" }, { type: "ipc" }, { type: "uts" }, { type: "mount" }];
  namespaces.push(opts.netnsPath ? { type: "network", path: opts.netnsPath } : { type: "network" });
  return {
    ociVersion: "1.0.2",
    process: {
      terminal: false,
      user: { uid: opts.uid, gid: opts.gid },
      args: opts.init ?? ["sleep", "infinity"],
      env: envList({ ...gpuEnv(spec), ...spec.env }),
      cwd: workdir,
      capabilities: { bounding: CAPS, effective: CAPS, permitted: CAPS },
      rlimits: [{ type: "RLIMIT_NOFILE", hard: 1048576, soft: 1048576 }],
      noNewPrivileges: true,
    },
    root: { path: spec.rootfs, readonly: false },
    hostname: "sandbox",
    mounts,
    linux: {
      cgroupsPath: opts.cgroupsPath, resources, namespaces,
      // nvproxy (runsc --nvproxy) serves the GPUs whose nodes are listed here; /dev/nvidiactl among them turns it on.
      ...(spec.gpus?.devices.length
        ? { devices: spec.gpus.devices.map((d) => ({ path: d.path, type: "c", major: d.major, minor: d.minor, fileMode: 0o666, uid: 0, gid: 0 })) }
        : {}),
    },
  };
}

/**
 * Resolves "uid[:gid]" or a user name (looked up in the rootfs's /etc/passwd) to numbers.
 * Fails INVALID_SPEC for an unknown name.
 */
export async function resolveUser(rootfs: string, user: string | undefined): Promise<{ uid: number; gid: number }> {
  if (user === undefined || user === "") return { uid: 0, gid: 0 };
  const [u, g] = user.split(":", 2) as [string, string | undefined];
  let uid: number | undefined = /^\d+$/.test(u) ? Number(u) : undefined;
  let gid: number | undefined = g !== undefined && /^\d+$/.test(g) ? Number(g) : undefined;
  if (uid === undefined || (g !== undefined && gid === undefined) || gid === undefined) {
    const passwd = await readFile(join(rootfs, "etc/passwd"), "utf8").catch(() => "");
    const groups = await readFile(join(rootfs, "etc/group"), "utf8").catch(() => "");
    if (uid === undefined) {
      const row = passwd.split("\n").map((l) => l.split(":")).find((f) => f[0] === u);
      if (!row) throw AgentError.INVALID_SPEC(`user ${JSON.stringify(user)}`, "no such user in the image's /etc/passwd");
      uid = Number(row[2]);
      if (g === undefined) gid = Number(row[3]);
    } else if (g === undefined) {
      const row = passwd.split("\n").map((l) => l.split(":")).find((f) => f[2] === String(uid));
      gid = row ? Number(row[3]) : uid;
    }
    if (gid === undefined && g !== undefined) {
      const row = groups.split("\n").map((l) => l.split(":")).find((f) => f[0] === g);
      if (!row) throw AgentError.INVALID_SPEC(`user ${JSON.stringify(user)}`, "no such group in the image's /etc/group");
      gid = Number(row[2]);
    }
  }
  return { uid, gid: gid ?? uid };
}
