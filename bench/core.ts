/**
 * `npm run bench -- core`: the storage core against the alternative a user would pick, in one run,
 * on a real Ceph RGW (started or reused on 127.0.0.1) unless noted.
 *
 * 1. fork of volumes with 1k, 10k, 100k files (median of 15) beside `cp -a` of the same tree;
 * 2. `strata put` of 10,000 × 4 KiB files beside one PutObject per file with the same SDK
 *    (one at a time, and 16 in flight);
 * 3. `strata put` of one 1 GiB file beside a raw multipart upload of it;
 * 4. dedup: 100 forks each overwriting 1% of a 1 GiB volume and syncing: bytes in the bucket;
 * 5. chunking and hashing throughput per core beside raw blake3 on the same buffer.
 * Sizes shrink with BENCH_QUICK=1 for a smoke run.
 */
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { promisify } from "node:util";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { hash } from "blake3";
import { runCli, Strata, loadConfig, Volume } from "../sdk/index.js";
import { Chunker, DEFAULT_CHUNK_PARAMS, S3ObjectStore, chunkId } from "../volumefs/index.js";
import { startRgw } from "../test/support/rgw.js";
import { median, report, type Row } from "./report.js";

const exec = promisify(execFile);
const QUICK = process.env.BENCH_QUICK === "1";
const MiB = 1 << 20;

async function timed<T>(fn: () => Promise<T>): Promise<[number, T]> {
  const t = performance.now();
  const r = await fn();
  return [performance.now() - t, r];
}

class Null extends Writable {
  override _write(_c: unknown, _e: string, cb: () => void): void {
    cb();
  }
}

export async function run(): Promise<void> {
  const rgw = await startRgw({});
  const work = await mkdtemp(join(tmpdir(), "strata-bench-core-"));
  const rows: Row[] = [];
  const extra: Record<string, unknown> = {};
  const bucketN = { n: 0 };
  const newStore = async (): Promise<{ env: NodeJS.ProcessEnv; url: string; s3: S3ObjectStore; client: Strata }> => {
    const bucket = `bench-core-${Date.now().toString(36)}-${bucketN.n++}`;
    const url = `s3://${bucket}/vols`;
    const s3 = S3ObjectStore.fromUrl(url, rgw);
    await s3.ensureBucket();
    emptied.push(S3ObjectStore.fromUrl(`s3://${bucket}/`, rgw));
    const env = {
      ...process.env,
      STRATA_HOME: await mkdtemp(join(work, "home-")),
      STRATA_STORE: url,
      STRATA_S3_ENDPOINT: rgw.endpoint,
      AWS_ACCESS_KEY_ID: rgw.accessKeyId,
      AWS_SECRET_ACCESS_KEY: rgw.secretAccessKey,
      AWS_REGION: rgw.region,
    };
    return { env, url, s3, client: Strata.connect(loadConfig(env)) };
  };
  const emptied: S3ObjectStore[] = [];
  const bucketBytes = async (s3: S3ObjectStore): Promise<number> => {
    let n = 0;
    for await (const o of s3.list("")) n += o.size;
    return n;
  };

  try {
    // ---- 1. fork is constant time ----
    {
      const { client, s3 } = await newStore();
      const sizes = QUICK ? [1000, 5000] : [1000, 10_000, 100_000];
      const forkMs: Record<number, number> = {};
      for (const n of sizes) {
        const vol = await Volume.open(`src-${n}`, { client });
        const b = vol.batch();
        for (let i = 0; i < n; i++) b.putFile(`d${i % 100}/f${i}.txt`, `file ${i}\n`);
        const [syncMs] = await timed(() => b.sync());
        const times: number[] = [];
        for (let k = 0; k < 15; k++) times.push((await timed(() => vol.fork(`fork-${n}-${k}`)))[0]);
        forkMs[n] = median(times);
        const local = join(work, `tree-${n}`);
        for (let d = 0; d < 100; d++) await mkdir(join(local, `d${d}`), { recursive: true });
        for (let i = 0; i < n; i++) await writeFile(join(local, `d${i % 100}`, `f${i}.txt`), `file ${i}\n`);
        const [cpMs] = await timed(() => exec("cp", ["-a", local, `${local}-copy`]));
        rows.push({ scenario: `fork, ${n} files`, strata: `${forkMs[n]!.toFixed(2)} ms`, alternative: `cp -a: ${cpMs.toFixed(0)} ms`, ratio: `${(cpMs / forkMs[n]!).toFixed(0)}× faster`, note: `initial sync of ${n} files: ${(syncMs / 1000).toFixed(1)} s` });
        await rm(local, { recursive: true, force: true });
        await rm(`${local}-copy`, { recursive: true, force: true });
      }
      const big = sizes[sizes.length - 1]!;
      extra.forkRatio = forkMs[big]! / forkMs[1000]!;
      rows.push({ scenario: `fork ${big}/1000 time ratio`, strata: (forkMs[big]! / forkMs[1000]!).toFixed(2), alternative: "target ≤ 1.5", ratio: "", note: "" });
      await client.close();
      void s3;
    }

    // ---- 2. 10,000 × 4 KiB files ----
    {
      const n = QUICK ? 2000 : 10_000;
      const dir = join(work, "small");
      await mkdir(dir);
      for (let i = 0; i < n; i++) await writeFile(join(dir, `f${String(i).padStart(5, "0")}.bin`), randomBytes(4096));
      const { env, client, s3 } = await newStore();
      await client.close();
      const io = { stdout: new Null(), stderr: new Null(), env };
      await runCli(["volume", "create", "small"], io);
      const [putMs, code] = await timed(() => runCli(["put", "small", dir, "/"], io));
      if (code !== 0) throw new Error("bench: strata put failed");
      const raw = S3ObjectStore.fromUrl(`s3://${s3.bucket}/raw/`, rgw);
      const files = Array.from({ length: n }, (_, i) => join(dir, `f${String(i).padStart(5, "0")}.bin`));
      const { readFile } = await import("node:fs/promises");
      const perFile = async (conc: number, prefix: string): Promise<number> => {
        let next = 0;
        const [ms] = await timed(() =>
          Promise.all(
            Array.from({ length: conc }, async () => {
              while (next < files.length) {
                const i = next++;
                await raw.client.send(new PutObjectCommand({ Bucket: s3.bucket, Key: `${prefix}/${i}`, Body: await readFile(files[i]!) }));
              }
            }),
          ),
        );
        return ms;
      };
      const seqMs = await perFile(1, "seq");
      const parMs = await perFile(16, "par16");
      rows.push({ scenario: `put ${n} × 4 KiB (RGW)`, strata: `${(putMs / 1000).toFixed(2)} s (${Math.round(n / (putMs / 1000))} files/s)`, alternative: `PutObject per file: ${(seqMs / 1000).toFixed(2)} s`, ratio: `${(seqMs / putMs).toFixed(1)}× faster`, note: "target ≥ 10×" });
      rows.push({ scenario: `put ${n} × 4 KiB (RGW)`, strata: `${(putMs / 1000).toFixed(2)} s`, alternative: `PutObject per file, 16 in flight: ${(parMs / 1000).toFixed(2)} s`, ratio: `${(parMs / putMs).toFixed(1)}× faster`, note: "" });
      extra.smallFiles = { n, strataMs: putMs, perFileSeqMs: seqMs, perFile16Ms: parMs };
      await rm(dir, { recursive: true, force: true });
      raw.close?.();
    }

    // ---- 3. one 1 GiB file ----
    {
      const size = QUICK ? 256 * MiB : 1024 * MiB;
      const file = join(work, "big.bin");
      const fh = await (await import("node:fs/promises")).open(file, "w");
      for (let off = 0; off < size; off += 64 * MiB) await fh.write(randomBytes(64 * MiB));
      await fh.close();
      const { env, client, s3 } = await newStore();
      await client.close();
      const io = { stdout: new Null(), stderr: new Null(), env };
      await runCli(["volume", "create", "big"], io);
      const [putMs, code] = await timed(() => runCli(["put", "big", file, "/big.bin"], io));
      if (code !== 0) throw new Error("bench: strata put of the big file failed");
      // The alternative: a multipart upload of the file with the same SDK, 8 MiB parts, 4 in flight;
      // as the SDK does by default (payload signed) and with Strata's unsigned payload.
      const signed = S3ObjectStore.fromUrl(`s3://${s3.bucket}/raw/`, { ...rgw, unsignedPayload: false });
      const [rawMs] = await timed(() => signed.putFile("big.bin", file));
      const unsigned = S3ObjectStore.fromUrl(`s3://${s3.bucket}/raw/`, rgw);
      const [rawUnsignedMs] = await timed(() => unsigned.putFile("big2.bin", file));
      const mbs = (ms: number): number => size / MiB / (ms / 1000);
      rows.push({ scenario: `put one ${size / MiB} MiB file (RGW)`, strata: `${mbs(putMs).toFixed(0)} MiB/s`, alternative: `multipart upload, SDK defaults: ${mbs(rawMs).toFixed(0)} MiB/s`, ratio: `${(rawMs / putMs).toFixed(2)}×`, note: "target ≥ 0.8×" });
      rows.push({ scenario: `put one ${size / MiB} MiB file (RGW)`, strata: `${mbs(putMs).toFixed(0)} MiB/s`, alternative: `multipart upload, unsigned payload: ${mbs(rawUnsignedMs).toFixed(0)} MiB/s`, ratio: `${(rawUnsignedMs / putMs).toFixed(2)}×`, note: "" });
      extra.bigFile = { size, strataMs: putMs, rawMultipartMs: rawMs, rawMultipartUnsignedMs: rawUnsignedMs };
      await rm(file, { force: true });
    }

    // ---- 4. dedup across 100 forks ----
    {
      const files = QUICK ? 16 : 64;
      const fileSize = 16 * MiB;
      const total = files * fileSize;
      const forks = QUICK ? 20 : 100;
      const { client, s3 } = await newStore();
      const vol = await Volume.open("dedup", { client });
      const b = vol.batch();
      for (let i = 0; i < files; i++) b.putFile(`data/part-${i}.bin`, randomBytes(fileSize));
      await b.sync({ message: "base" });
      const base = await bucketBytes(s3);
      const [forkSyncMs] = await timed(async () => {
        for (let k = 0; k < forks; k++) {
          const f = await vol.fork(`run-${k}`);
          const which = `data/part-${Math.floor(Math.random() * files)}.bin`;
          const bytes = await f.readFile(which);
          const region = Math.floor(total / 100);
          const off = Math.floor(Math.random() * (fileSize - region));
          randomBytes(region).copy(bytes, off);
          await f.batch().putFile(which, bytes).sync({ message: `run ${k}` });
        }
      });
      const after = await bucketBytes(s3);
      rows.push({ scenario: `dedup: ${forks} forks × 1% of ${total / MiB} MiB`, strata: `${(after / total).toFixed(2)}× one copy`, alternative: `full copies: ${forks + 1}× one copy`, ratio: `${((forks + 1) / (after / total)).toFixed(0)}× less`, note: `target ≤ 2.1×; base upload ${(base / total).toFixed(3)}×; ${forks} fork+edit+sync in ${(forkSyncMs / 1000).toFixed(1)} s` });
      extra.dedup = { total, forks, bucketBytesBase: base, bucketBytesAfter: after, ratio: after / total };
      await client.close();
    }

    // ---- 5. chunking and hashing per core ----
    {
      const buf = randomBytes(256 * MiB);
      const rate = (ms: number): number => 256 / (ms / 1000);
      const [blakeMs] = await timed(async () => hash(buf));
      const [chunkMs, pieces] = await timed(async () => {
        const c = new Chunker(DEFAULT_CHUNK_PARAMS);
        const out = c.push(buf);
        const last = c.finish();
        if (last) out.push(last);
        return out;
      });
      const [bothMs] = await timed(async () => {
        const c = new Chunker(DEFAULT_CHUNK_PARAMS);
        const out = c.push(buf);
        const last = c.finish();
        if (last) out.push(last);
        for (const p of out) chunkId(p);
      });
      rows.push({ scenario: "chunk (FastCDC) one core", strata: `${rate(chunkMs).toFixed(0)} MiB/s`, alternative: `raw blake3: ${rate(blakeMs).toFixed(0)} MiB/s`, ratio: `${(blakeMs / chunkMs).toFixed(2)}×`, note: `${pieces.length} chunks, avg ${(256 * 1024 / pieces.length).toFixed(0)} KiB` });
      rows.push({ scenario: "chunk + blake3 ids one core", strata: `${rate(bothMs).toFixed(0)} MiB/s`, alternative: `raw blake3: ${rate(blakeMs).toFixed(0)} MiB/s`, ratio: `${(blakeMs / bothMs).toFixed(2)}×`, note: "" });
      extra.hashing = { chunkMiBs: rate(chunkMs), chunkHashMiBs: rate(bothMs), blake3MiBs: rate(blakeMs) };
    }
  } finally {
    // The RGW keeps objects in RAM (memstore): leave nothing behind.
    for (const b of emptied) {
      const keys: string[] = [];
      for await (const o of b.list("")) keys.push(o.key);
      await b.delete(keys).catch(() => undefined);
    }
    await rm(work, { recursive: true, force: true });
    await rgw.stop();
  }
  await report("core", rows, "Storage core on a real Ceph RGW (127.0.0.1), one process, 2 cores. Ratios compare with the alternative in the same run.", extra);
}

if (import.meta.url === `file://${process.argv[1]}`) await run();
