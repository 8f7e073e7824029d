/**
 * The `strata` CLI's command table: each command's usage, summary and options (all that `--help`
 * and argument parsing need), and the group whose module holds its code. cli.ts loads a group's
 * module only when one of its commands runs, so `strata run` never loads the storage commands'
 * SQLite, S3 and FUSE code, and `strata put` never loads gRPC:
 *
 * | group | module | its code needs |
 * |---|---|---|
 * | store | store-cli.ts | the store (volumefs, SQLite, the S3 SDK) |
 * | mount | mount-cli.ts | FUSE and the mounts' control files |
 * | sandbox | sandbox-cli.ts | the local agent over gRPC |
 */
import { StrataError } from "../metadata/index.js";

/** Where a command writes; tests pass buffers, the program passes the process's streams. */
export interface CliIO {
  stdout: NodeJS.WritableStream & { isTTY?: boolean };
  stderr: NodeJS.WritableStream & { isTTY?: boolean };
  env: NodeJS.ProcessEnv;
}

/** A command's arguments as node:util parseArgs returns them. */
export interface ParsedArgs {
  positionals: string[];
  values: Record<string, string | boolean | (string | boolean)[] | undefined>;
}

/** What a command does; resolves to the exit code (0 when nothing is returned). */
export type CommandRun = (args: ParsedArgs, io: CliIO) => Promise<number | void>;

/** The modules that hold the commands' code (see the table above). */
export type CommandGroup = "store" | "mount" | "sandbox";

/** One command of the table: its usage line, a summary for `--help`, its options, its group. */
export interface CommandSpec {
  usage: string;
  summary: string;
  /** Lines `--help` prints after the summary, one per option that needs explaining. */
  help?: string[];
  options?: Record<string, { type: "string" | "boolean"; multiple?: boolean; short?: string }>;
  /** Most positional arguments the usage allows; more are a usage error. Unchecked when absent (a command with `CMD...`, or several forms). */
  args?: number;
  group: CommandGroup;
}

/** Every command, in the order `strata --help` lists them. */
export const commands = {
  volume: {
    args: 2,
    group: "store",
    usage: "volume create NAME | volume ls [--json] | volume rm NAME [--discard]",
    summary: "create, list and remove volumes (rm refuses while changes are staged on this host, unless --discard)",
    options: { json: { type: "boolean" }, discard: { type: "boolean" } },
  },
  put: { group: "store", usage: "put NAME SRC... DEST", summary: "copy local files or directories into a volume as one new version; prints its id" },
  get: { args: 3, group: "store", usage: "get NAME SRC DEST [--at V]", summary: "copy a file or directory out of a volume", options: { at: { type: "string" } } },
  cat: { args: 2, group: "store", usage: "cat NAME PATH [--at V]", summary: "print a file", options: { at: { type: "string" } } },
  ls: { args: 2, group: "store", usage: "ls NAME [PATH] [--at V] [-r] [--json]", summary: "list a directory", options: { at: { type: "string" }, r: { type: "boolean" }, recursive: { type: "boolean" }, json: { type: "boolean" } } },
  rm: { group: "store", usage: "rm NAME PATH... [-r]", summary: "remove paths as one new version", options: { r: { type: "boolean" }, recursive: { type: "boolean" } } },
  fork: { args: 2, group: "store", usage: "fork SRC DST [--at V]", summary: "make a new volume from a version of another, in constant time", options: { at: { type: "string" } } },
  log: { args: 1, group: "store", usage: "log NAME [--json]", summary: "list versions, newest first", options: { json: { type: "boolean" } } },
  diff: { args: 3, group: "store", usage: "diff NAME V1 [V2] [--json]", summary: "paths added, modified and removed from V1 to V2 (default the head)", options: { json: { type: "boolean" } } },
  revert: { args: 2, group: "store", usage: "revert NAME V", summary: "make a new version whose tree is V's; prints its id (the head's when it has that tree already)" },
  fsck: { args: 0, group: "store", usage: "fsck [--rebuild] [--json]", summary: "check every version is complete; --rebuild remakes the metadata from the bucket", options: { rebuild: { type: "boolean" }, json: { type: "boolean" } } },
  demo: { args: 0, group: "store", usage: "demo", summary: "a short tour on the embedded default store" },
  mount: {
    args: 2,
    group: "mount",
    usage: "mount NAME DIR [--at V] [--read-only] [--cache-dir D] [--cache-size 10G] [--daemon] [--label K=V]...",
    summary: "serve a volume as a directory (FUSE) until unmounted; --daemon returns once it is live",
    options: {
      at: { type: "string" },
      "read-only": { type: "boolean" },
      "cache-dir": { type: "string" },
      "cache-size": { type: "string" },
      daemon: { type: "boolean" },
      label: { type: "string", multiple: true },
    },
  },
  unmount: { args: 1, group: "mount", usage: "unmount DIR", summary: "detach a mount, even one whose process died" },
  sync: {
    args: 1,
    group: "mount",
    usage: "sync DIR [--message M] [--on-conflict fail|ours|theirs]",
    summary: "make the staged changes of a mount one new version; prints its id",
    options: { message: { type: "string" }, "on-conflict": { type: "string" } },
  },
  reload: {
    args: 1,
    group: "mount",
    usage: "reload DIR [--discard]",
    summary: "move a mount to the newest head (refuses while changes are staged, unless --discard)",
    options: { discard: { type: "boolean" } },
  },
  status: { args: 1, group: "mount", usage: "status DIR [--json]", summary: "a mount's volume, base version and staged changes", options: { json: { type: "boolean" } } },
  run: {
    group: "sandbox",
    usage: "run [--image debian-slim|PATH|HASH] [--cpu N] [--memory 1Gi] [--gpu TYPE[:N]] [--lifetime 1h] [-v NAME:/path[:ro]]... [--fork SRC:NEWNAME:/path]... [-e K=V]... [--egress ADDR[:PORT][,ADDR[:PORT]...]]... [--name ID] [-i] [--no-sync] -- CMD...",
    summary: "run a command in a new sandbox with volumes mounted; streams its output, syncs the volumes, exits with its code",
    help: [
      "  --image       debian-slim (default), an image hash, a spec file (JSON or Dockerfile), a directory with a Dockerfile, or an OCI layout",
      "  --gpu         TYPE or TYPE:N whole GPUs of the node (e.g. a100:2); fails NO_GPU when the node has none of that type, GPU_UNAVAILABLE when others hold them",
      "  -v            mount volume NAME at /path (created empty on first use; :ro read-only); its writes become a version at the end",
      "  --fork        fork SRC into a new volume NEWNAME and mount it writable at /path",
      "  --egress      let the sandbox connect out, only to these: an IPv4 address, a CIDR (10.0.0.0/8) or a host name",
      "                (resolved once, at start), each optionally :PORT (then only that TCP/UDP port). Repeatable or",
      "                comma-separated. Everything else, the host itself included, is dropped. The sandbox then gets its",
      "                own network namespace (the node needs iproute2 and nftables). Without --egress: loopback only",
      "  --lifetime    stop the sandbox after this long (90s, 30m, 1h)",
      "  --no-sync     drop the volumes' writes instead of making versions of them",
    ],
    options: {
      image: { type: "string" },
      cpu: { type: "string" },
      memory: { type: "string" },
      gpu: { type: "string" },
      lifetime: { type: "string" },
      volume: { type: "string", short: "v", multiple: true },
      fork: { type: "string", multiple: true },
      env: { type: "string", short: "e", multiple: true },
      egress: { type: "string", multiple: true },
      name: { type: "string" },
      interactive: { type: "boolean", short: "i" },
      "no-sync": { type: "boolean" },
    },
  },
  sandbox: {
    group: "sandbox",
    usage: "sandbox ls [--json] | sandbox exec ID [-i] -- CMD... | sandbox stop ID [--no-sync]",
    summary: "list the local agent's sandboxes, run a command in one, stop one (syncing its volumes)",
    options: { json: { type: "boolean" }, interactive: { type: "boolean", short: "i" }, "no-sync": { type: "boolean" } },
  },
  image: { args: 2, group: "sandbox", usage: "image build SPEC", summary: "build an image (spec JSON, Dockerfile, OCI layout or debian-slim); prints its hash" },
  agent: {
    args: 0,
    group: "sandbox",
    usage: "agent [--daemon]",
    summary: "serve this node's sandboxes and their volume mounts (gRPC on $STRATA_HOME/agent.sock)",
    options: { daemon: { type: "boolean" } },
  },
} satisfies Record<string, CommandSpec>;

/** A command's name. */
export type CommandName = keyof typeof commands;

/** The code of one group's commands, as its module exports it (`export const run`). */
export type GroupRun<G extends CommandGroup> = { [K in CommandName as (typeof commands)[K]["group"] extends G ? K : never]: CommandRun };

/**
 * A path (or name) as a text line shows it: quoted as JSON when it holds control characters, so
 * that a name with a newline or an escape sequence can neither split a line nor drive the
 * terminal. `--json` output needs no such care.
 */
export function shownName(p: string): string {
  // eslint-disable-next-line no-control-regex
  return /[\u0000-\u001f\u007f-\u009f]/.test(p) ? JSON.stringify(p) : p;
}

/** A usage error (exit 2): `message`, and the command's usage line as the hint. */
export function usageError(message: string, use: string): StrataError {
  return new StrataError("USAGE", message, { hint: use.startsWith("usage:") ? use : `usage: strata ${use}` });
}

/** A string option's value, or undefined. */
export function stringOpt(v: ParsedArgs["values"][string]): string | undefined {
  return typeof v === "string" ? v : undefined;
}

/**
 * With STRATA_TIMING set, writes `strata: timing LABEL MS` to stderr: milliseconds since this
 * process started (Node's own start-up included). The benchmark reads these to split a cold start.
 */
export function timing(io: CliIO, label: string): void {
  if (io.env.STRATA_TIMING) io.stderr.write(`strata: timing ${label} ${performance.now().toFixed(1)}\n`);
}
