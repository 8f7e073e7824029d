/**
 * strata: the public API — versioned, forkable volumes.
 *
 * ```ts
 * import { Volume } from "strata";
 * const vol = await Volume.open("training-data");          // created on first use
 * await vol.putFile("inputs/example.txt", "hello from a volume\n");
 * const runs = await Promise.all([1, 2, 3].map((i) => vol.fork(`attempt-${i}`)));
 * const b = runs[0].batch().putFile("out/a.txt", "a").remove("inputs/example.txt");
 * await b.sync({ message: "attempt 1" });
 * ```
 *
 * Sandboxes (gVisor, on the local node agent) mount volumes and forks; options are checked by
 * the same parsers the CLI uses (`parseNetwork`, `parseGpu`, `parseDuration`):
 *
 * ```ts
 * import { SandboxClient, type SandboxRecord } from "strata";
 * const sb = await SandboxClient.default().create({
 *   gpu: "a100:1", network: { egress: ["10.0.0.5:443"] },
 *   volumes: [{ name: "attempt-4", forkFrom: "training-data", path: "/data" }],
 * });
 * const rec: SandboxRecord = await sb.info();   // rec.network, rec.gpu?.devices
 * ```
 *
 * Configuration comes from STRATA_HOME, STRATA_STORE, STRATA_S3_ENDPOINT and AWS_* variables,
 * or an explicit `Strata.connect(config)` passed as `{ client }`.
 */
export { Strata, metadataPath, openObjectStore } from "./client.js";
export { loadConfig, parseSize, type StrataConfig } from "./config.js";
export { Volume, VolumeBatch, VolumeView, type VersionInfo, type VolumeInfo, type FileInfo, type ReadOptions, type VolumeOptions } from "./volume.js";
export { runCli, type CliIO } from "./cli.js";
export { StrataError, MetadataError } from "../metadata/index.js";
export { VolumeError, type ConflictPolicy, type TreeDiff } from "../volumefs/index.js";
export { Container, SandboxClient, Sandbox, parseDuration, parseGpu, parseNetwork, type ContainerOptions, type SandboxOptions, type SandboxCreateOptions, type SandboxClientOptions, type MountVolumeOptions, type ExecOutput, type ContainerProcess, type ProcessExit, type SpawnOptions } from "./container.js";
export { Image, type AddLocalOptions } from "./image.js";
export { connectLocalAgent, agentSocketPath, stopLocalAgent } from "./local-agent.js";
export { AgentError, type AgentErrorCode } from "../agent/index.js";
export type {
  SandboxRecord, SandboxVolume, SandboxGpu, SandboxExit, StopReason, NetworkSpec, VolumeSyncResult, StopSandboxResult, GpuRequest,
  VolumeMountRequest, BuildImageResult, AgentClient,
} from "../agent/index.js";
