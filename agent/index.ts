/**
 * agent: the node agent's sandbox runtime — the `Runtime` seam, `GvisorRuntime` (runsc with OCI
 * bundles, cgroup limits, OOM detection, network none or allow-listed egress, lifetimes, bind
 * mounts), and images built from specs or Dockerfiles into a content-addressed cache.
 *
 * ```ts
 * import { GvisorRuntime, ImageBuilder, sandboxSpecFor, steps } from "../agent/index.js";
 * const images = new ImageBuilder({ cacheDir: "/var/cache/strata/images" });
 * const image = await images.build({ base: { kind: "debian-slim" }, steps: [steps.aptInstall(["curl"])] });
 * const rt = new GvisorRuntime({ stateDir: "/run/strata" });
 * const sb = await rt.create(sandboxSpecFor(image, { cpu: 1, memoryBytes: 512 << 20, mounts: [{ source: "/mnt/vol", destination: "/data" }] }));
 * const p = rt.exec(sb.id, { argv: ["python3", "-c", "print(42)"] });
 * p.stdout.pipe(process.stdout);
 * const { exitCode, oom } = await p.wait();
 * await rt.stop(sb.id);      // returns once nothing runs; runsc delete finishes in the background
 * await rt.close();
 * ```
 *
 * The node agent service (`strata agent`) wraps these: `AgentService` owns sandboxes, the FUSE
 * mounts of their volumes and the node's GPUs (`GpuInventory`), keeps durable records of them
 * (`SandboxStore`) so that a restarted agent adopts or cleans up what a killed one left
 * (`recover()`), `serveAgent` serves it over gRPC, `GrpcAgentClient` talks to it:
 *
 * ```ts
 * const agent = new AgentService({ runtime: rt, images, repo, stateDir: "/run/strata", stagingRoot });
 * await agent.recover();     // adopt or clean up what an earlier agent process left
 * const server = await serveAgent(agent, "/run/strata/agent.sock");
 * const client = await GrpcAgentClient.connect("/run/strata/agent.sock");
 * const sb = await client.create({ image: { base: { kind: "debian-slim" }, steps: [] }, volumes: [{ name: "data", path: "/data" }] });
 * await client.stop(sb.id);  // the writes in /data become a version of "data"
 * ```
 *
 * This file is the layer's only public door.
 */
export * from "./errors.js";
export * from "./runtime.js";
export { GvisorRuntime, type GvisorRuntimeOptions } from "./gvisor-runtime.js";
export { bundleConfig, gpuEnv, resolveUser, DEFAULT_PATH, type BundleOptions } from "./bundle.js";
export * from "./gpu.js";
export * from "./image.js";
export * from "./dockerfile.js";
export { setupEgress, teardownEgress, egressNames, parseEgressEntry, EGRESS_SUBNET, IP_FORWARD_SAVED, type EgressNetwork, type EgressEntry } from "./network.js";
export * from "./client.js";
export { AgentService, serveAgent, type AgentServiceOptions, type AgentServer, type RecoveryReport } from "./server.js";
export * from "./sandbox-store.js";
