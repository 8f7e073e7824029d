/**
 * The mount commands of the `strata` CLI: `mount`, `unmount`, `sync`, `reload`, `status`.
 *
 * `mount` serves a volume through FUSE in this process until it is unmounted or gets SIGINT or
 * SIGTERM; `--daemon` runs the same command detached and returns once the mount answers. The
 * other commands never open the store: they talk to the serving process through the mount's
 * control files (`DIR/.strata/sync`, `reload`, `status`, `version`; protocol in
 * volumefs/vfs/control.ts), so they work the same from inside a sandbox that sees only DIR.
 */
import { processAlive } from "./process.js";
import { commands, shownName, usageError, stringOpt, type CliIO, type GroupRun, type ParsedArgs } from "./command.js";
import { spawn } from "node:child_process";
import { closeSync, openSync } from "node:fs";
import { mkdir, open, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { StrataError } from "../metadata/index.js";
import { forceUnmount, isFuseMountPoint, mountFs, RESERVED_NAME, VolumeError, type MountFs } from "../volumefs/index.js";
import { Strata } from "./client.js";
import { loadConfig, parseSize, type StrataConfig } from "./config.js";

/** Options of `openVolumeMount`: what `strata mount` asks of the mounted volume. */
export interface VolumeMountOptions {
  /** A version to mount instead of the head (then read-only). */
  at?: string;
  /** Refuse changes. */
  readOnly?: boolean;
  /** Provenance labels of versions the mount syncs. */
  labels?: Record<string, string>;
}

const usage = usageError;
const str = stringOpt;

function labelsOf(v: ParsedArgs["values"][string]): Record<string, string> {
  const list = Array.isArray(v) ? v : typeof v === "string" ? [v] : [];
  const out: Record<string, string> = {};
  for (const item of list) {
    const s = String(item);
    const eq = s.indexOf("=");
    if (eq <= 0) throw usage(`mount: bad label ${JSON.stringify(s)}`, commands.mount.usage);
    out[s.slice(0, eq)] = s.slice(eq + 1);
  }
  return out;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** Where `strata mount` records the pid serving DIR, so that `unmount` can wait for it to finish. */
function mountPidFile(home: string, abs: string): string {
  return join(home, "mounts", `${abs.replace(/[^A-Za-z0-9._-]+/g, "_")}.pid`);
}


/**
 * Opens the `MountFs` of volume `name` on the client's store. Looked up at run time so that the
 * CLI loads without the mounted-volume module.
 */
export async function openVolumeMount(c: Strata, name: string, dir: string, opts: VolumeMountOptions): Promise<MountFs> {
  const vfs = (await import("../volumefs/index.js")) as unknown as Record<string, unknown>;
  const MountedVolume = vfs.MountedVolume as { open?: (o: Record<string, unknown>) => Promise<MountFs> } | undefined;
  if (!MountedVolume?.open) throw new VolumeError("NOT_SUPPORTED", `mount volume ${JSON.stringify(name)}: this build has no mounted volume`);
  return MountedVolume.open({
    repo: c.repo,
    volume: name,
    at: opts.at,
    readOnly: opts.readOnly,
    labels: opts.labels,
    copies: c.copies,
    stagingRoot: c.stagingRoot,
    mountpoint: dir,
  });
}

// ---- control files ----

function controlPath(dir: string, file: string): string {
  return join(resolve(dir), RESERVED_NAME, file);
}

/** Fails with a clear error unless `dir` is a live strata mount. */
async function checkMount(dir: string, op: string): Promise<void> {
  const abs = resolve(dir);
  try {
    await stat(controlPath(abs, "version"));
    return;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOTCONN" || code === "ECONNABORTED") {
      throw new VolumeError("STORE_UNREACHABLE", `${op} ${abs}: the mount's process is gone`, { hint: `detach it with \`strata unmount ${abs}\` and mount again; staged changes are kept` });
    }
    if (code === "ENOENT" && !(await stat(abs).catch(() => undefined))) {
      throw VolumeError.NOT_FOUND(abs, { op, hint: "give the directory a volume is mounted at" });
    }
    throw new VolumeError("INVALID_ARGUMENT", `${op} ${abs}: not a strata mount`, { cause: err, hint: "mount a volume there with `strata mount NAME DIR`" });
  }
}

/** Reads a control file to its end (never trusting a cached size). */
async function readControl(path: string): Promise<string> {
  const fh = await open(path, "r");
  try {
    const parts: Buffer[] = [];
    for (let pos = 0; ; ) {
      const buf = Buffer.alloc(64 * 1024);
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      parts.push(buf.subarray(0, bytesRead));
      pos += bytesRead;
    }
    return Buffer.concat(parts).toString("utf8");
  } finally {
    await fh.close();
  }
}

/**
 * Writes one command to a control file with one write(2) (the write returns when the command is
 * done), then reads the file back for its answer. A failed command fails the write; the answer
 * then carries the error, when the file records one.
 */
async function askControl(path: string, request: string): Promise<Record<string, unknown>> {
  const fh = await open(path, "r+");
  try {
    await fh.write(request, 0, "utf8");
  } catch (err) {
    const answer = await readControl(path).catch(() => "");
    if (answer.includes('"error"')) parseAnswer(answer, path);
    throw err;
  } finally {
    await fh.close().catch(() => undefined);
  }
  return parseAnswer(await readControl(path), path);
}

function parseAnswer(text: string, path: string): Record<string, unknown> {
  let res: Record<string, unknown>;
  try {
    res = JSON.parse(text) as Record<string, unknown>;
  } catch (err) {
    throw new VolumeError("IO", `read ${path}: not a JSON answer: ${JSON.stringify(text.slice(0, 80))}`, { cause: err });
  }
  const e = res.error as { code?: string; message?: string; hint?: string; details?: unknown } | undefined;
  if (e && typeof e === "object") {
    throw new VolumeError((e.code ?? "IO") as never, e.message ?? "control request failed", { hint: e.hint, details: e.details });
  }
  return res;
}

/** Turns a local errno failure on a control file into a VolumeError with its cause. */
function controlError(err: unknown, op: string, dir: string): never {
  if (err instanceof StrataError) throw err;
  const e = err as NodeJS.ErrnoException;
  if (e?.code === "EROFS") throw VolumeError.READ_ONLY(resolve(dir), { op, cause: err, hint: "the volume is mounted read-only" });
  if (e?.code === "EBUSY") throw new VolumeError("CONFLICT", `${op} ${resolve(dir)}: conflicting changes`, { cause: err, hint: "pick --on-conflict ours or theirs" });
  throw VolumeError.IO(`${op} ${resolve(dir)}`, err);
}

// ---- commands ----

async function cmdMount(args: ParsedArgs, io: CliIO): Promise<number> {
  const [name, dir] = args.positionals;
  if (!name || !dir) throw usage("mount: missing arguments", commands.mount.usage);
  const abs = resolve(dir);
  const labels = labelsOf(args.values.label);
  if (await isFuseMountPoint(abs)) {
    throw new VolumeError("ALREADY_EXISTS", `mount ${abs}: already a mount point`, { hint: `unmount it first with \`strata unmount ${abs}\`` });
  }
  // Options are checked here, before a daemon is started, so that a mistake in one is this
  // process's error.
  const overrides: Partial<StrataConfig> = {};
  const cacheDir = str(args.values["cache-dir"]);
  const cacheSize = str(args.values["cache-size"]);
  if (cacheDir) {
    overrides.cacheDir = resolve(cacheDir);
    const st = await stat(overrides.cacheDir).catch(() => undefined);
    if (st && !st.isDirectory()) throw VolumeError.NOT_A_DIRECTORY(overrides.cacheDir, { op: "mount: --cache-dir", hint: "give a directory for the cache (a missing one is made)" });
  }
  if (cacheSize) overrides.cacheBytes = parseSize(cacheSize, "--cache-size");
  const config = loadConfig(io.env, overrides);
  if (args.values.daemon === true) return daemonize(abs, config.home, io);

  const at = str(args.values.at);
  const readOnly = args.values["read-only"] === true || at !== undefined;
  const c = Strata.connect(config, { labels: { tool: "mount", ...labels } });
  let fs: MountFs | undefined;
  try {
    fs = await openVolumeMount(c, name, abs, { at, readOnly, labels });
    const m = await mountFs(fs, abs, { readOnly, immutable: at !== undefined, debug: !!io.env.STRATA_FUSE_DEBUG });
    const pidFile = mountPidFile(c.config.home, abs);
    await mkdir(join(c.config.home, "mounts"), { recursive: true });
    await writeFile(pidFile, `${process.pid}\n`);
    io.stderr.write(`strata: mounted ${name} at ${abs}\n`);
    await new Promise<void>((done) => {
      let stopping = false;
      const stop = (why: string) => {
        if (stopping) return;
        stopping = true;
        clearInterval(watch);
        process.off("SIGINT", onSignal);
        process.off("SIGTERM", onSignal);
        if (why) io.stderr.write(`strata: ${why}; unmounting ${abs}\n`);
        m.unmount().then(done, (err) => {
          io.stderr.write(`strata: unmount ${abs}: ${(err as Error).message}\n`);
          done();
        });
      };
      const onSignal = (sig: NodeJS.Signals) => stop(`got ${sig}`);
      process.on("SIGINT", onSignal);
      process.on("SIGTERM", onSignal);
      const watch = setInterval(() => {
        isFuseMountPoint(abs).then((live) => live || stop(""), () => undefined);
      }, 500);
    });
    fs = undefined;
    await rm(pidFile, { force: true });
    return 0;
  } finally {
    await fs?.close().catch(() => undefined);
    await c.close();
    // fuse-native keeps a handle on the event loop when the kernel mount was detached from outside.
    setTimeout(() => process.exit(), 200).unref();
  }
}

async function daemonize(abs: string, home: string, io: CliIO): Promise<number> {
  const argv = process.argv.slice(1).filter((a) => a !== "--daemon");
  await mkdir(join(home, "logs"), { recursive: true });
  const logPath = join(home, "logs", `mount-${abs.replace(/[^A-Za-z0-9._-]+/g, "_")}.log`);
  const log = openSync(logPath, "a");
  const child = spawn(process.execPath, [...process.execArgv, ...argv], { detached: true, stdio: ["ignore", log, log], env: io.env });
  closeSync(log);
  let exited: number | null | undefined;
  child.on("exit", (code) => (exited = code));
  child.unref();
  for (let waited = 0; ; waited += 50) {
    if (exited !== undefined) {
      // The mount process's own error (its last line and hint) is the answer, with its exit code.
      const own = (await readFile(logPath, "utf8").catch(() => "")).trim().split("\n").slice(-2);
      const isError = (l: string | undefined) => /^strata: .*\([A-Z_]+\)$/.test(l ?? "");
      if (exited !== 0 && exited !== null) {
        if (isError(own[0]) && /^hint: /.test(own[1] ?? "")) {
          io.stderr.write(`${own.join("\n")}\n`);
          return exited;
        }
        if (isError(own[1])) {
          io.stderr.write(`${own[1]}\n`);
          return exited;
        }
      }
      throw new VolumeError("IO", `mount ${abs}: the mount process exited with code ${exited}`, { hint: `see ${logPath}` });
    }
    if (await stat(controlPath(abs, "version")).then(() => true, () => false)) break;
    if (waited > 120_000) throw new VolumeError("IO", `mount ${abs}: not live after 120 s`, { hint: `see ${logPath}` });
    await sleep(50);
  }
  io.stdout.write(`${child.pid}\n`);
  return 0;
}

async function cmdUnmount(args: ParsedArgs, io: CliIO): Promise<void> {
  const [dir] = args.positionals;
  if (!dir) throw usage("unmount: missing DIR", commands.unmount.usage);
  const abs = resolve(dir);
  const pidFile = mountPidFile(loadConfig(io.env).home, abs);
  const pid = Number((await readFile(pidFile, "utf8").catch(() => "")).trim()) || undefined;
  if (!(await forceUnmount(abs))) {
    throw new VolumeError("INVALID_ARGUMENT", `unmount ${abs}: not a mount point`, { hint: "list mounts with `grep fuse /proc/mounts`" });
  }
  for (let waited = 0; pid !== undefined && processAlive(pid) && waited < 30_000; waited += 50) await sleep(50);
  await rm(pidFile, { force: true });
  io.stderr.write(`strata: unmounted ${abs}\n`);
}

async function cmdSync(args: ParsedArgs, io: CliIO): Promise<void> {
  const [dir] = args.positionals;
  if (!dir) throw usage("sync: missing DIR", commands.sync.usage);
  const policy = str(args.values["on-conflict"]);
  if (policy !== undefined && !["fail", "ours", "theirs"].includes(policy)) throw usage(`sync: bad --on-conflict ${JSON.stringify(policy)}`, commands.sync.usage);
  await checkMount(dir, "sync");
  const req: Record<string, unknown> = {};
  const message = str(args.values.message);
  if (message !== undefined) req.message = message;
  if (policy !== undefined) req.onConflict = policy;
  let res: Record<string, unknown>;
  try {
    res = await askControl(controlPath(dir, "sync"), JSON.stringify(req));
  } catch (err) {
    controlError(err, "sync", dir);
  }
  io.stdout.write(`${res.version ?? ""}\n`);
}

async function cmdReload(args: ParsedArgs, io: CliIO): Promise<void> {
  const [dir] = args.positionals;
  if (!dir) throw usage("reload: missing DIR", commands.reload.usage);
  await checkMount(dir, "reload");
  const discard = args.values.discard === true;
  const fh = await open(controlPath(dir, "reload"), "r+").catch((err) => controlError(err, "reload", dir));
  try {
    await fh.write(discard ? "discard" : "1", 0, "utf8");
  } catch (err) {
    const status = await readControl(controlPath(dir, "status")).then((t) => JSON.parse(t) as { staged?: Record<string, string[]> }, () => undefined);
    const staged = Object.values(status?.staged ?? {}).reduce((n, l) => n + l.length, 0);
    if (!discard && staged > 0) {
      throw new VolumeError("CONFLICT", `reload ${resolve(dir)}: ${staged} staged change(s) would be lost`, { cause: err, hint: `sync them with \`strata sync ${dir}\`, or drop them with \`strata reload ${dir} --discard\`` });
    }
    controlError(err, "reload", dir);
  } finally {
    await fh.close().catch(() => undefined);
  }
  io.stdout.write(`${(await readControl(controlPath(dir, "version"))).trim()}\n`);
}

async function cmdStatus(args: ParsedArgs, io: CliIO): Promise<void> {
  const [dir] = args.positionals;
  if (!dir) throw usage("status: missing DIR", commands.status.usage);
  await checkMount(dir, "status");
  let res: Record<string, unknown>;
  try {
    res = parseAnswer(await readControl(controlPath(dir, "status")), controlPath(dir, "status"));
  } catch (err) {
    controlError(err, "status", dir);
  }
  const staged = (res.staged ?? { added: [], modified: [], removed: [] }) as { added: string[]; modified: string[]; removed: string[] };
  const out = { volume: res.volume, base: res.base ?? null, staged: { added: staged.added ?? [], modified: staged.modified ?? [], removed: staged.removed ?? [] } };
  if (args.values.json === true) {
    io.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
    return;
  }
  io.stdout.write(`volume ${out.volume}\nbase   ${out.base ?? "(empty)"}\n`);
  for (const p of out.staged.added) io.stdout.write(`A ${shownName(p)}\n`);
  for (const p of out.staged.modified) io.stdout.write(`M ${shownName(p)}\n`);
  for (const p of out.staged.removed) io.stdout.write(`D ${shownName(p)}\n`);
}

/** The code of the mount commands, for cli.ts. */
export const run: GroupRun<"mount"> = { mount: cmdMount, unmount: cmdUnmount, sync: cmdSync, reload: cmdReload, status: cmdStatus };
