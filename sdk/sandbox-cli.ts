/**
 * The sandbox commands of the `strata` CLI: `run`, `sandbox ls|exec|stop`, `image build` and
 * `agent`. They talk to the local node agent (`$STRATA_HOME/agent.sock`), which holds the
 * sandboxes and their volume mounts, so `sandbox ls/exec/stop` work across CLI invocations.
 * `run` and `image build` start an agent (detached) when none answers. cli.ts loads this module
 * (and with it the SDK's sandbox classes and gRPC) only when one of these commands runs; the
 * agent's own code (agent-main.ts: runtime, store, FUSE) loads only for `strata agent`.
 */
import { readFile, stat } from "node:fs/promises";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { parseEgressEntry, type ImageSpec, type SandboxRecord, type VolumeMountRequest } from "../agent/index.js";
import { StrataError } from "../metadata/index.js";
import { commands, usageError, stringOpt, timing, type CliIO, type GroupRun, type ParsedArgs } from "./command.js";
import { createRequest, SandboxClient, type Sandbox, type SandboxCreateOptions } from "./container.js";
import { Image } from "./image.js";
import { connectLocalAgent } from "./local-agent.js";

const usage = usageError;
const str = stringOpt;

function list(v: ParsedArgs["values"][string]): string[] {
  return Array.isArray(v) ? v.map(String) : typeof v === "string" ? [v] : [];
}

/**
 * The image `--image` or `image build` names: "debian-slim", a built image's hash, an OCI layout
 * (directory or tarball), a directory with a Dockerfile, a JSON ImageSpec file (relative copy
 * sources resolved against its directory) or a Dockerfile.
 */
export async function resolveImageArg(arg: string): Promise<Image> {
  if (arg === "debian-slim") return Image.debianSlim();
  if (/^[0-9a-f]{64}$/.test(arg)) return Image.base(arg);
  const path = resolve(arg);
  const st = await stat(path).catch(() => undefined);
  if (!st) throw new StrataError("NOT_FOUND", `read image ${JSON.stringify(arg)}: no such file`, { hint: "give debian-slim, an image hash, a spec file (JSON or Dockerfile) or an OCI layout" });
  if (st.isDirectory()) {
    if (await stat(join(path, "oci-layout")).catch(() => undefined)) return Image.base(path);
    if (await stat(join(path, "Dockerfile")).catch(() => undefined)) return Image.fromDockerfile(join(path, "Dockerfile"));
    throw new StrataError("INVALID_ARGUMENT", `read image ${JSON.stringify(arg)}: a directory without oci-layout or Dockerfile`);
  }
  if (/\.(tar|tar\.gz|tgz)$/.test(path)) return Image.base(path);
  const text = await readFile(path, "utf8");
  if (text.trimStart().startsWith("{")) {
    let spec: ImageSpec;
    try {
      spec = JSON.parse(text) as ImageSpec;
    } catch (err) {
      throw new StrataError("INVALID_ARGUMENT", `parse image spec ${arg}: ${(err as Error).message}`);
    }
    for (const s of spec.steps ?? []) if (s.op === "copy" && !isAbsolute(s.src)) s.src = resolve(dirname(path), s.src);
    if (spec.base?.kind === "oci" && !isAbsolute(spec.base.path)) spec.base.path = resolve(dirname(path), spec.base.path);
    return Image.fromSpec(spec);
  }
  return Image.fromDockerfile(path);
}

function parseVolume(v: string): VolumeMountRequest {
  const m = /^([^:]+):(\/[^:]*)(?::(ro|rw))?$/.exec(v);
  if (!m) throw usage(`run: bad -v ${JSON.stringify(v)}`, commands.run.usage);
  return { name: m[1]!, path: m[2]!, ...(m[3] === "ro" ? { readOnly: true } : {}) };
}

function parseFork(v: string): VolumeMountRequest {
  const m = /^([^:]+):([^:]+):(\/[^:]*)$/.exec(v);
  if (!m) throw usage(`run: bad --fork ${JSON.stringify(v)}`, commands.run.usage);
  return { name: m[2]!, path: m[3]!, forkFrom: m[1]! };
}

function parseEnv(list: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const kv of list) {
    const eq = kv.indexOf("=");
    if (eq <= 0) throw usage(`run: bad -e ${JSON.stringify(kv)}`, commands.run.usage);
    out[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return out;
}

/**
 * The allow-list of `--egress` (repeatable, each comma-separated), checked as the agent will
 * check it; undefined without the flag. A bad entry is a usage error.
 */
function parseEgress(values: string[]): string[] | undefined {
  if (!values.length) return undefined;
  const out: string[] = [];
  for (const v of values) {
    for (const raw of v.split(",")) {
      const a = raw.trim();
      if (!a) throw usage(`run: bad --egress ${JSON.stringify(v)}: empty entry`, commands.run.usage);
      try {
        parseEgressEntry(a);
      } catch (err) {
        const why = ((err as StrataError).details as { why?: string } | undefined)?.why ?? (err as Error).message;
        throw usage(`run: bad --egress ${JSON.stringify(a)}: ${why}`, commands.run.usage);
      }
      out.push(a);
    }
  }
  return out;
}

/** Runs argv in `sb`, streaming its output to `io`; forwards SIGINT/SIGTERM; stdin only when `stdin`. */
async function stream(sb: Sandbox, argv: string[], io: CliIO, stdin: boolean): Promise<{ exitCode: number; oom: boolean }> {
  const p = await sb.spawn(argv, { stdin });
  p.stdout.once("data", () => timing(io, "first-output"));
  p.stdout.on("data", (b: Buffer) => io.stdout.write(b));
  p.stderr.on("data", (b: Buffer) => io.stderr.write(b));
  if (stdin && p.stdin) process.stdin.pipe(p.stdin);
  const onSignal = (sig: NodeJS.Signals) => p.kill(sig);
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    const r = await p.wait();
    await Promise.all([ended(p.stdout), ended(p.stderr)]);
    return r;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
    if (stdin) process.stdin.unpipe();
  }
}

function ended(s: NodeJS.ReadableStream): Promise<void> {
  return new Promise((res) => {
    if ((s as { readableEnded?: boolean }).readableEnded) return res();
    s.once("end", () => res());
    s.once("close", () => res());
  });
}

function oomLine(io: CliIO, id: string): number {
  io.stderr.write(`strata: run in sandbox ${JSON.stringify(id)}: killed for exceeding its memory limit (OOM)\n`);
  return 137;
}

async function cmdRun(args: ParsedArgs, io: CliIO): Promise<number> {
  const argv = args.positionals;
  if (!argv.length) throw usage("run: missing command", commands.run.usage);
  const volumes = [...list(args.values.volume).map(parseVolume), ...list(args.values.fork).map(parseFork)];
  const egress = parseEgress(list(args.values.egress));
  const env = parseEnv(list(args.values.env)); // before an agent is started for it
  const image = await resolveImageArg(str(args.values.image) ?? "debian-slim");
  const opts: SandboxCreateOptions = {
    image, volumes, env,
    ...(str(args.values.name) ? { name: str(args.values.name) } : {}),
    ...(str(args.values.cpu) ? { cpu: str(args.values.cpu) } : {}),
    ...(str(args.values.memory) ? { memory: str(args.values.memory) } : {}),
    ...(str(args.values.gpu) ? { gpu: str(args.values.gpu) } : {}),
    ...(str(args.values.lifetime) ? { lifetime: str(args.values.lifetime) } : {}),
    ...(egress ? { network: { egress } } : {}),
  };
  createRequest(opts); // a bad --cpu, --memory, --gpu or --lifetime fails before an agent is started for it
  const client = new SandboxClient({ env: io.env });
  let sb: Sandbox | undefined;
  try {
    await client.agent();
    timing(io, "connected");
    sb = await client.create(opts);
    timing(io, "created");
    const r = await stream(sb, argv, io, args.values.interactive === true);
    const stopped = await sb.stop({ sync: args.values["no-sync"] !== true });
    sb = undefined;
    if (r.oom || stopped.sandbox.exit?.oom) return oomLine(io, stopped.sandbox.id);
    const failed = stopped.volumes.filter((v) => v.error);
    for (const v of failed) io.stderr.write(`strata: sync volume ${JSON.stringify(v.name)}: ${v.error} (IO)\nhint: the writes stay staged on the node\n`);
    return failed.length && r.exitCode === 0 ? 1 : r.exitCode;
  } finally {
    if (sb) await sb.stop().catch(() => undefined);
    await client.close();
  }
}

/**
 * The JSON shape of `sandbox ls --json`: id, node, state, image, cpu, memory, gpu, volumes, and
 * network (`{"mode":"none"}` or `{"mode":"egress","allow":[...]}`).
 */
export function sandboxJson(r: SandboxRecord): Record<string, unknown> {
  return {
    id: r.id, node: r.node, state: r.state, image: r.image, cpu: r.cpu, memory: r.memoryBytes,
    gpu: r.gpu ? `${r.gpu.type}:${r.gpu.count}` : null,
    volumes: r.volumes.map((v) => ({ name: v.name, path: v.path, readOnly: v.readOnly, ...(v.at ? { at: v.at } : {}), ...(v.forkedFrom ? { forkedFrom: v.forkedFrom } : {}) })),
    network: r.network,
  };
}

async function cmdSandbox(args: ParsedArgs, io: CliIO): Promise<number> {
  const [sub, id, ...rest] = args.positionals;
  const use = commands.sandbox.usage;
  if (sub === "ls") {
    const agent = await connectLocalAgent(io.env, { start: false }).catch(() => undefined);
    const recs = agent ? await agent.list().finally(() => agent.close()) : [];
    if (args.values.json === true) {
      io.stdout.write(`${JSON.stringify(recs.map(sandboxJson), null, 2)}\n`);
    } else {
      for (const r of recs) {
        const vols = r.volumes.map((v) => `${v.name}:${v.path}${v.readOnly ? ":ro" : ""}`).join(",") || "-";
        io.stdout.write(`${r.id}\t${r.state}\t${r.image.slice(0, 12)}\tcpu=${r.cpu ?? "-"}\tmem=${r.memoryBytes ?? "-"}\t${vols}\n`);
      }
    }
    return 0;
  }
  if (sub !== "exec" && sub !== "stop") throw usage(`sandbox: unknown subcommand ${JSON.stringify(sub ?? "")}`, use);
  if (!id) throw usage(`sandbox ${sub}: missing ID`, use);
  const client = new SandboxClient({ env: io.env, startAgent: false });
  try {
    const sb = await client.get(id);
    if (sub === "exec") {
      if (!rest.length) throw usage("sandbox exec: missing command", use);
      const r = await stream(sb, rest, io, args.values.interactive === true);
      return r.oom ? oomLine(io, id) : r.exitCode;
    }
    const res = await sb.stop({ sync: args.values["no-sync"] !== true });
    for (const v of res.volumes) io.stdout.write(`${v.name}\t${v.error ? `error: ${v.error}` : (v.version ?? "-")}\n`);
    return res.volumes.some((v) => v.error) ? 1 : 0;
  } finally {
    await client.close();
  }
}

async function cmdImage(args: ParsedArgs, io: CliIO): Promise<void> {
  const [sub, spec] = args.positionals;
  if (sub !== "build" || !spec) throw usage("image: want `image build SPEC`", commands.image.usage);
  const client = new SandboxClient({ env: io.env });
  try {
    const r = await client.buildImage(await resolveImageArg(spec));
    io.stdout.write(`${r.hash}\n`);
  } finally {
    await client.close();
  }
}

/** The code of the sandbox commands, for cli.ts. */
export const run: GroupRun<"sandbox"> = {
  run: cmdRun,
  sandbox: cmdSandbox,
  image: cmdImage,
  agent: async (args, io) => (await import("./agent-main.js")).runAgent(io, { daemon: args.values.daemon === true }),
};
