import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Strata } from "./client.js";
import { loadConfig } from "./config.js";
import { Volume } from "./volume.js";

/** Where the demo writes; the CLI passes its streams. */
export interface DemoIO {
  stdout: NodeJS.WritableStream;
  env: NodeJS.ProcessEnv;
}

/**
 * A short tour on the embedded default store (local SQLite plus a local object directory):
 * create a volume, write, sync, fork three times, change the forks apart, diff, revert, fsck.
 * Uses a fresh temporary STRATA_HOME unless STRATA_HOME is set, so it never touches real data.
 */
export async function runDemo(io: DemoIO): Promise<number> {
  const say = (s: string): void => void io.stdout.write(s + "\n");
  const tmpHome = io.env.STRATA_HOME ? undefined : await mkdtemp(join(tmpdir(), "strata-demo-"));
  const config = loadConfig({ ...io.env, STRATA_STORE: undefined }, tmpHome ? { home: tmpHome } : {});
  const client = Strata.connect(config, { labels: { tool: "demo" } });
  try {
    say(`strata demo — store ${config.store}, metadata in ${config.home}`);
    const t0 = performance.now();
    const vol = await Volume.open("training-data", { client });
    const v1 = await vol.putFile("inputs/example.txt", "hello from a volume\n");
    say(`1. wrote inputs/example.txt → version ${v1.id.slice(0, 12)}`);

    const batch = vol.batch();
    for (let i = 0; i < 1000; i++) batch.putFile(`inputs/shard-${String(i).padStart(4, "0")}.jsonl`, JSON.stringify({ id: i, text: `sample ${i}` }) + "\n");
    batch.putFile("model/weights.bin", Buffer.alloc(4 << 20, 7));
    const v2 = (await batch.sync({ message: "1000 shards and 4 MiB of weights" }))!;
    say(`2. one batch of 1001 files → version ${v2.id.slice(0, 12)} (${v2.files} files, ${(v2.bytes / 1024 / 1024).toFixed(1)} MiB)`);

    const forks = await Promise.all([1, 2, 3].map((i) => vol.fork(`attempt-${i}`)));
    say(`3. forked 3 times in constant time: ${forks.map((f) => f.name).join(", ")}`);

    await Promise.all(forks.map((f, i) => f.putFile("outputs/result.txt", `attempt ${i + 1} says ${(i + 1) * 7}\n`)));
    for (const f of forks) say(`   ${f.name}: outputs/result.txt = ${(await f.readText("outputs/result.txt")).trim()}`);
    say(`   training-data still has no outputs/: ${!(await vol.exists("outputs"))}`);

    const d = await forks[0]!.diff(v2.id);
    say(`4. diff attempt-1 since ${v2.id.slice(0, 12)}: added ${JSON.stringify(d.added)}`);

    await vol.batch().remove("inputs", { recursive: true }).sync({ message: "oops" });
    say(`5. removed inputs/ by mistake: ${(await vol.listDir("")).map((e) => e.path).join(", ") || "(empty)"}`);
    const back = await vol.revert(v2.id);
    say(`   reverted → ${back.id.slice(0, 12)}; inputs/example.txt = ${(await vol.readText("inputs/example.txt")).trim()}`);

    const log = await vol.versions();
    say(`6. training-data has ${log.length} versions:`);
    for (const v of log) say(`   ${v.id.slice(0, 12)} ${v.message}`);

    const { fsck } = await import("../volumefs/index.js");
    const report = await fsck(client.repo);
    say(`7. fsck: ${report.versions} versions, ${report.trees} trees, ${report.chunks} chunks verified, ${report.problems.length} problems`);
    say(`done in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
    return report.problems.length === 0 ? 0 : 1;
  } finally {
    await client.close();
    if (tmpHome) await rm(tmpHome, { recursive: true, force: true });
  }
}
