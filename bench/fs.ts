/**
 * fs: the mounted file system side by side with its peers, in one run, on the same Ceph RGW.
 *
 * Targets: raw local disk; a minimal JS FUSE pass-through to local disk (the ceiling of any
 * fuse-native file system here); fuse-overlayfs on local disk (a native FUSE file system, for
 * what FUSE itself costs on this machine); the Strata mount on S3; `rclone mount --vfs-cache-mode writes`;
 * `s3fs`. Scenarios, each as time and ratio to raw disk: a sequential write of one big file then
 * sync (until it is durable in the store), a cold read (page cache dropped, caches emptied, peers
 * remounted) and a warm read of it, small-file creates/s and stats/s, and a developer workload
 * (untar a source tree of 20k+ files built from this repo's node_modules, `git init && git add -A
 * && git commit`, then sync). Raw S3 PUT and GET of the same bytes are measured in the same run.
 *
 * Sizes: FS_BENCH_FILE_MB (1024), FS_BENCH_FILES (10000), FS_BENCH_DEV_COPIES (4),
 * FS_BENCH_TARGETS (all: raw,passthrough,overlay,strata,rclone,s3fs), FS_BENCH_STEP_TIMEOUT_S (120).
 * Needs root (drop_caches, mounts), rclone, s3fs and fuse-overlayfs (scripts/install-peers.sh).
 *
 * Run: `npm run bench -- fs`, or `node --import tsx bench/fs.ts`.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { CreateBucketCommand, GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { median, report, type Row } from "./report.js";
import { startRgw, type RgwHandle } from "../test/support/rgw.js";

const exec = promisify(execFile);
const ROOT = resolve(fileURLToPath(new URL("..", import.meta.url)));
const MB = 1024 * 1024;
const env = process.env;
const FILE_MB = Number(env.FS_BENCH_FILE_MB ?? 1024);
const FILES = Number(env.FS_BENCH_FILES ?? 10_000);
const DEV_COPIES = Number(env.FS_BENCH_DEV_COPIES ?? 4);
const STEP_TIMEOUT_MS = Number(env.FS_BENCH_STEP_TIMEOUT_S ?? 120) * 1000;
const ALL = ["raw", "passthrough", "overlay", "strata", "rclone", "s3fs"];
const TARGETS = (env.FS_BENCH_TARGETS ?? ALL.join(",")).split(",").filter((t) => ALL.includes(t));

/** One file system under test. */
interface Target {
  name: string;
  /** The directory benchmarks write into. */
  dir: string;
  /** Mounts (or prepares) `dir`; called again after `unmount` for a cold start. */
  mount(): Promise<void>;
  unmount(): Promise<void>;
  /** Makes everything written so far durable in the target's store. */
  sync(): Promise<void>;
  /** Empties the target's own caches (called while unmounted). */
  dropOwnCache(): Promise<void>;
  /** Reads from the S3 server: its cold read is also compared with a raw GET made right before it. */
  s3?: boolean;
}

interface Measure {
  seconds?: number;
  error?: string;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

async function sh(cmd: string, opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<string> {
  const { stdout } = await exec("sh", ["-c", cmd], { cwd: opts.cwd, env: opts.env ?? env, timeout: opts.timeoutMs ?? STEP_TIMEOUT_MS, maxBuffer: 64 * MB });
  return stdout;
}

async function timed(fn: () => Promise<unknown>): Promise<Measure> {
  const t0 = performance.now();
  try {
    await fn();
    return { seconds: (performance.now() - t0) / 1000 };
  } catch (err) {
    const e = err as Error & { killed?: boolean; stderr?: string };
    const why = (e.stderr ?? "").trim().split("\n").slice(-1)[0] || (e.message ?? String(err)).split("\n")[0]!;
    return { error: e.killed ? `timeout (> ${STEP_TIMEOUT_MS / 1000} s)` : why.slice(0, 160) };
  }
}

/** Runs dd and gives its own figure for the copy (process start-up excluded). */
async function ddSeconds(cmd: string): Promise<number> {
  const out = await sh(`${cmd} 2>&1`);
  const m = /copied, ([0-9.e+-]+) s/.exec(out);
  if (!m) throw new Error(`dd said: ${out.trim().split("\n").pop()}`);
  return Number(m[1]);
}

/**
 * A read of a file already in the page cache takes about 0.1 s per GiB here, as long as
 * starting a shell and dd: one timed run measured mostly noise. The median of WARM_RUNS runs of
 * dd's own figure, the same for every target.
 */
const WARM_RUNS = 5;
async function warmRead(file: string): Promise<Measure> {
  try {
    const runs: number[] = [];
    for (let i = 0; i < WARM_RUNS; i++) runs.push(await ddSeconds(`dd if=${file} of=/dev/null bs=1M`));
    return { seconds: median(runs) };
  } catch (err) {
    return { error: (err as Error).message.split("\n")[0]!.slice(0, 160) };
  }
}

async function dropPageCache(): Promise<void> {
  await sh("sync; echo 3 > /proc/sys/vm/drop_caches");
}

async function waitFor(check: () => boolean | Promise<boolean>, what: string, ms = 60_000): Promise<void> {
  const t0 = Date.now();
  while (!(await check())) {
    if (Date.now() - t0 > ms) throw new Error(`wait for ${what}: timed out`);
    await sleep(50);
  }
}

function isMounted(dir: string): boolean {
  return readFileSync("/proc/self/mountinfo", "utf8").split("\n").some((l) => l.split(" ")[4] === dir);
}

async function fuseUnmount(dir: string): Promise<void> {
  if (!isMounted(dir)) return;
  await sh(`fusermount -u ${JSON.stringify(dir)} || fusermount -uz ${JSON.stringify(dir)} || umount -l ${JSON.stringify(dir)}`).catch(() => undefined);
  await waitFor(() => !isMounted(dir), `unmount ${dir}`, 30_000).catch(() => undefined);
}

// ---- targets ----

function rawTarget(base: string): Target {
  const dir = join(base, "raw");
  return {
    name: "raw disk",
    dir,
    async mount() {
      mkdirSync(dir, { recursive: true });
    },
    async unmount() {},
    async sync() {
      await sh("sync");
    },
    async dropOwnCache() {},
  };
}

function serveChild(args: string[], log: string, childEnv: NodeJS.ProcessEnv = env): ChildProcess {
  const fd = openSync(log, "a");
  const child = spawn(process.execPath, ["--import", "tsx", ...args], { cwd: ROOT, stdio: ["ignore", fd, fd], env: childEnv });
  closeSync(fd);
  return child;
}

function passthroughTarget(base: string): Target {
  const dir = join(base, "passthrough");
  const src = join(base, "passthrough-src");
  let child: ChildProcess | undefined;
  return {
    name: "JS FUSE pass-through",
    dir,
    async mount() {
      mkdirSync(src, { recursive: true });
      mkdirSync(dir, { recursive: true });
      child = serveChild([fileURLToPath(import.meta.url), "serve-passthrough", src, dir], join(base, "passthrough.log"));
      await waitFor(() => isMounted(dir), "pass-through mount");
    },
    async unmount() {
      await fuseUnmount(dir);
      child?.kill("SIGTERM");
      child = undefined;
    },
    async sync() {
      await sh("sync");
    },
    async dropOwnCache() {},
  };
}

/**
 * fuse-overlayfs (C, libfuse 3) over local disk: a native FUSE file system that stages writes in
 * a local upper directory as Strata does, without S3. What any FUSE daemon, not only ours, costs
 * on this machine: the reference for the figures of the request-bound scenarios.
 */
function overlayTarget(base: string): Target {
  const dir = join(base, "overlay");
  const layers = ["lower", "upper", "work"].map((l) => join(base, `overlay-${l}`));
  return {
    name: "native FUSE overlay (fuse-overlayfs, local disk)",
    dir,
    async mount() {
      for (const d of [dir, ...layers]) mkdirSync(d, { recursive: true });
      const [lower, upper, work] = layers as [string, string, string];
      await sh(`fuse-overlayfs -o lowerdir=${lower},upperdir=${upper},workdir=${work} ${JSON.stringify(dir)}`);
      await waitFor(() => isMounted(dir), "fuse-overlayfs mount");
    },
    async unmount() {
      await fuseUnmount(dir);
    },
    async sync() {
      await sh("sync");
    },
    async dropOwnCache() {},
  };
}

function strataTarget(base: string, s3: S3Info): Target {
  const dir = join(base, "strata");
  const home = join(base, "strata-home");
  const cache = join(home, "cache");
  const strataEnv: NodeJS.ProcessEnv = {
    ...env,
    STRATA_HOME: home,
    STRATA_STORE: `s3://${s3.bucket("strata")}/vol`,
    STRATA_S3_ENDPOINT: s3.endpoint,
    STRATA_CACHE_DIR: cache,
    AWS_ACCESS_KEY_ID: s3.accessKeyId,
    AWS_SECRET_ACCESS_KEY: s3.secretAccessKey,
    AWS_REGION: s3.region,
  };
  const strata = (args: string) => sh(`node --import tsx ${join(ROOT, "sdk/main.ts")} ${args}`, { env: strataEnv, cwd: ROOT });
  let created = false;
  return {
    name: "Strata (S3)",
    s3: true,
    dir,
    async mount() {
      if (!created) {
        await strata("volume create bench");
        created = true;
      }
      await strata(`mount bench ${JSON.stringify(dir)} --daemon`);
    },
    async unmount() {
      await strata(`unmount ${JSON.stringify(dir)}`).catch(() => undefined);
      await waitFor(() => !isMounted(dir), "strata unmount", 30_000).catch(() => undefined);
      await sleep(500);
    },
    async sync() {
      await strata(`sync ${JSON.stringify(dir)} --message bench`);
    },
    async dropOwnCache() {
      rmSync(cache, { recursive: true, force: true });
    },
  };
}

function rcloneTarget(base: string, s3: S3Info): Target {
  const dir = join(base, "rclone");
  const cache = join(base, "rclone-cache");
  const rcPort = 5572 + Math.floor(Math.random() * 1000);
  const rEnv: NodeJS.ProcessEnv = {
    ...env,
    RCLONE_CONFIG_RGW_TYPE: "s3",
    RCLONE_CONFIG_RGW_PROVIDER: "Ceph",
    RCLONE_CONFIG_RGW_ENDPOINT: s3.endpoint,
    RCLONE_CONFIG_RGW_ACCESS_KEY_ID: s3.accessKeyId,
    RCLONE_CONFIG_RGW_SECRET_ACCESS_KEY: s3.secretAccessKey,
    RCLONE_CONFIG_RGW_REGION: s3.region,
    RCLONE_CONFIG_RGW_FORCE_PATH_STYLE: "true",
  };
  delete rEnv.AWS_CA_BUNDLE;
  let child: ChildProcess | undefined;
  return {
    name: "rclone mount (vfs writes)",
    s3: true,
    dir,
    async mount() {
      mkdirSync(dir, { recursive: true });
      const fd = openSync(join(base, "rclone.log"), "a");
      child = spawn(
        "rclone",
        ["mount", `rgw:${s3.bucket("rclone")}`, dir, "--vfs-cache-mode", "writes", "--cache-dir", cache, "--vfs-write-back", "0s", "--rc", "--rc-addr", `127.0.0.1:${rcPort}`, "--rc-no-auth"],
        { stdio: ["ignore", fd, fd], env: rEnv },
      );
      closeSync(fd);
      await waitFor(() => isMounted(dir), "rclone mount");
    },
    async unmount() {
      await this.sync().catch(() => undefined);
      await fuseUnmount(dir);
      child?.kill("SIGTERM");
      child = undefined;
      await sleep(300);
    },
    async sync() {
      await sh("sync");
      for (let idle = 0; idle < 3; ) {
        const out = await sh(`rclone rc --url http://127.0.0.1:${rcPort}/ vfs/stats`, { env: rEnv });
        const d = (JSON.parse(out) as { diskCache?: { uploadsInProgress?: number; uploadsQueued?: number } }).diskCache;
        idle = !d || ((d.uploadsInProgress ?? 0) === 0 && (d.uploadsQueued ?? 0) === 0) ? idle + 1 : 0;
        await sleep(100);
      }
      const local = Number((await sh(`find ${JSON.stringify(dir)} -type f -printf '%s\\n' | awk '{s+=$1} END {print s+0}'`)).trim());
      await waitFor(async () => (await bucketBytes(s3, s3.bucket("rclone"))) >= local, "rclone uploads", STEP_TIMEOUT_MS);
    },
    async dropOwnCache() {
      rmSync(cache, { recursive: true, force: true });
    },
  };
}

function s3fsTarget(base: string, s3: S3Info): Target {
  const dir = join(base, "s3fs");
  const passwd = join(base, "s3fs.passwd");
  return {
    name: "s3fs",
    s3: true,
    dir,
    async mount() {
      mkdirSync(dir, { recursive: true });
      writeFileSync(passwd, `${s3.accessKeyId}:${s3.secretAccessKey}\n`, { mode: 0o600 });
      const e = { ...env };
      delete e.AWS_CA_BUNDLE;
      await sh(`s3fs ${s3.bucket("s3fs")} ${JSON.stringify(dir)} -o url=${s3.endpoint} -o use_path_request_style -o passwd_file=${passwd} -o endpoint=${s3.region} -o logfile=${join(base, "s3fs.log")}`, { env: e });
      await waitFor(() => isMounted(dir), "s3fs mount");
    },
    async unmount() {
      await fuseUnmount(dir);
    },
    async sync() {
      await sh("sync");
    },
    async dropOwnCache() {},
  };
}

// ---- S3 ----

interface S3Info {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
  client: S3Client;
  bucket(name: string): string;
}

async function s3Setup(rgw: RgwHandle): Promise<S3Info> {
  const client = new S3Client({
    endpoint: rgw.endpoint,
    region: rgw.region,
    forcePathStyle: true,
    credentials: { accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey },
    requestChecksumCalculation: "WHEN_REQUIRED",
    responseChecksumValidation: "WHEN_REQUIRED",
  });
  const run = Date.now().toString(36);
  const made = new Set<string>();
  const info: S3Info = { endpoint: rgw.endpoint, accessKeyId: rgw.accessKeyId, secretAccessKey: rgw.secretAccessKey, region: rgw.region, client, bucket: (n) => `fsbench-${run}-${n}` };
  for (const n of ["strata", "rclone", "s3fs", "raw"]) {
    const b = info.bucket(n);
    if (!made.has(b)) await client.send(new CreateBucketCommand({ Bucket: b }));
    made.add(b);
  }
  return info;
}

async function bucketBytes(s3: S3Info, bucket: string): Promise<number> {
  let total = 0;
  let token: string | undefined;
  do {
    const r = await s3.client.send(new ListObjectsV2Command({ Bucket: bucket, ContinuationToken: token }));
    for (const o of r.Contents ?? []) total += o.Size ?? 0;
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return total;
}

/** Size of the raw S3 objects. */
const RAW_PART = 16 * MB;

/** Runs `fn(0)`…`fn(n - 1)`, four at a time. */
async function fourAtATime(n: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: 4 }, async () => {
      for (let i = next++; i < n; i = next++) await fn(i);
    }),
  );
}

/** Raw PUT and GET of `src` as 16 MiB objects, 4 at a time: seconds each. */
async function rawS3(s3: S3Info, src: string): Promise<{ put: Measure; get: Measure }> {
  const { open } = await import("node:fs/promises");
  const fh = await open(src, "r");
  const n = Math.ceil(statSync(src).size / RAW_PART);
  const put = await timed(() =>
    fourAtATime(n, async (i) => {
      const buf = Buffer.alloc(RAW_PART);
      const { bytesRead } = await fh.read(buf, 0, RAW_PART, i * RAW_PART);
      await s3.client.send(new PutObjectCommand({ Bucket: s3.bucket("raw"), Key: `part-${i}`, Body: buf.subarray(0, bytesRead) }));
    }),
  );
  await fh.close();
  return { put, get: await rawGet(s3, n) };
}

/** Raw GET of the `n` objects `rawS3` put, 4 at a time: seconds. */
function rawGet(s3: S3Info, n: number): Promise<Measure> {
  return timed(() =>
    fourAtATime(n, async (i) => {
      const r = await s3.client.send(new GetObjectCommand({ Bucket: s3.bucket("raw"), Key: `part-${i}` }));
      for await (const _ of r.Body as AsyncIterable<Uint8Array>) void _;
    }),
  );
}

// ---- workloads ----

function makeRandomFile(path: string, mb: number): void {
  const fd = openSync(path, "w");
  const block = randomBytes(4 * MB);
  for (let i = 0; i < mb / 4; i++) {
    block.writeUInt32LE(i, 0);
    block.writeUInt32LE(i * 7919, 4 * MB - 4);
    for (let j = 0; j < 4 * MB; j += 64 * 1024) block.writeUInt32LE((i * 64 + j) >>> 0, j);
    writeSync(fd, block);
  }
  closeSync(fd);
}

async function makeDevTarball(base: string): Promise<{ path: string; files: number }> {
  const tree = join(base, "devtree");
  mkdirSync(tree, { recursive: true });
  for (let i = 0; i < DEV_COPIES; i++) {
    await sh(`cd ${JSON.stringify(ROOT)} && find node_modules -type f -size -128k -print0 | tar --null --hard-dereference -T - -cf - | (mkdir -p ${tree}/copy${i} && tar -xf - -C ${tree}/copy${i})`);
  }
  const files = Number((await sh(`find ${tree} -type f | wc -l`)).trim());
  const path = join(base, "devtree.tar");
  await sh(`tar --hard-dereference -cf ${path} -C ${tree} .`);
  rmSync(tree, { recursive: true, force: true });
  return { path, files };
}

/** Runs a node script in a child process (the bench process itself never touches a mount it serves, but keeps its loop free). */
async function nodeScript(code: string, args: string[]): Promise<string> {
  const { stdout } = await exec(process.execPath, ["-e", code, ...args], { timeout: STEP_TIMEOUT_MS, maxBuffer: 16 * MB });
  return stdout;
}

const CREATE_SCRIPT = `
const fs = require("node:fs"); const [dir, n] = process.argv.slice(1);
fs.mkdirSync(dir, { recursive: true });
const body = Buffer.alloc(100, 120);
const t0 = performance.now();
for (let i = 0; i < Number(n); i++) fs.writeFileSync(dir + "/f" + i, body);
const t1 = performance.now();
for (let i = 0; i < Number(n); i++) fs.statSync(dir + "/f" + i);
const t2 = performance.now();
console.log(JSON.stringify({ create: (t1 - t0) / 1000, stat: (t2 - t1) / 1000 }));`;

interface TargetResult {
  name: string;
  write?: Measure;
  writeSync?: Measure;
  cold?: Measure;
  /** A raw GET of the same bytes from the same server, right before the cold read (S3 targets). */
  coldGet?: Measure;
  warm?: Measure;
  creates?: Measure;
  stats?: Measure;
  untar?: Measure;
  git?: Measure;
  devSync?: Measure;
  dev?: Measure;
}

async function benchTarget(t: Target, srcFile: string, tarball: string, get: () => Promise<Measure>): Promise<TargetResult> {
  const r: TargetResult = { name: t.name };
  const log = (s: string) => process.stderr.write(`fs bench: ${t.name}: ${s}\n`);
  try {
    await t.mount();
  } catch (err) {
    r.write = { error: `mount: ${(err as Error).message.split("\n")[0]}` };
    return r;
  }
  try {
    const big = join(t.dir, "big.bin");
    log("sequential write");
    const w = await timed(() => sh(`dd if=${srcFile} of=${big} bs=1M conv=fsync status=none`));
    const s = w.error ? w : await timed(() => t.sync());
    r.write = w;
    r.writeSync = w.error || s.error ? { error: w.error ?? s.error } : { seconds: w.seconds! + s.seconds! };

    log("cold read");
    await t.unmount();
    await t.dropOwnCache();
    await dropPageCache();
    // The raw GET the cold read is held to, in the same state of the machine and the server: a
    // GET at the start of the run, before the other targets churned memory, can be twice as fast
    // on a VM whose freed memory goes back to the host.
    if (t.s3) r.coldGet = await get();
    await t.mount();
    r.cold = await timed(() => sh(`dd if=${big} of=/dev/null bs=1M status=none`));
    log("warm read");
    r.warm = await warmRead(big);
    await timed(() => sh(`rm -f ${big}`));

    log(`${FILES} creates and stats`);
    const m = await timed(async () => {
      const out = JSON.parse(await nodeScript(CREATE_SCRIPT, [join(t.dir, "small"), String(FILES)])) as { create: number; stat: number };
      r.creates = { seconds: out.create };
      r.stats = { seconds: out.stat };
    });
    if (m.error) r.creates = r.stats = m;

    log("developer workload");
    const work = join(t.dir, "dev");
    r.untar = await timed(() => sh(`mkdir -p ${work} && tar -xf ${tarball} -C ${work}`));
    r.git = r.untar.error ? { error: "skipped" } : await timed(() => sh(`git init -q && git add -A && git -c user.email=b@x -c user.name=b commit -q -m x`, { cwd: work }));
    r.devSync = r.git.error ? { error: "skipped" } : await timed(() => t.sync());
    r.dev = r.untar.error || r.git.error || r.devSync.error ? { error: r.untar.error ?? r.git.error ?? r.devSync.error } : { seconds: r.untar.seconds! + r.git.seconds! + r.devSync.seconds! };
  } finally {
    await t.unmount().catch(() => undefined);
  }
  return r;
}

function fmt(m: Measure | undefined, unit: (s: number) => string): string {
  if (!m) return "-";
  if (m.error) return `failed: ${m.error}`;
  return unit(m.seconds!);
}

/** Runs the benchmark; prints the table, writes bench/results/fs.json and the "fs" section of bench/README.md. */
export async function run(): Promise<unknown> {
  env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  const base = await mkdtemp(join("/var/tmp", "strata-fsbench-"));
  const rgw = await startRgw({});
  const results: TargetResult[] = [];
  let raw: { put: Measure; get: Measure } = { put: {}, get: {} };
  let devFiles = 0;
  try {
    const s3 = await s3Setup(rgw);
    const srcFile = join(base, "source.bin");
    process.stderr.write(`fs bench: making a ${FILE_MB} MiB source file and the developer tarball\n`);
    makeRandomFile(srcFile, FILE_MB);
    const tar = await makeDevTarball(base);
    devFiles = tar.files;
    raw = await rawS3(s3, srcFile);
    const targets: Record<string, () => Target> = {
      raw: () => rawTarget(base),
      passthrough: () => passthroughTarget(base),
      overlay: () => overlayTarget(base),
      strata: () => strataTarget(base, s3),
      rclone: () => rcloneTarget(base, s3),
      s3fs: () => s3fsTarget(base, s3),
    };
    const parts = Math.ceil(statSync(srcFile).size / RAW_PART);
    for (const name of TARGETS) results.push(await benchTarget(targets[name]!(), srcFile, tar.path, () => rawGet(s3, parts)));
  } finally {
    await rgw.stop().catch(() => undefined);
    for (const d of readdirSync(base)) if (isMounted(join(base, d))) await fuseUnmount(join(base, d));
    await rm(base, { recursive: true, force: true }).catch(() => undefined);
  }

  const rawDisk = results.find((r) => r.name === "raw disk");
  const ratio = (m: Measure | undefined, ref: Measure | undefined, higherIsBetter: boolean): string => {
    if (!m?.seconds || !ref?.seconds) return "";
    return higherIsBetter ? ` (${((ref.seconds / m.seconds) * 100).toFixed(0)}%)` : ` (${(m.seconds / ref.seconds).toFixed(2)}×)`;
  };
  const mbps = (s: number) => `${(FILE_MB / s).toFixed(0)} MB/s`;
  const perSec = (s: number) => `${Math.round(FILES / s)}/s`;
  const secs = (s: number) => `${s.toFixed(1)} s`;
  const rows: Row[] = results.map((r) => ({
    target: r.name,
    "write+sync": fmt(r.writeSync, mbps) + ratio(r.writeSync, rawDisk?.writeSync, true),
    "cold read": fmt(r.cold, mbps) + ratio(r.cold, rawDisk?.cold, true) + (r.cold?.seconds && r.coldGet?.seconds ? `; ${((r.coldGet.seconds / r.cold.seconds) * 100).toFixed(0)}% of GET ${mbps(r.coldGet.seconds)}` : ""),
    "warm read": fmt(r.warm, mbps) + ratio(r.warm, rawDisk?.warm, true),
    creates: fmt(r.creates, perSec) + ratio(r.creates, rawDisk?.creates, true),
    stats: fmt(r.stats, perSec) + ratio(r.stats, rawDisk?.stats, true),
    untar: fmt(r.untar, secs),
    "git init+add+commit": fmt(r.git, secs),
    sync: fmt(r.devSync, secs),
    "dev total": fmt(r.dev, secs) + ratio(r.dev, rawDisk?.dev, false),
  }));
  rows.push({ target: "raw S3 (16 MiB objects ×4)", "write+sync": `PUT ${fmt(raw.put, mbps)}`, "cold read": `GET ${fmt(raw.get, mbps)}`, "warm read": "", creates: "", stats: "", untar: "", "git init+add+commit": "", sync: "", "dev total": "" });

  const st = results.find((r) => r.name === "Strata (S3)");
  const targets: string[] = [];
  if (st && rawDisk) {
    const pct = (a?: number, b?: number) => (a && b ? (b / a) * 100 : NaN);
    const rawWriteUpload = rawDisk.writeSync?.seconds !== undefined && raw.put.seconds !== undefined ? rawDisk.writeSync.seconds + raw.put.seconds : undefined;
    const peers = results.filter((r) => r.name.startsWith("rclone") || r.name === "s3fs");
    const native = results.find((r) => r.name.startsWith("native FUSE"));
    targets.push(
      `warm read ${pct(st.warm?.seconds, rawDisk.warm?.seconds).toFixed(0)}% of raw disk (target ≥ 50%)`,
      `cold read ${pct(st.cold?.seconds, st.coldGet?.seconds).toFixed(0)}% of a raw GET right before it (${fmt(st.coldGet, mbps)}; target ≥ 70%), ${pct(st.cold?.seconds, raw.get.seconds).toFixed(0)}% of the raw GET at the start of the run`,
      `write+sync ${pct(st.writeSync?.seconds, rawWriteUpload).toFixed(0)}% of raw disk write plus raw PUT (target ≥ 50%)`,
      `${st.creates?.seconds ? Math.round(FILES / st.creates.seconds) : "n/a"} creates/s (target ≥ 1000)`,
      `${st.stats?.seconds ? Math.round(FILES / st.stats.seconds) : "n/a"} stats/s (target ≥ 20000)`,
      `developer workload ${st.dev?.seconds && rawDisk.dev?.seconds ? (st.dev.seconds / rawDisk.dev.seconds).toFixed(2) : "n/a"}× raw disk (target ≤ 3×)` +
        (native?.dev?.seconds && rawDisk.dev?.seconds ? `; a native FUSE file system on local disk (fuse-overlayfs) took ${(native.dev.seconds / rawDisk.dev.seconds).toFixed(2)}× raw disk, Strata ${st.dev?.seconds ? (st.dev.seconds / native.dev.seconds).toFixed(2) : "n/a"}× of it` : "") +
        (peers.length > 0 ? `, peers: ${peers.map((p) => `${p.name} ${p.dev?.seconds ? `${p.dev.seconds.toFixed(1)} s` : fmt(p.dev, secs)}`).join(", ")}` : " (peers not run)"),
    );
  }
  const note =
    `One ${FILE_MB} MiB file of random bytes (dd bs=1M), ${FILES} files of 100 B, developer tree of ${devFiles} files (${DEV_COPIES} copies of node_modules files under 128 KiB). ` +
    `Same Ceph RGW (memstore) on 127.0.0.1 for all S3 targets. Ratios: throughput as % of raw disk, dev total as × raw disk. ` +
    `Cold read: unmount, empty the target's cache, drop the page cache, mount again; an S3 target's cold read is also held to a raw GET of the same bytes made right before its mount (JSON: coldGet). Warm read: right after, the median of ${WARM_RUNS} dd runs, by dd's own figure. Strata's cold read also makes the file's whole copy, which the warm reads' opens name as their backing file.\n\nStrata against its targets: ${targets.join("; ")}.`;
  await report("fs", rows, note, { fileMB: FILE_MB, files: FILES, devFiles, rawS3: raw, results });
  return { rows, raw, results };
}

if (process.argv[2] === "serve-passthrough") {
  const { mountFs, PassthroughFs } = await import("../volumefs/fuse/index.js");
  const [src, dir] = process.argv.slice(3) as [string, string];
  const m = await mountFs(new PassthroughFs(src), dir, { extraOptions: env.FS_BENCH_FUSE_OPTIONS ? env.FS_BENCH_FUSE_OPTIONS.split(",") : [] });
  const stop = () => void m.unmount().then(() => process.exit(0));
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
} else if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url) && existsSync(ROOT)) {
  await run();
}
