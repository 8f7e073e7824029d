/**
 * The `strata` command line. Each command is a small function over the SDK; output that scripts
 * read (`--json`, version ids) goes to stdout, progress and errors to stderr. A user's mistake is
 * one line `strata: <message> (<CODE>)` plus a hint line, and a non-zero exit; never a stack.
 *
 * This module only dispatches: the table in command.ts names each command's group, and the
 * group's module (store-cli.ts, mount-cli.ts, sandbox-cli.ts) is imported when one of its
 * commands runs, so that a command loads only the code it needs.
 */
import { parseArgs } from "node:util";
import { StrataError } from "../metadata/index.js";
import { commands, timing, type CliIO, type CommandGroup, type CommandName, type CommandRun, type CommandSpec, type ParsedArgs } from "./command.js";

/** Exit codes: 0 ok, 1 a failure, 2 a usage error. */
export const EXIT_USAGE = 2;

const groups: Record<CommandGroup, () => Promise<{ run: Partial<Record<CommandName, CommandRun>> }>> = {
  store: () => import("./store-cli.js"),
  mount: () => import("./mount-cli.js"),
  sandbox: () => import("./sandbox-cli.js"),
};

function out(io: CliIO, text: string): void {
  io.stdout.write(text.endsWith("\n") ? text : text + "\n");
}

function helpText(): string {
  const lines = ["usage: strata COMMAND [ARGS]", "", "commands:"];
  for (const [name, c] of Object.entries(commands)) lines.push(`  ${name.padEnd(8)} ${c.summary}`);
  lines.push("", "configuration: STRATA_HOME (default ~/.strata), STRATA_STORE (a directory or s3://BUCKET/PREFIX),");
  lines.push("  STRATA_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, STRATA_CACHE_SIZE");
  lines.push("", "run `strata COMMAND --help` for a command's usage");
  return lines.join("\n");
}

/** Runs the CLI with `argv` (without node and the script); resolves to the exit code. */
export async function runCli(argv: string[], io: CliIO): Promise<number> {
  const [name, ...rest] = argv;
  if (name === "--help" || name === "-h" || name === "help") {
    out(io, helpText());
    return 0;
  }
  if (!name) {
    // A usage error: the help goes where errors go, and stdout stays empty for a script.
    io.stderr.write(`strata: missing command (USAGE)\n${helpText()}\n`);
    return EXIT_USAGE;
  }
  const cmd: CommandSpec | undefined = Object.hasOwn(commands, name) ? commands[name as CommandName] : undefined;
  try {
    if (!cmd) throw new StrataError("USAGE", `unknown command ${JSON.stringify(name)}`, { hint: "run `strata --help` for the list of commands" });
    const end = rest.indexOf("--");
    const own = end < 0 ? rest : rest.slice(0, end); // everything after `--` is the command's (`run -- cmd --help`)
    if (own.includes("--help") || own.includes("-h")) {
      out(io, `usage: strata ${cmd.usage}\n\n${cmd.summary}${cmd.help ? `\n\n${cmd.help.join("\n")}` : ""}`);
      return 0;
    }
    let parsed: ParsedArgs;
    try {
      const p = parseArgs({ args: rest, options: cmd.options ?? {}, allowPositionals: true, strict: true });
      parsed = { positionals: p.positionals, values: p.values as ParsedArgs["values"] };
    } catch (err) {
      throw new StrataError("USAGE", `${name}: ${(err as Error).message.split("\n")[0]!.replace(/\.$/, "")}`, { hint: `usage: strata ${cmd.usage}` });
    }
    // `--at ""` or `--cache-size=` would fall back to the default as if the option were absent.
    for (const [opt, v] of Object.entries(parsed.values)) {
      if (opt === "message") continue; // an empty message is a message
      if ((Array.isArray(v) ? v : [v]).some((x) => x === "")) {
        throw new StrataError("USAGE", `${name}: option ${opt.length === 1 ? "-" : "--"}${opt} has an empty value`, { hint: `usage: strata ${cmd.usage}` });
      }
    }
    if (cmd.args !== undefined && parsed.positionals.length > cmd.args) {
      throw new StrataError("USAGE", `${name}: unexpected argument ${JSON.stringify(parsed.positionals[cmd.args])}`, { hint: `usage: strata ${cmd.usage}` });
    }
    const { run } = await groups[cmd.group]();
    timing(io, "loaded");
    const code = await run[name as CommandName]!(parsed, io);
    return typeof code === "number" ? code : 0;
  } catch (err) {
    return reportError(err, io);
  }
}

/** Prints an error for a user: one line with the code, a hint; a stack only with STRATA_DEBUG. */
export function reportError(err: unknown, io: CliIO): number {
  if (err instanceof StrataError) {
    io.stderr.write(`strata: ${err.oneLine()}\n`);
    if (err.hint) io.stderr.write(`hint: ${err.hint}\n`);
    if (io.env.STRATA_DEBUG) io.stderr.write(`${err.stack}\n`);
    return err.code === "USAGE" ? EXIT_USAGE : 1;
  }
  const e = err as NodeJS.ErrnoException;
  if (e && typeof e.code === "string" && typeof e.message === "string" && !io.env.STRATA_DEBUG) {
    io.stderr.write(`strata: ${e.message} (${e.code})\n`);
    return 1;
  }
  io.stderr.write(`strata: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
  return 1;
}

export type { CliIO } from "./command.js";
