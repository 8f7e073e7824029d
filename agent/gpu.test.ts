/**
 * GPUs: type names, nvidia-smi parsing, allocation, the bundle and runsc flags a GPU sandbox
 * gets, and the agent's refusals and releases with an injected inventory of 2 × A100 (this
 * machine has no GPU: the real detector must find none). A GPU sandbox cannot start here (runsc
 * --nvproxy needs the host driver), so the success path of the agent is checked up to runsc,
 * whose refusal names the missing driver, which shows the flag and device nodes reached it.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { SqliteMetadataStore } from "../metadata/index.js";
import { MemoryObjectStore, Repository } from "../volumefs/index.js";
import { bundleConfig } from "./bundle.js";
import { AgentError } from "./errors.js";
import { GpuAllocator, NvidiaGpuInventory, StaticGpuInventory, gpuMatches, gpuType, parseNvidiaSmi, sandboxGpus } from "./gpu.js";
import { GvisorRuntime } from "./gvisor-runtime.js";
import { ImageBuilder, type ImageSpec } from "./image.js";
import { MemorySandboxStore } from "./sandbox-store.js";
import { AgentService } from "./server.js";
import { TEST_IMAGE_CACHE, testImage } from "./testing.js";

const A100S = [
  { name: "NVIDIA A100-SXM4-40GB", uuid: "GPU-aaaa0000-0000-0000-0000-000000000000" },
  { name: "NVIDIA A100-SXM4-40GB", uuid: "GPU-aaaa1111-1111-1111-1111-111111111111" },
];

describe("gpu types", () => {
  it("normalises product names", () => {
    expect(gpuType("NVIDIA A100-SXM4-40GB")).toBe("a100");
    expect(gpuType("NVIDIA A100 80GB PCIe")).toBe("a100");
    expect(gpuType("NVIDIA H100 80GB HBM3")).toBe("h100");
    expect(gpuType("Tesla V100-SXM2-16GB")).toBe("v100");
    expect(gpuType("Tesla T4")).toBe("t4");
    expect(gpuType("NVIDIA L4")).toBe("l4");
    expect(gpuType("NVIDIA A10G")).toBe("a10g");
    expect(gpuType("NVIDIA GeForce RTX 4090")).toBe("rtx4090");
    expect(gpuType("NVIDIA RTX A6000")).toBe("rtxa6000");
  });

  it("matches a request by type, case-insensitively, or by a longer prefix of the product name", () => {
    const a100 = { name: "NVIDIA A100-SXM4-40GB", type: "a100" };
    expect(gpuMatches("a100", a100)).toBe(true);
    expect(gpuMatches("A100", a100)).toBe(true);
    expect(gpuMatches("nvidia-a100", a100)).toBe(true);
    expect(gpuMatches("a100-sxm4", a100)).toBe(true);
    expect(gpuMatches("A100-SXM4-40GB", a100)).toBe(true);
    expect(gpuMatches("a100-sxm4-80gb", a100)).toBe(false);
    expect(gpuMatches("a10", a100)).toBe(false);
    expect(gpuMatches("h100", a100)).toBe(false);
    expect(gpuMatches("", a100)).toBe(false);
  });

  it("parses nvidia-smi's csv", () => {
    const text = "0, NVIDIA A100-SXM4-40GB, GPU-5a9e0000-1111-2222-3333-444455556666\n1, NVIDIA A100-SXM4-40GB, GPU-5a9e0000-1111-2222-3333-444455557777\n\nNo devices were found\n";
    expect(parseNvidiaSmi(text)).toEqual([
      { index: 0, name: "NVIDIA A100-SXM4-40GB", uuid: "GPU-5a9e0000-1111-2222-3333-444455556666" },
      { index: 1, name: "NVIDIA A100-SXM4-40GB", uuid: "GPU-5a9e0000-1111-2222-3333-444455557777" },
    ]);
  });

  it("the real detector finds no GPU on this machine", async () => {
    const inv = new NvidiaGpuInventory();
    expect(await inv.devices()).toEqual([]);
    expect(await inv.controlDevices()).toEqual([]);
  });
});

describe("GpuAllocator", () => {
  it("allocates free GPUs of the type, refuses with what the node has, releases, and re-reserves", async () => {
    const gpus = new GpuAllocator(new StaticGpuInventory([...A100S, { name: "Tesla T4", uuid: "GPU-t4" }]));
    const one = await gpus.allocate("sb-1", "A100", 1);
    expect(one.devices.map((d) => d.index)).toEqual([0]);
    expect(one.control.map((c) => c.path)).toEqual(["/dev/nvidiactl", "/dev/nvidia-uvm"]);
    const busy = await gpus.allocate("sb-2", "a100", 2).catch((e: unknown) => e);
    expect(busy).toBeInstanceOf(AgentError);
    expect(busy).toMatchObject({ code: "GPU_UNAVAILABLE", message: "create sandbox: gpu a100 x2 busy (1 of 2 free)" });
    const none = await gpus.allocate("sb-2", "h100", 1).catch((e: unknown) => e);
    expect(none).toMatchObject({ code: "NO_GPU", message: "create sandbox: this node has no gpu h100 (it has 2 x a100, 1 x t4)" });
    expect(await gpus.allocate("sb-2", "a100", 3).catch((e: unknown) => e)).toMatchObject({ code: "NO_GPU" });
    expect((await gpus.allocate("sb-2", "a100", 1)).devices.map((d) => d.index)).toEqual([1]);
    expect(await gpus.allocate("sb-3", "a100", 1).catch((e: unknown) => e)).toMatchObject({ code: "GPU_UNAVAILABLE" });
    gpus.release("sb-1");
    gpus.release("sb-1");
    expect((await gpus.allocate("sb-3", "a100", 1)).devices.map((d) => d.uuid)).toEqual([A100S[0]!.uuid]);
    expect(gpus.heldBy("sb-3")).toEqual([A100S[0]!.uuid]);
    await expect(gpus.allocate("sb-4", "a100", 0)).rejects.toMatchObject({ code: "INVALID_SPEC" });

    const restarted = new GpuAllocator(new StaticGpuInventory(A100S));
    expect((await restarted.reserve("sb-3", "a100", [A100S[0]!.uuid])).devices).toHaveLength(1);
    expect(await restarted.allocate("sb-5", "a100", 2).catch((e: unknown) => e)).toMatchObject({ code: "GPU_UNAVAILABLE" });
  });

  it("a GPU sandbox's bundle lists the device nodes and NVIDIA_VISIBLE_DEVICES; runsc gets --nvproxy", async () => {
    const gpus = new GpuAllocator(new StaticGpuInventory(A100S));
    const spec = { rootfs: "/rootfs", gpus: sandboxGpus(await gpus.allocate("sb", "a100", 2)) };
    const config = bundleConfig(spec, { cgroupsPath: "/strata/sb", uid: 0, gid: 0 }) as {
      process: { env: string[] };
      linux: { devices: Record<string, unknown>[] };
    };
    expect(config.process.env).toContain(`NVIDIA_VISIBLE_DEVICES=${A100S[0]!.uuid},${A100S[1]!.uuid}`);
    expect(config.process.env).toContain("NVIDIA_DRIVER_CAPABILITIES=compute,utility");
    expect(config.linux.devices).toEqual([
      { path: "/dev/nvidia0", type: "c", major: 195, minor: 0, fileMode: 0o666, uid: 0, gid: 0 },
      { path: "/dev/nvidia1", type: "c", major: 195, minor: 1, fileMode: 0o666, uid: 0, gid: 0 },
      { path: "/dev/nvidiactl", type: "c", major: 195, minor: 255, fileMode: 0o666, uid: 0, gid: 0 },
      { path: "/dev/nvidia-uvm", type: "c", major: 510, minor: 0, fileMode: 0o666, uid: 0, gid: 0 },
    ]);
    const rt = new GvisorRuntime({ stateDir: "/nonexistent" });
    expect(rt.runscArgv(spec)).toContain("--nvproxy");
    expect(rt.runscArgv({})).not.toContain("--nvproxy");
    expect((bundleConfig({ rootfs: "/rootfs" }, { cgroupsPath: "/x", uid: 0, gid: 0 }) as { linux: Record<string, unknown> }).linux.devices).toBeUndefined();
  });
});

describe("the agent with an injected inventory of 2 x A100", () => {
  let dir: string;
  let agent: AgentService;
  const image: ImageSpec = { base: { kind: "debian-slim" }, steps: [] };

  beforeAll(async () => {
    await testImage();
    dir = await mkdtemp(join(tmpdir(), "strata-gpu-"));
    const repo = new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects: new MemoryObjectStore() });
    agent = new AgentService({
      runtime: new GvisorRuntime({ stateDir: join(dir, "state"), cgroupParent: `/strata-test-gpu-${process.pid}` }),
      images: new ImageBuilder({ cacheDir: TEST_IMAGE_CACHE }), repo, stateDir: join(dir, "state"), stagingRoot: join(dir, "staging"),
      gpus: new StaticGpuInventory(A100S), store: new MemorySandboxStore(),
    });
  }, 600_000);

  afterAll(async () => {
    await agent?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("refuses what the node does not have, naming what it has; passes granted GPUs to runsc --nvproxy and releases them when the start fails", async () => {
    await expect(agent.create({ image, gpu: { type: "h100", count: 1 } })).rejects.toMatchObject({
      code: "NO_GPU", message: "create sandbox: this node has no gpu h100 (it has 2 x a100)",
    });
    await expect(agent.create({ image, gpu: { type: "a100", count: 3 } })).rejects.toMatchObject({ code: "NO_GPU" });
    for (let i = 0; i < 2; i++) {
      const err = await agent.create({ image, gpu: { type: "A100", count: 2 } }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: "RUNTIME" });
      expect((err as Error).message).toMatch(/nvidia/i);
    }
    expect(await agent.list()).toEqual([]);
  });

  it("runs a sandbox without GPUs as before, with gpu null in its record", async () => {
    const rec = await agent.create({ image });
    expect(rec.gpu).toBeNull();
    const stop = await agent.stop(rec.id);
    expect(stop.sandbox.state).toBe("stopped");
  });
});
