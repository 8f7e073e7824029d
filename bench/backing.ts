/**
 * Backing files (kernel FUSE passthrough) against a server that answers reads and writes itself,
 * and against raw disk, in one run: the kernel's side of what the Strata mount does with its
 * whole-file copies, without the store. One local file is shown through a minimal server over
 * our kernel protocol code (test/support/backing-server.ts), once with each open backed by the
 * file, once answering every READ and WRITE itself (page cache kept across opens, as the Strata
 * mount does for files it serves). Measured from child processes (dd), the median of 3 runs:
 * - warm read: 1 GiB sequential, after a first read;
 * - small writes: 16 MiB in 4 KiB writes into the open file (one WRITE request each without backing).
 *
 * Run: `npm run bench -- backing`. Needs root and Linux 6.9+ with FUSE passthrough.
 */
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { BackingServer } from "../test/support/backing-server.js";
import { median, report, type Row } from "./report.js";

const exec = promisify(execFile);
const GiB = 1024 ** 3;
const RUNS = 3;

async function seconds(cmd: string, args: string[]): Promise<number> {
  const t = performance.now();
  await exec(cmd, args, { maxBuffer: 1 << 20 });
  return (performance.now() - t) / 1000;
}

interface Figures {
  warmRead: number;
  smallWrites: number;
  requests?: { read: number; write: number };
}

async function measure(file: string): Promise<Figures> {
  await exec("dd", [`if=${file}`, "of=/dev/null", "bs=1M", "status=none"]);
  const reads: number[] = [];
  const writes: number[] = [];
  for (let i = 0; i < RUNS; i++) {
    reads.push(await seconds("dd", [`if=${file}`, "of=/dev/null", "bs=1M", "status=none"]));
    writes.push(await seconds("dd", ["if=/dev/zero", `of=${file}`, "bs=4k", "count=4096", "conv=notrunc", "status=none"]));
  }
  return { warmRead: median(reads), smallWrites: median(writes) };
}

export async function run(): Promise<void> {
  const base = await mkdtemp(join(tmpdir(), "strata-bench-backing-"));
  try {
    const file = join(base, "big.bin");
    await exec("dd", ["if=/dev/urandom", `of=${file}`, "bs=1M", `count=${GiB / 2 ** 20}`, "status=none"]);
    const results: Record<string, Figures> = { "raw disk": await measure(file) };
    for (const passthrough of [true, false]) {
      const mnt = join(base, passthrough ? "pt" : "served");
      await mkdir(mnt);
      const server = await BackingServer.mount(mnt, new Map([["big.bin", file]]), { passthrough });
      try {
        if (passthrough && !server.offered) {
          console.log("backing: this kernel offers no FUSE backing files (passthrough); skipped");
          continue;
        }
        const f = await measure(join(mnt, "big.bin"));
        results[passthrough ? "FUSE, backing file (passthrough)" : "FUSE, served by the process"] = { ...f, requests: { ...server.counts } };
      } finally {
        await server.unmount();
      }
    }
    const raw = results["raw disk"]!;
    const rows: Row[] = Object.entries(results).map(([target, f]) => ({
      target,
      "warm read 1 GiB": `${(GiB / f.warmRead / 1e9).toFixed(1)} GB/s (${Math.round((100 * raw.warmRead) / f.warmRead)}% of raw)`,
      "4 KiB writes, 16 MiB": `${(f.smallWrites * 1000).toFixed(0)} ms (${(f.smallWrites / raw.smallWrites).toFixed(2)}× raw)`,
      "READ / WRITE requests": f.requests ? `${f.requests.read} / ${f.requests.write}` : "",
    }));
    await report(
      "backing",
      rows,
      `Kernel FUSE passthrough (backing files registered with FuseDevice.openBacking) against the same minimal server answering reads and writes itself, and raw disk; median of ${RUNS} runs each, from dd in a child process.`,
      { results },
    );
  } finally {
    await rm(base, { recursive: true, force: true });
  }
}

if (import.meta.url === `file://${process.argv[1]}`) await run();
