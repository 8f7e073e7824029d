/**
 * GPUs of a node: what it has (`GpuInventory`, by default `NvidiaGpuInventory` from nvidia-smi
 * and the /dev/nvidia* device nodes), and which sandbox holds which (`GpuAllocator`).
 *
 * Types: a request names a product type such as "a100" or "H100"; it matches a GPU whose
 * normalised type (`gpuType`: the model without vendor words and suffixes, lowercase, e.g.
 * "NVIDIA A100-SXM4-40GB" → "a100", "NVIDIA GeForce RTX 4090" → "rtx4090") is the same, or whose
 * full product name, compacted, starts with the request and the request with its type (so
 * "a100-sxm4" matches "NVIDIA A100-SXM4-40GB" but "a10" does not match an A100).
 * A sandbox gets whole GPUs, never a share; under gVisor they reach it through nvproxy
 * (`runsc --nvproxy` plus the device nodes in the OCI spec), see bundle.ts.
 */
import { readdir, stat } from "node:fs/promises";
import { AgentError } from "./errors.js";
import { runCommand } from "./exec-util.js";
import type { DeviceNode, SandboxGpus } from "./runtime.js";

/** One GPU of the node. */
export interface GpuDevice {
  /** The driver's index (nvidia-smi's `index`, the N of /dev/nvidiaN). */
  index: number;
  /** The product name as the driver reports it, e.g. "NVIDIA A100-SXM4-40GB". */
  name: string;
  /** The normalised type requests match, e.g. "a100" (`gpuType(name)`). */
  type: string;
  /** The driver's UUID, e.g. "GPU-5a9e…". */
  uuid: string;
  /** Its device node. */
  device: DeviceNode;
}

/** What a node's GPUs look like to the agent. */
export interface GpuInventory {
  /** The node's GPUs, in index order; empty when it has none (never rejects for a GPU-less node). */
  devices(): Promise<GpuDevice[]>;
  /** The driver's control nodes every GPU sandbox also needs (/dev/nvidiactl, /dev/nvidia-uvm…). */
  controlDevices(): Promise<DeviceNode[]>;
}

/** GPUs given to a sandbox. */
export interface GpuAllocation {
  /** The requested type, as asked. */
  type: string;
  /** The GPUs, in index order. */
  devices: GpuDevice[];
  /** The control nodes to pass along with them. */
  control: DeviceNode[];
}

const VENDOR_WORDS = new Set(["nvidia", "tesla", "geforce", "quadro"]);

/** The normalised type of a product name: "NVIDIA A100-SXM4-40GB" → "a100", "Tesla T4" → "t4". */
export function gpuType(name: string): string {
  const tokens = name.toLowerCase().split(/[\s_-]+/).filter((t) => t && !VENDOR_WORDS.has(t));
  if (!tokens.length) return "";
  // "RTX 4090", "RTX A6000": a letters-only series word belongs to the model that follows it.
  const [first, second] = tokens as [string, string | undefined];
  const model = /^[a-z]+$/.test(first) && second !== undefined ? first + second : first;
  return model.replace(/[^a-z0-9]/g, "");
}

function compact(s: string): string {
  return s.toLowerCase().split(/[\s_-]+/).filter((t) => t && !VENDOR_WORDS.has(t)).join("").replace(/[^a-z0-9]/g, "");
}

/** True when a request for type `want` may be served by GPU `d` (see the file's doc). */
export function gpuMatches(want: string, d: Pick<GpuDevice, "name" | "type">): boolean {
  const w = compact(want);
  if (!w) return false;
  if (w === d.type) return true;
  return w.startsWith(d.type) && compact(d.name).startsWith(w);
}

/**
 * Parses `nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader` output into
 * (index, name, uuid) rows; lines that do not parse are skipped.
 */
export function parseNvidiaSmi(text: string): { index: number; name: string; uuid: string }[] {
  const out: { index: number; name: string; uuid: string }[] = [];
  for (const line of text.split("\n")) {
    const parts = line.split(",").map((p) => p.trim());
    if (parts.length < 3 || !/^\d+$/.test(parts[0]!)) continue;
    out.push({ index: Number(parts[0]), name: parts.slice(1, -1).join(","), uuid: parts.at(-1)! });
  }
  return out;
}

async function deviceNode(path: string): Promise<DeviceNode | undefined> {
  const st = await stat(path).catch(() => undefined);
  if (!st || !st.isCharacterDevice()) return undefined;
  const rdev = st.rdev;
  // Linux's dev_t encoding (glibc's gnu_dev_major/minor).
  const major = ((rdev >> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  return { path, major, minor };
}

/** Options of `NvidiaGpuInventory`. */
export interface NvidiaGpuInventoryOptions {
  /** The nvidia-smi binary. Default "nvidia-smi" (on PATH); absent: the node has no GPUs. */
  nvidiaSmi?: string;
  /** Where the device nodes are. Default "/dev". */
  devDir?: string;
}

/**
 * The node's NVIDIA GPUs: nvidia-smi's list, kept only where /dev/nvidia<index> exists as a
 * character device. Detected once, on first use. No nvidia-smi or no device nodes: no GPUs.
 */
export class NvidiaGpuInventory implements GpuInventory {
  private detected: Promise<{ devices: GpuDevice[]; control: DeviceNode[] }> | undefined;

  constructor(private readonly opts: NvidiaGpuInventoryOptions = {}) {}

  devices(): Promise<GpuDevice[]> {
    return this.detect().then((d) => d.devices);
  }

  controlDevices(): Promise<DeviceNode[]> {
    return this.detect().then((d) => d.control);
  }

  private detect(): Promise<{ devices: GpuDevice[]; control: DeviceNode[] }> {
    this.detected ??= (async () => {
      const dev = this.opts.devDir ?? "/dev";
      const nodes = (await readdir(dev).catch(() => [] as string[])).filter((n) => n.startsWith("nvidia"));
      if (!nodes.some((n) => /^nvidia\d+$/.test(n))) return { devices: [], control: [] };
      const r = await runCommand([this.opts.nvidiaSmi ?? "nvidia-smi", "--query-gpu=index,name,uuid", "--format=csv,noheader"]).catch(() => undefined);
      if (!r || r.code !== 0) return { devices: [], control: [] };
      const devices: GpuDevice[] = [];
      for (const row of parseNvidiaSmi(r.stdout.toString())) {
        const device = await deviceNode(`${dev}/nvidia${row.index}`);
        if (device) devices.push({ ...row, type: gpuType(row.name), device });
      }
      const control: DeviceNode[] = [];
      for (const name of ["nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"]) {
        const node = await deviceNode(`${dev}/${name}`);
        if (node) control.push(node);
      }
      return { devices, control };
    })();
    return this.detected;
  }
}

/** An inventory of fixed GPUs: for a node configured by hand, and for tests. */
export class StaticGpuInventory implements GpuInventory {
  private readonly list: GpuDevice[];

  /** `gpus`: name, and optionally index/uuid/device (defaults: position, a made-up UUID, /dev/nvidia<index> 195:<index>). */
  constructor(gpus: (Partial<GpuDevice> & { name: string })[], private readonly control: DeviceNode[] = [
    { path: "/dev/nvidiactl", major: 195, minor: 255 },
    { path: "/dev/nvidia-uvm", major: 510, minor: 0 },
  ]) {
    this.list = gpus.map((g, i) => {
      const index = g.index ?? i;
      return {
        index, name: g.name, type: g.type ?? gpuType(g.name), uuid: g.uuid ?? `GPU-static-${index}`,
        device: g.device ?? { path: `/dev/nvidia${index}`, major: 195, minor: index },
      };
    });
  }

  async devices(): Promise<GpuDevice[]> {
    return this.list.map((d) => ({ ...d, device: { ...d.device } }));
  }

  async controlDevices(): Promise<DeviceNode[]> {
    return this.control.map((c) => ({ ...c }));
  }
}

/** What a sandbox spec needs for an allocation: UUIDs, and the GPUs' and control device nodes. */
export function sandboxGpus(a: GpuAllocation): SandboxGpus {
  return { uuids: a.devices.map((d) => d.uuid), devices: [...a.devices.map((d) => d.device), ...a.control] };
}

/** "2 x a100, 1 x t4", or "none". */
export function describeGpus(devices: GpuDevice[]): string {
  const counts = new Map<string, number>();
  for (const d of devices) counts.set(d.type, (counts.get(d.type) ?? 0) + 1);
  return counts.size ? [...counts].map(([t, n]) => `${n} x ${t}`).join(", ") : "none";
}

/**
 * Which sandbox holds which GPU of an inventory. Not persistent by itself: a restarted agent
 * calls `reserve` for the sandboxes it adopts.
 */
export class GpuAllocator {
  private readonly held = new Map<string, string>();

  constructor(private readonly inventory: GpuInventory) {}

  /**
   * Gives sandbox `owner` `count` free GPUs of type `type` (the lowest indexes). Fails NO_GPU when
   * the node has fewer than `count` of that type at all, GPU_UNAVAILABLE when enough exist but
   * others hold them; both messages say what the node has.
   */
  async allocate(owner: string, type: string, count: number): Promise<GpuAllocation> {
    if (!Number.isInteger(count) || count < 1) throw AgentError.INVALID_SPEC(`gpu count ${count}`, "must be a positive integer");
    const all = await this.inventory.devices();
    const matching = all.filter((d) => gpuMatches(type, d));
    if (matching.length < count) throw AgentError.NO_GPU(type, count, describeGpus(all));
    const free = matching.filter((d) => !this.held.has(d.uuid));
    if (free.length < count) throw AgentError.GPU_UNAVAILABLE(type, count, free.length, matching.length);
    const devices = free.slice(0, count);
    for (const d of devices) this.held.set(d.uuid, owner);
    return { type, devices, control: await this.inventory.controlDevices() };
  }

  /**
   * Marks the GPUs with these UUIDs as held by `owner` (a sandbox adopted from an earlier agent
   * process); returns its allocation. UUIDs the inventory no longer has are skipped.
   */
  async reserve(owner: string, type: string, uuids: string[]): Promise<GpuAllocation> {
    const all = await this.inventory.devices();
    const devices = all.filter((d) => uuids.includes(d.uuid));
    for (const d of devices) this.held.set(d.uuid, owner);
    return { type, devices, control: await this.inventory.controlDevices() };
  }

  /** Frees every GPU `owner` holds. Idempotent. */
  release(owner: string): void {
    for (const [uuid, o] of this.held) if (o === owner) this.held.delete(uuid);
  }

  /** The UUIDs `owner` holds. */
  heldBy(owner: string): string[] {
    return [...this.held].filter(([, o]) => o === owner).map(([u]) => u);
  }
}
