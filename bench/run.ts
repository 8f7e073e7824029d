/**
 * The benchmark runner: `npm run bench -- NAME...` runs bench/NAME.ts (each exports `run()`),
 * which prints its table and writes bench/results/NAME.json. With no name it lists them.
 */
import { readdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const names = process.argv.slice(2).filter((a) => !a.startsWith("-"));
const available = (await readdir(here)).filter((f) => f.endsWith(".ts") && !["run.ts", "report.ts"].includes(f) && !f.endsWith(".test.ts")).map((f) => f.slice(0, -3));
if (names.length === 0) {
  console.log(`usage: npm run bench -- NAME...\navailable: ${available.join(", ")}`);
  process.exit(2);
}
for (const name of names) {
  if (!available.includes(name)) {
    console.error(`bench: unknown benchmark ${JSON.stringify(name)} (available: ${available.join(", ")})`);
    process.exit(2);
  }
}
for (const name of names) {
  const mod = (await import(join(here, `${name}.ts`))) as { run?: () => Promise<unknown> };
  if (typeof mod.run !== "function") {
    console.error(`bench: bench/${name}.ts exports no run()`);
    process.exit(2);
  }
  await mod.run();
}
