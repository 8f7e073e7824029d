/**
 * The shape of a `strata` CLI command, shared by every command table (sdk/cli.ts,
 * sdk/mount-cli.ts, sdk/sandbox-cli.ts) so that cli.ts can merge them.
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

/** One command: its usage line, a summary for `--help`, its options, and what it does. */
export interface Command {
  usage: string;
  summary: string;
  options?: Record<string, { type: "string" | "boolean"; multiple?: boolean; short?: string }>;
  /** Resolves to the exit code (0 when nothing is returned). */
  run(args: ParsedArgs, io: CliIO): Promise<number | void>;
}

/** A usage error (exit 2): `message`, and the command's usage line as the hint. */
export function usageError(message: string, use: string): StrataError {
  return new StrataError("USAGE", message, { hint: use.startsWith("usage:") || use.startsWith("run ") ? use : `usage: strata ${use}` });
}

/** A string option's value, or undefined. */
export function stringOpt(v: ParsedArgs["values"][string]): string | undefined {
  return typeof v === "string" ? v : undefined;
}
