/**
 * Running host commands with pipes for stdio (never a shared file: runsc writes at offset 0).
 */
import { spawn } from "node:child_process";

/** The outcome of a finished host command. */
export interface CommandResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: Buffer;
  stderr: Buffer;
}

/** Options of `runCommand`. */
export interface RunCommandOptions {
  /** Bytes written to stdin, then closed. Default: empty stdin. */
  input?: Buffer | string;
  /** Environment; default the agent's own. */
  env?: NodeJS.ProcessEnv;
  /** Working directory. */
  cwd?: string;
  /** Keep only the last this many bytes of each stream. Default 1 MiB. */
  maxBytes?: number;
}

/** Runs `argv` to completion and collects its output; rejects only when it cannot be spawned. */
export function runCommand(argv: string[], opts: RunCommandOptions = {}): Promise<CommandResult> {
  const max = opts.maxBytes ?? 1 << 20;
  return new Promise((resolve, reject) => {
    const child = spawn(argv[0]!, argv.slice(1), {
      stdio: [opts.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
      env: opts.env,
      cwd: opts.cwd,
    });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    const keep = (chunks: Buffer[]) => (b: Buffer) => {
      chunks.push(b);
      let total = chunks.reduce((n, c) => n + c.length, 0);
      while (total > max && chunks.length > 1) total -= chunks.shift()!.length;
    };
    child.stdout!.on("data", keep(out));
    child.stderr!.on("data", keep(err));
    child.on("error", reject);
    child.on("close", (code, signal) => {
      resolve({ code, signal, stdout: tail(Buffer.concat(out), max), stderr: tail(Buffer.concat(err), max) });
    });
    if (opts.input !== undefined) {
      child.stdin!.on("error", () => {});
      child.stdin!.end(opts.input);
    }
  });
}

function tail(b: Buffer, max: number): Buffer {
  return b.length > max ? b.subarray(b.length - max) : b;
}

/** An Error whose message names the command, its exit and the tail of its stderr. */
export function commandError(argv: string[], r: CommandResult): Error {
  const text = r.stderr.toString("utf8").trim() || r.stdout.toString("utf8").trim();
  const last = text.split("\n").slice(-6).join("\n");
  const how = r.code === null ? `signal ${r.signal}` : `exit code ${r.code}`;
  return new Error(`${argv.slice(0, 3).join(" ")} failed with ${how}${last ? `: ${last}` : ""}`);
}

/** Runs `argv` and resolves with stdout; rejects with `commandError` on a non-zero exit. */
export async function mustRun(argv: string[], opts: RunCommandOptions = {}): Promise<Buffer> {
  const r = await runCommand(argv, opts);
  if (r.code !== 0) throw commandError(argv, r);
  return r.stdout;
}
