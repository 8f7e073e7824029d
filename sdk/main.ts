/** The `strata` program: the only start-up file of the CLI. */
import { runCli } from "./cli.js";

// The AWS SDK warns on every client that it will soon need Node 22; the CLI's users cannot act on it.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";

const code = await runCli(process.argv.slice(2), { stdout: process.stdout, stderr: process.stderr, env: process.env });
process.exitCode = code;
