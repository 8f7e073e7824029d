/**
 * A Dockerfile parser that produces an `ImageSpec`: FROM picks the base, RUN/ENV/WORKDIR/USER/
 * COPY/ADD/EXPOSE become steps, LABEL/CMD/ENTRYPOINT are returned beside the spec. Anything else
 * (ARG, multi-stage, remote ADD, COPY --from) fails with the line number rather than being ignored.
 */
import { isAbsolute, relative, resolve } from "node:path";
import { AgentError } from "./errors.js";
import type { ImageBase, ImageSpec, ImageStep } from "./image.js";

/** Options of `parseDockerfile`. */
export interface DockerfileOptions {
  /** The build context: COPY sources are relative to it and may not leave it. Required. */
  contextDir: string;
}

/** A parsed Dockerfile. */
export interface ParsedDockerfile {
  spec: ImageSpec;
  /** LABEL key/values, in order (later wins). */
  labels: Record<string, string>;
  /** CMD as argv (shell form becomes ["/bin/sh","-c",…]). */
  cmd?: string[];
  /** ENTRYPOINT as argv. */
  entrypoint?: string[];
}

const DEBIAN_SLIM = /^(?:docker\.io\/)?(?:library\/)?(?:debian:(?:bookworm|12)(?:-slim)?|python:3(?:\.11)?(?:\.\d+)?-slim(?:-bookworm)?)$/;

/** Maps a FROM reference to a base: Debian 12 / python 3.11 slim tags, `oci:PATH`, a path, or `strata:HASH`. */
export function baseFromReference(ref: string, contextDir: string, line = 0): ImageBase {
  if (DEBIAN_SLIM.test(ref)) return ref.includes("python") ? { kind: "debian-slim", python: "3.11" } : { kind: "debian-slim" };
  if (ref.startsWith("strata:")) return { kind: "built", hash: ref.slice("strata:".length) };
  if (ref.startsWith("oci:")) return { kind: "oci", path: resolve(contextDir, ref.slice(4)) };
  if (ref.startsWith("/") || ref.startsWith("./") || ref.startsWith("../")) return { kind: "oci", path: resolve(contextDir, ref) };
  throw AgentError.DOCKERFILE(line, `FROM ${ref}: only debian:bookworm[-slim], python:3.11-slim, oci:PATH or strata:HASH can be used (no registry is reachable)`);
}

/** Splits shell-like words: whitespace separates, quotes group, backslash escapes. */
function words(text: string, line: number): string[] {
  const out: string[] = [];
  let cur = "";
  let has = false;
  let quote: string | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote) {
      if (c === quote) quote = undefined;
      else if (c === "\\" && quote === '"' && i + 1 < text.length) cur += text[++i];
      else cur += c;
    } else if (c === '"' || c === "'") {
      quote = c;
      has = true;
    } else if (c === "\\" && i + 1 < text.length) {
      cur += text[++i];
      has = true;
    } else if (/\s/.test(c)) {
      if (has) out.push(cur);
      cur = "";
      has = false;
    } else {
      cur += c;
      has = true;
    }
  }
  if (quote) throw AgentError.DOCKERFILE(line, "unterminated quote");
  if (has) out.push(cur);
  return out;
}

function jsonArray(text: string, line: number): string[] | undefined {
  if (!text.startsWith("[")) return undefined;
  try {
    const v = JSON.parse(text) as unknown;
    if (Array.isArray(v) && v.every((x) => typeof x === "string")) return v as string[];
  } catch {
    /* shell form */
  }
  throw AgentError.DOCKERFILE(line, "exec form must be a JSON array of strings");
}

function shellJoin(argv: string[]): string {
  return argv.map((a) => (/^[A-Za-z0-9_./:=@%+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`)).join(" ");
}

function keyValues(rest: string, line: number, instr: string): Record<string, string> {
  const w = words(rest, line);
  const out: Record<string, string> = {};
  if (w.length >= 1 && !w[0]!.includes("=")) {
    const m = /^\s*(\S+)\s+([\s\S]*)$/.exec(rest);
    if (!m) throw AgentError.DOCKERFILE(line, `${instr} needs a value`);
    out[m[1]!] = words(m[2]!, line).join(" ");
    return out;
  }
  for (const kv of w) {
    const i = kv.indexOf("=");
    if (i <= 0) throw AgentError.DOCKERFILE(line, `${instr}: expected KEY=VALUE, got ${JSON.stringify(kv)}`);
    out[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return out;
}

/** Parses Dockerfile text into an image spec; fails DOCKERFILE with the line number of the first problem. */
export function parseDockerfile(text: string, opts: DockerfileOptions): ParsedDockerfile {
  const context = resolve(opts.contextDir);
  const logical: { line: number; text: string }[] = [];
  let buf = "";
  let start = 0;
  text.split(/\r?\n/).forEach((raw, i) => {
    if (!buf && (/^\s*#/.test(raw) || !raw.trim())) return;
    if (!buf) start = i + 1;
    if (buf && /^\s*#/.test(raw)) return;
    if (/\\\s*$/.test(raw)) {
      buf += raw.replace(/\\\s*$/, "") + " ";
      return;
    }
    logical.push({ line: start, text: (buf + raw).trim() });
    buf = "";
  });
  if (buf.trim()) logical.push({ line: start, text: buf.trim() });

  let base: ImageBase | undefined;
  const steps: ImageStep[] = [];
  const result: Omit<ParsedDockerfile, "spec"> = { labels: {} };
  for (const { line, text: l } of logical) {
    const m = /^(\S+)\s*([\s\S]*)$/.exec(l)!;
    const instr = m[1]!.toUpperCase();
    const rest = m[2]!.trim();
    if (instr !== "FROM" && !base) throw AgentError.DOCKERFILE(line, `${instr} before FROM`);
    switch (instr) {
      case "FROM": {
        if (base) throw AgentError.DOCKERFILE(line, "multi-stage builds are not supported");
        const w = words(rest, line).filter((x) => !x.startsWith("--platform="));
        if (w.length !== 1 && !(w.length === 3 && w[1]!.toUpperCase() === "AS")) throw AgentError.DOCKERFILE(line, "FROM takes one image");
        base = baseFromReference(w[0]!, context, line);
        break;
      }
      case "RUN": {
        if (rest.startsWith("--")) throw AgentError.DOCKERFILE(line, "RUN flags are not supported");
        const argv = jsonArray(rest, line);
        steps.push({ op: "run", commands: [argv ? shellJoin(argv) : rest] });
        break;
      }
      case "ENV":
        steps.push({ op: "env", vars: keyValues(rest, line, "ENV") });
        break;
      case "LABEL":
        Object.assign(result.labels, keyValues(rest, line, "LABEL"));
        break;
      case "WORKDIR":
        steps.push({ op: "workdir", path: words(rest, line).join(" ") });
        break;
      case "USER":
        steps.push({ op: "user", user: rest });
        break;
      case "EXPOSE":
        steps.push({
          op: "expose",
          ports: words(rest, line).map((p) => {
            const n = parseInt(p, 10);
            if (!(n > 0 && n < 65536)) throw AgentError.DOCKERFILE(line, `bad port ${JSON.stringify(p)}`);
            return n;
          }),
        });
        break;
      case "COPY":
      case "ADD": {
        const w = jsonArray(rest, line) ?? words(rest, line);
        if (w.some((x) => x.startsWith("--"))) throw AgentError.DOCKERFILE(line, `${instr} flags (--from, --chown, --chmod) are not supported`);
        if (w.length < 2) throw AgentError.DOCKERFILE(line, `${instr} needs a source and a destination`);
        const dst = w[w.length - 1]!;
        const srcs = w.slice(0, -1);
        if (srcs.length > 1 && !dst.endsWith("/")) throw AgentError.DOCKERFILE(line, `${instr} with several sources needs a destination ending in /`);
        for (const s of srcs) {
          if (/^[a-z]+:\/\//i.test(s)) throw AgentError.DOCKERFILE(line, `${instr} from a URL is not supported`);
          if (/[*?[]/.test(s)) throw AgentError.DOCKERFILE(line, `${instr} with wildcards is not supported`);
          const src = resolve(context, s);
          const rel = relative(context, src);
          if (rel.startsWith("..") || isAbsolute(rel)) throw AgentError.DOCKERFILE(line, `${instr} source ${s} is outside the build context`);
          steps.push({ op: "copy", src, dst, strategy: "copy" });
        }
        break;
      }
      case "CMD":
      case "ENTRYPOINT": {
        const argv = jsonArray(rest, line) ?? ["/bin/sh", "-c", rest];
        if (instr === "CMD") result.cmd = argv;
        else result.entrypoint = argv;
        break;
      }
      default:
        throw AgentError.DOCKERFILE(line, `${instr} is not supported`);
    }
  }
  if (!base) throw AgentError.DOCKERFILE(1, "no FROM");
  return { spec: { base, steps }, ...result };
}
