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
 * Configuration comes from STRATA_HOME, STRATA_STORE, STRATA_S3_ENDPOINT and AWS_* variables,
 * or an explicit `Strata.connect(config)` passed as `{ client }`.
 */
export { Strata, metadataPath, openObjectStore } from "./client.js";
export { loadConfig, parseSize, type StrataConfig } from "./config.js";
export { Volume, VolumeBatch, VolumeView, type VersionInfo, type VolumeInfo, type FileInfo, type ReadOptions, type VolumeOptions } from "./volume.js";
export { runCli, type CliIO } from "./cli.js";
export { StrataError, MetadataError } from "../metadata/index.js";
export { VolumeError, type ConflictPolicy, type TreeDiff } from "../volumefs/index.js";
export { Container, SandboxClient, Sandbox, parseDuration, parseGpu, type ContainerOptions, type SandboxOptions, type SandboxCreateOptions, type SandboxClientOptions, type MountVolumeOptions, type ExecOutput, type ContainerProcess, type ProcessExit, type SpawnOptions } from "./container.js";
export { Image, type AddLocalOptions } from "./image.js";
export { connectLocalAgent, agentSocketPath, stopLocalAgent } from "./agent-main.js";
export type { SandboxRecord, VolumeSyncResult, StopSandboxResult, GpuRequest, VolumeMountRequest, BuildImageResult, AgentClient } from "../agent/index.js";
