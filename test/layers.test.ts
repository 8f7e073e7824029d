/**
 * The layer rules of STYLE.md, checked by parsing every import:
 * - a file reaches another top-level layer only through that layer's index.ts;
 * - dependencies point one way: sdk → scheduler, agent, volumefs, metadata; agent → volumefs,
 *   metadata; scheduler → metadata; volumefs → metadata; metadata → nothing of ours;
 * - inside volumefs: fuse → vfs → {chunk, object}, chunk → object, object → nothing.
 */
import { readdir, readFile } from "node:fs/promises";
import { dirname, join, relative, resolve } from "node:path";
import { describe, expect, it } from "vitest";

const ROOT = resolve(__dirname, "..");
const LAYERS = ["metadata", "volumefs", "sdk", "scheduler", "agent"] as const;
const ALLOWED: Record<string, string[]> = {
  metadata: [],
  volumefs: ["metadata"],
  scheduler: ["metadata"],
  agent: ["volumefs", "metadata"],
  sdk: ["scheduler", "agent", "volumefs", "metadata"],
};
const INNER_ALLOWED: Record<string, string[]> = {
  object: [],
  chunk: ["object"],
  vfs: ["chunk", "object"],
  fuse: ["vfs", "chunk", "object"],
};

async function sources(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true }).catch(() => [])) {
    const p = join(dir, e.name);
    if (e.isDirectory() && e.name !== "node_modules") out.push(...(await sources(p)));
    else if (e.isFile() && e.name.endsWith(".ts") && !e.name.endsWith(".test.ts") && !e.name.endsWith(".d.ts")) out.push(p);
  }
  return out;
}

function imports(text: string): string[] {
  const out: string[] = [];
  const re = /(?:^|\n)\s*(?:import|export)\s[^;]*?from\s+["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g;
  for (let m = re.exec(text); m; m = re.exec(text)) out.push((m[1] ?? m[2])!);
  return out;
}

describe("layers", () => {
  it("import each other only through index.ts, in one direction", async () => {
    const violations: string[] = [];
    for (const layer of LAYERS) {
      for (const file of await sources(join(ROOT, layer))) {
        const text = await readFile(file, "utf8");
        for (const spec of imports(text)) {
          if (!spec.startsWith(".")) continue;
          const target = relative(ROOT, resolve(dirname(file), spec));
          const [tLayer, ...rest] = target.split("/");
          const where = `${relative(ROOT, file)} imports ${spec}`;
          if (tLayer !== layer) {
            if (!ALLOWED[layer]!.includes(tLayer!)) violations.push(`${where}: ${layer} may not depend on ${tLayer}`);
            else if (rest.join("/") !== "index.js") violations.push(`${where}: reach ${tLayer} through its index.ts`);
            continue;
          }
          if (layer === "volumefs") {
            const from = relative(join(ROOT, "volumefs"), file).split("/")[0]!;
            const to = rest[0]!;
            if (from in INNER_ALLOWED && to in INNER_ALLOWED && from !== to) {
              if (!INNER_ALLOWED[from]!.includes(to)) violations.push(`${where}: volumefs/${from} may not depend on volumefs/${to}`);
            }
          }
        }
      }
    }
    expect(violations).toEqual([]);
  });

  it("every layer has an index.ts that documents itself", async () => {
    for (const layer of ["metadata", "volumefs", "sdk"]) {
      const text = await readFile(join(ROOT, layer, "index.ts"), "utf8");
      expect(text.trimStart().startsWith("/**"), layer).toBe(true);
    }
  });
});
