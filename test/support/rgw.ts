/**
 * A real S3 server for tests and benchmarks: a single-node Ceph cluster (one mon, one memstore
 * OSD, radosgw) on 127.0.0.1, started in well under a few seconds.
 *
 * Layout of `dir` (a temp dir by default):
 *   ceph.conf, monmap, mon/ceph-a/, osd/ceph-0/, run/ (admin sockets), log/<daemon>.log
 * Shared state, one per port, in the OS temp dir:
 *   strata-rgw-<port>.json  { dir, pids, persistent, users }   strata-rgw-<port>.lock
 * Invariants: a cluster is reused by every process that finds it answering on its port with our
 * keys; it is killed when its last live user releases it, unless it was started `persistent`
 * (standalone `start`), which only `stop` ends. Memstore keeps data in RAM: stopping loses it.
 *
 * Standalone: `node --import tsx test/support/rgw.ts start|stop|status [port]`.
 */
import { execFile, spawn } from "node:child_process";
import { closeSync, openSync, readFileSync } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, unlink, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { randomUUID } from "node:crypto";
import { ListBucketsCommand, S3Client } from "@aws-sdk/client-s3";

/** Access key of the test user every cluster started here has. */
export const RGW_ACCESS_KEY_ID = "STRATATESTACCESSKEY";
/** Secret key of the test user. */
export const RGW_SECRET_ACCESS_KEY = "stratatestsecretkey0123456789";
/** Region name clients should sign with (RGW accepts any). */
export const RGW_REGION = "us-east-1";

/** Options of `startRgw`. */
export interface RgwOptions {
  /** Work dir for the cluster; default a fresh temp dir (removed on stop). */
  dir?: string;
  /** S3 port on 127.0.0.1; default 7480. The mon listens on port+10, daemons on port+11..port+40. */
  port?: number;
  /** RAM the memstore OSD may hold, in bytes; default 8 GiB (only what is stored is used). */
  memstoreBytes?: number;
  /** Time limit of each start step, in ms; default 30 000. */
  stepTimeoutMs?: number;
  /** Keep running after every user released it (only `stopRgw` ends it); default false. */
  persistent?: boolean;
}

/** A running (started or reused) RGW. */
export interface RgwHandle {
  /** e.g. "http://127.0.0.1:7480". */
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
  /** True when this call found a cluster already answering and reused it. */
  reused: boolean;
  /** Work dir of the cluster, when known. */
  dir: string | undefined;
  /** Releases this process's use; kills the cluster if no other live process uses it and it is not persistent. Idempotent. */
  stop(): Promise<void>;
}

interface RgwState {
  port: number;
  dir: string;
  pids: number[];
  persistent: boolean;
  users: number[];
}

const statePath = (port: number) => join(tmpdir(), `strata-rgw-${port}.json`);
const lockPath = (port: number) => join(tmpdir(), `strata-rgw-${port}.lock`);
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

async function withLock<T>(port: number, fn: () => Promise<T>, timeoutMs = 120_000): Promise<T> {
  const path = lockPath(port);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      const fd = openSync(path, "wx");
      await writeFile(path, String(process.pid));
      closeSync(fd);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      let holder = NaN;
      try {
        holder = Number(readFileSync(path, "utf8"));
      } catch {
        continue;
      }
      if (holder > 0 && !alive(holder)) {
        await unlink(path).catch(() => undefined);
        continue;
      }
      if (Date.now() > deadline) throw new Error(`start rgw: lock ${path}: held by pid ${holder} for too long`);
      await sleep(100);
    }
  }
  try {
    return await fn();
  } finally {
    await unlink(path).catch(() => undefined);
  }
}

async function readState(port: number): Promise<RgwState | undefined> {
  try {
    return JSON.parse(await readFile(statePath(port), "utf8")) as RgwState;
  } catch {
    return undefined;
  }
}

function httpStatus(port: number, timeoutMs: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    const req = request({ host: "127.0.0.1", port, path: "/", method: "GET", timeout: timeoutMs, agent: false }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode));
    });
    req.on("timeout", () => req.destroy());
    req.on("error", () => resolve(undefined));
    req.end();
  });
}

async function answersWithOurKeys(port: number): Promise<boolean> {
  if ((await httpStatus(port, 2000)) === undefined) return false;
  const client = new S3Client({
    endpoint: `http://127.0.0.1:${port}`,
    region: RGW_REGION,
    forcePathStyle: true,
    maxAttempts: 1,
    credentials: { accessKeyId: RGW_ACCESS_KEY_ID, secretAccessKey: RGW_SECRET_ACCESS_KEY },
  });
  try {
    await client.send(new ListBucketsCommand({}), { abortSignal: AbortSignal.timeout(5000) });
    return true;
  } catch {
    return false;
  } finally {
    client.destroy();
  }
}

async function logTail(dir: string, name: string, lines = 25, ext = ".log"): Promise<string> {
  try {
    const text = await readFile(join(dir, "log", name + ext), "utf8");
    return text.split("\n").filter((l) => l.trim() !== "").slice(-lines).join("\n");
  } catch {
    return "(no log)";
  }
}

async function stepFailed(dir: string, step: string, log: string, cause: unknown): Promise<Error> {
  const why = cause instanceof Error ? cause.message : String(cause);
  const stderr = await logTail(dir, log, 10, ".stderr");
  return new Error(
    `start rgw: ${step}: ${why}\n--- tail of ${log}.log ---\n${await logTail(dir, log)}\n--- tail of ${log}.stderr ---\n${stderr}`,
    { cause },
  );
}

function run(cmd: string, args: string[], timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { timeout: timeoutMs, killSignal: "SIGKILL" }, (err, stdout, stderr) => {
      if (err) {
        const msg = `${cmd} ${args.join(" ")} failed${err.killed ? " (timed out)" : ""}: ${stderr.trim() || err.message}`;
        reject(new Error(msg));
      } else resolve(stdout);
    });
  });
}

function daemon(cmd: string, args: string[], dir: string, name: string): number {
  const out = openSync(join(dir, "log", `${name}.stderr`), "a");
  const child = spawn(cmd, args, { detached: true, stdio: ["ignore", out, out] });
  closeSync(out);
  child.unref();
  if (child.pid === undefined) throw new Error(`spawn ${cmd}: no pid`);
  return child.pid;
}

function killAll(pids: readonly number[]): void {
  for (const pid of pids) {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      /* already gone */
    }
  }
}

function cephConf(dir: string, port: number, fsid: string, memstoreBytes: number): string {
  return `[global]
fsid = ${fsid}
mon host = v2:127.0.0.1:${port + 10}
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
mon warn on insecure global id reclaim allowed = false
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon max pg per osd = 1000
osd crush chooseleaf type = 0
ms bind ipv6 = false
ms mon client mode = crc secure
ms bind port min = ${port + 11}
ms bind port max = ${port + 40}
public addr = 127.0.0.1
paxos propose interval = 0.01
paxos min wait = 0.001
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
log file = ${dir}/log/$name.log
[mon]
mon data = ${dir}/mon/$cluster-$id
[osd]
osd data = ${dir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = ${memstoreBytes}
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:${port} tcp_nodelay=1
rgw data = ${dir}/rgw
rgw enable usage log = false
`;
}

async function bringUp(dir: string, port: number, memstoreBytes: number, stepMs: number, pids: number[]): Promise<void> {
  for (const sub of ["mon", "osd/ceph-0", "run", "log", "rgw"]) await mkdir(join(dir, sub), { recursive: true });
  const fsid = randomUUID();
  const conf = join(dir, "ceph.conf");
  await writeFile(conf, cephConf(dir, port, fsid, memstoreBytes));
  const c = ["-c", conf];
  try {
    await run("monmaptool", ["--create", "--fsid", fsid, "--addv", "a", `[v2:127.0.0.1:${port + 10}]`, join(dir, "monmap")], stepMs);
    await run("ceph-mon", [...c, "--mkfs", "-i", "a", "--monmap", join(dir, "monmap")], stepMs);
    pids.push(daemon("ceph-mon", [...c, "-f", "-i", "a"], dir, "mon.a"));
  } catch (err) {
    throw await stepFailed(dir, "start mon", "mon.a", err);
  }
  const osdUuid = randomUUID();
  try {
    const id = (await run("ceph", [...c, "--connect-timeout", String(Math.ceil(stepMs / 1000)), "osd", "new", osdUuid], stepMs)).trim();
    if (id !== "0") throw new Error(`expected osd id 0, got ${JSON.stringify(id)}`);
  } catch (err) {
    throw await stepFailed(dir, "register osd", "mon.a", err);
  }
  try {
    await run("ceph-osd", [...c, "-i", "0", "--mkfs", "--osd-uuid", osdUuid], stepMs);
    pids.push(daemon("ceph-osd", [...c, "-f", "-i", "0"], dir, "osd.0"));
  } catch (err) {
    throw await stepFailed(dir, "start osd", "osd.0", err);
  }
  try {
    pids.push(daemon("radosgw", [...c, "-f", "-n", "client.rgw"], dir, "client.rgw"));
    const deadline = Date.now() + stepMs;
    for (;;) {
      const status = await httpStatus(port, 1000);
      if (status === 200) break;
      if (!alive(pids[pids.length - 1]!)) throw new Error("radosgw exited");
      if (Date.now() > deadline) throw new Error(`no answer on 127.0.0.1:${port} after ${stepMs} ms (last status ${status ?? "none"})`);
      await sleep(50);
    }
  } catch (err) {
    throw await stepFailed(dir, "start radosgw", "client.rgw", err);
  }
  try {
    await run(
      "radosgw-admin",
      [...c, "user", "create", "--uid=strata", "--display-name=strata", `--access-key=${RGW_ACCESS_KEY_ID}`, `--secret-key=${RGW_SECRET_ACCESS_KEY}`],
      stepMs,
    );
  } catch (err) {
    throw await stepFailed(dir, "create s3 user", "client.rgw", err);
  }
  if (!(await answersWithOurKeys(port))) throw await stepFailed(dir, "check s3 user", "client.rgw", new Error("signed ListBuckets failed"));
}

/**
 * Starts a single-node Ceph RGW on 127.0.0.1:`port`, or reuses one that already answers there
 * with our keys. Throws an Error naming the failing step and the tail of its log; a port taken by
 * something else fails the "check port" step. Every started process is killed on failure.
 */
export async function startRgw(opts: RgwOptions = {}): Promise<RgwHandle> {
  const port = opts.port ?? 7480;
  const stepMs = opts.stepTimeoutMs ?? 30_000;
  const endpoint = `http://127.0.0.1:${port}`;
  const handle = (reused: boolean, dir: string | undefined): RgwHandle => {
    let released = false;
    return {
      endpoint,
      accessKeyId: RGW_ACCESS_KEY_ID,
      secretAccessKey: RGW_SECRET_ACCESS_KEY,
      region: RGW_REGION,
      reused,
      dir,
      async stop() {
        if (released) return;
        released = true;
        await releaseRgw(port);
      },
    };
  };
  return withLock(port, async () => {
    const state = await readState(port);
    if (await answersWithOurKeys(port)) {
      if (state !== undefined) {
        state.users = [...state.users.filter(alive), process.pid];
        await writeFile(statePath(port), JSON.stringify(state));
      }
      return handle(true, state?.dir);
    }
    if (state !== undefined) {
      killAll(state.pids);
      await rm(state.dir, { recursive: true, force: true });
      await unlink(statePath(port)).catch(() => undefined);
    }
    if ((await httpStatus(port, 1000)) !== undefined) {
      throw new Error(`start rgw: check port: 127.0.0.1:${port} answers but not as our rgw (wrong keys?)`);
    }
    const dir = opts.dir ?? (await mkdtemp(join(tmpdir(), "strata-rgw-")));
    const pids: number[] = [];
    try {
      await bringUp(dir, port, opts.memstoreBytes ?? 8 * 2 ** 30, stepMs, pids);
    } catch (err) {
      killAll(pids);
      if (opts.dir === undefined) await rm(dir, { recursive: true, force: true });
      throw err;
    }
    const next: RgwState = { port, dir, pids, persistent: opts.persistent ?? false, users: [process.pid] };
    await writeFile(statePath(port), JSON.stringify(next));
    return handle(false, dir);
  });
}

async function releaseRgw(port: number): Promise<void> {
  await withLock(port, async () => {
    const state = await readState(port);
    if (state === undefined) return;
    state.users = state.users.filter((p) => p !== process.pid && alive(p));
    if (state.users.length > 0 || state.persistent) {
      await writeFile(statePath(port), JSON.stringify(state));
      return;
    }
    await teardown(state);
  });
}

async function teardown(state: RgwState): Promise<void> {
  killAll(state.pids);
  await rm(state.dir, { recursive: true, force: true });
  await unlink(statePath(state.port)).catch(() => undefined);
}

/** Kills the cluster on `port` that was started here (by any process) and removes its dir. Idempotent. */
export async function stopRgw(port = 7480): Promise<boolean> {
  return withLock(port, async () => {
    const state = await readState(port);
    if (state === undefined) return false;
    await teardown(state);
    return true;
  });
}

async function main(argv: string[]): Promise<number> {
  const [cmd, portArg] = argv;
  const port = portArg === undefined ? 7480 : Number(portArg);
  if (cmd === "start") {
    const t0 = Date.now();
    const h = await startRgw({ port, persistent: true });
    console.log(`# rgw ${h.reused ? "reused" : `started in ${Date.now() - t0} ms`}${h.dir ? ` (dir ${h.dir})` : ""}`);
    console.log(`export STRATA_TEST_S3_ENDPOINT=${h.endpoint}`);
    console.log(`export AWS_ACCESS_KEY_ID=${h.accessKeyId}`);
    console.log(`export AWS_SECRET_ACCESS_KEY=${h.secretAccessKey}`);
    console.log(`export AWS_REGION=${h.region}`);
    return 0;
  }
  if (cmd === "stop") {
    console.log((await stopRgw(port)) ? `# rgw on port ${port} stopped` : `# no rgw started here on port ${port}`);
    return 0;
  }
  if (cmd === "status") {
    const ok = await answersWithOurKeys(port);
    console.log(ok ? `# rgw answers on http://127.0.0.1:${port}` : `# no rgw on port ${port}`);
    return ok ? 0 : 1;
  }
  console.error("usage: node --import tsx test/support/rgw.ts start|stop|status [port]");
  return 2;
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err instanceof Error ? err.message : String(err));
      process.exit(1);
    },
  );
}
