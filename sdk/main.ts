/** The `strata` program: the only start-up file of the CLI. */
import { runCli } from "./cli.js";

const code = await runCli(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr, env: process.env });
process.exitCode = code;
