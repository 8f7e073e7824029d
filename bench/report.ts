/** Shared output of the benchmarks: a printed table, JSON under bench/results/, a section of bench/README.md. */
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

/** One row of a benchmark table. */
/** The middle value (the upper middle of an even count). */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

export interface Row {
  [column: string]: string | number;
}

/** Formats rows as a Markdown table. */
export function table(rows: Row[]): string {
  if (rows.length === 0) return "";
  const cols = Object.keys(rows[0]!);
  const cell = (v: string | number | undefined): string => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : (v ?? ""));
  const lines = [`| ${cols.join(" | ")} |`, `|${cols.map(() => "---").join("|")}|`];
  for (const r of rows) lines.push(`| ${cols.map((c) => cell(r[c])).join(" | ")} |`);
  return lines.join("\n");
}

/**
 * Prints the table, writes bench/results/NAME.json (rows plus `extra`), and replaces the
 * "## NAME" section of bench/README.md with the table and a note.
 */
export async function report(name: string, rows: Row[], note: string, extra: Record<string, unknown> = {}): Promise<void> {
  const md = table(rows);
  console.log(`\n${name}\n${md}\n${note}`);
  await mkdir(join(here, "results"), { recursive: true });
  await writeFile(join(here, "results", `${name}.json`), JSON.stringify({ name, date: new Date().toISOString(), rows, ...extra }, null, 2));
  const readme = join(here, "README.md");
  let text = await readFile(readme, "utf8").catch(() => "# Benchmarks\n\nEach section is written by `npm run bench -- NAME` (the latest run on the development machine: 2 cores, 24 GiB).\n");
  const section = `## ${name}\n\n${note}\n\n${md}\n`;
  const re = new RegExp(`## ${name}\\n[\\s\\S]*?(?=\\n## |$)`);
  text = re.test(text) ? text.replace(re, section) : `${text.trimEnd()}\n\n${section}`;
  await writeFile(readme, text);
}
