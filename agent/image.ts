/**
 * Image specs and a content-addressed, step-cached image builder.
 *
 * Layout under `cacheDir`:
 * - `layers/<key>/meta.json`  what the build state is after that prefix of the spec: the config
 *                             (env, workdir, user, ports, mounts) and which layer's `rootfs/` holds
 *                             the files;
 * - `layers/<key>/rootfs/`    present only for steps that changed files (a full copy of the
 *                             parent, made with `cp -a --reflink=auto`, then the step run in it);
 * - `tmp/`                    work in progress; renamed into `layers/` only on success.
 * Keys: the base's key is sha256 of its description (for an OCI base, of its bytes); each step's
 * key is sha256(parent key, the step as canonical JSON, the bytes of the files it copies). The
 * image's hash is the key of its last step. Invariants: a `layers/<key>` directory is complete
 * (it appears by rename), never modified, and a failed step leaves nothing under `layers/`.
 * Steps run as root in a chroot on the host, in a private mount namespace (/proc, /dev and the
 * host's resolv.conf mounted in): build steps are trusted; sandboxes, not builds, hold untrusted code.
 */
import { createHash, randomBytes } from "node:crypto";
import { createReadStream } from "node:fs";
import { lstat, mkdir, readdir, readFile, readlink, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, isAbsolute, join, posix, resolve } from "node:path";
import { resolveUser } from "./bundle.js";
import { AgentError } from "./errors.js";
import { commandError, mustRun, runCommand } from "./exec-util.js";
import type { MountSpec, SandboxSpec } from "./runtime.js";

/** Where an image starts. */
export type ImageBase =
  /** Debian 12 (`debootstrap --variant=minbase bookworm`) plus python3; `python` must be "3" or "3.11" if given. */
  | { kind: "debian-slim"; python?: string }
  /** An OCI image layout directory, or a tarball of one (or of `docker save`), on the host. */
  | { kind: "oci"; path: string }
  /** An image this builder already built, by its hash. */
  | { kind: "built"; hash: string };

/** One build step; applied in order. */
export type ImageStep =
  | { op: "apt"; packages: string[] }
  | { op: "pip"; packages: string[] }
  | { op: "run"; commands: string[] }
  | { op: "workdir"; path: string }
  | { op: "env"; vars: Record<string, string> }
  /** A host file or directory: "copy" puts it in the image (its bytes are part of the hash), "mount" bind-mounts it read-only at run time. */
  | { op: "copy"; src: string; dst: string; strategy: "copy" | "mount" }
  | { op: "user"; user: string }
  | { op: "expose"; ports: number[] };

/** A complete, JSON-serialisable image description. */
export interface ImageSpec {
  base: ImageBase;
  steps: ImageStep[];
}

/** What an image asks of the sandboxes that run it. */
export interface ImageConfig {
  env: Record<string, string>;
  /** Absolute path; "/" unless a step set it. */
  workdir: string;
  /** As given to the last `user` step, if any. */
  user?: string;
  exposedPorts: number[];
  /** Read-only bind mounts from `copy` steps with strategy "mount". */
  mounts: MountSpec[];
}

/** A built image: a read-only root filesystem and its config. */
export interface BuiltImage {
  /** The content hash naming the build (hex sha256). */
  hash: string;
  /** Absolute path of the root filesystem; never modify it. */
  rootfs: string;
  config: ImageConfig;
}

/** Step constructors, so that callers need not spell the data type. */
export const steps = {
  /** Installs Debian packages with apt from the host's configured mirror. */
  aptInstall: (packages: string[]): ImageStep => ({ op: "apt", packages: [...packages] }),
  /** Installs Python packages with `python3 -m pip`; fails when no package index is reachable. */
  pipInstall: (packages: string[]): ImageStep => ({ op: "pip", packages: [...packages] }),
  /** Runs shell commands, each with `/bin/sh -c`, as the image's user, in its workdir. */
  runCommands: (commands: string[]): ImageStep => ({ op: "run", commands: [...commands] }),
  /** Sets (and creates) the working directory. */
  workdir: (path: string): ImageStep => ({ op: "workdir", path }),
  /** Adds environment variables. */
  env: (vars: Record<string, string>): ImageStep => ({ op: "env", vars: { ...vars } }),
  /** Adds a host file at `dst` (a trailing "/" means "into that directory"). */
  addLocalFile: (src: string, dst: string, opts: { strategy?: "copy" | "mount" } = {}): ImageStep =>
    ({ op: "copy", src: resolve(src), dst, strategy: opts.strategy ?? "copy" }),
  /** Adds a host directory's contents at `dst`. */
  addLocalDir: (src: string, dst: string, opts: { strategy?: "copy" | "mount" } = {}): ImageStep =>
    ({ op: "copy", src: resolve(src), dst, strategy: opts.strategy ?? "copy" }),
  /** Sets the user of later `run` steps and of sandboxes ("name", "uid" or "uid:gid"). */
  user: (user: string): ImageStep => ({ op: "user", user }),
  /** Records ports the image listens on (metadata only). */
  expose: (ports: number[]): ImageStep => ({ op: "expose", ports: [...ports] }),
};

/** The sandbox spec that runs `image`, with `extra` on top (its env is merged over the image's). */
export function sandboxSpecFor(image: BuiltImage, extra: Omit<Partial<SandboxSpec>, "rootfs"> = {}): SandboxSpec {
  const spec: SandboxSpec = {
    ...extra,
    rootfs: image.rootfs,
    env: { ...image.config.env, ...extra.env },
    workdir: extra.workdir ?? image.config.workdir,
    mounts: [...image.config.mounts, ...(extra.mounts ?? [])],
  };
  const user = extra.user ?? image.config.user;
  if (user !== undefined) spec.user = user;
  return spec;
}

/** Options of `ImageBuilder`. */
export interface ImageBuilderOptions {
  /** The cache directory (layers and work space); created if missing. Required. */
  cacheDir: string;
  /** Debian mirror URL for debootstrap and apt. Default: the first one in the host's apt sources. */
  mirror?: string;
  /** Receives each step's output as it runs (for progress display). */
  onOutput?: (chunk: Buffer) => void;
}

/** Counters of what `build` did, for callers and tests. */
export interface ImageBuildStats {
  /** Base root filesystems created (debootstrap or OCI unpack). */
  basesBuilt: number;
  /** Steps executed (each one a cache miss). */
  stepsRun: number;
  /** Steps and bases found in the cache. */
  cacheHits: number;
}

interface LayerMeta {
  key: string;
  /** Key of the layer whose rootfs/ holds the files. */
  rootfsLayer: string;
  config: ImageConfig;
}

const DEFAULT_CONFIG: ImageConfig = { env: {}, workdir: "/", exposedPorts: [], mounts: [] };
const SHELL_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/** Stable JSON: object keys sorted, so equal specs hash equally. */
export function canonicalJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(canonicalJson).join(",")}]`;
  if (v && typeof v === "object") {
    return `{${Object.keys(v as object).sort().filter((k) => (v as Record<string, unknown>)[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${canonicalJson((v as Record<string, unknown>)[k])}`).join(",")}}`;
  }
  return JSON.stringify(v);
}

function sha256(...parts: (string | Buffer)[]): string {
  const h = createHash("sha256");
  for (const p of parts) h.update(p).update("\0");
  return h.digest("hex");
}

async function hashFile(path: string): Promise<string> {
  const h = createHash("sha256");
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest("hex");
}

/** sha256 over a host file or directory tree: names, kinds, modes and bytes. */
export async function hashTree(path: string): Promise<string> {
  const st = await lstat(path);
  if (st.isSymbolicLink()) return sha256("link", await readlink(path));
  if (st.isFile()) return sha256("file", (st.mode & 0o7777).toString(8), await hashFile(path));
  if (st.isDirectory()) {
    const names = (await readdir(path)).sort();
    const parts: string[] = ["dir", (st.mode & 0o7777).toString(8)];
    for (const n of names) parts.push(n, await hashTree(join(path, n)));
    return sha256(...parts);
  }
  return sha256("other", String(st.mode));
}

/** The first Debian archive URL in the host's apt sources. */
export async function hostMirror(): Promise<string> {
  const deb822 = await readFile("/etc/apt/sources.list.d/debian.sources", "utf8").catch(() => "");
  const m = /^URIs:\s*(\S+)/m.exec(deb822);
  if (m && !/security/.test(m[1]!)) return m[1]!;
  const list = await readFile("/etc/apt/sources.list", "utf8").catch(() => "");
  const l = /^deb\s+(?:\[[^\]]*\]\s+)?(\S+)/m.exec(list);
  if (l) return l[1]!;
  throw AgentError.IO("find debian mirror", new Error("no URIs in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"));
}

/** Builds images into a content-addressed cache; an identical spec is never built twice. */
export class ImageBuilder {
  /** What this builder has done since it was made. */
  readonly stats: ImageBuildStats = { basesBuilt: 0, stepsRun: 0, cacheHits: 0 };
  private readonly cacheDir: string;
  private readonly inflight = new Map<string, Promise<LayerMeta>>();

  constructor(private readonly opts: ImageBuilderOptions) {
    this.cacheDir = resolve(opts.cacheDir);
  }

  /** The hash `build(spec)` would produce, without building; reads copied files to hash them. */
  async hash(spec: ImageSpec): Promise<string> {
    let key = await this.baseKey(spec.base);
    for (const step of spec.steps) key = await this.stepKey(key, step);
    return key;
  }

  /** A built image by hash; fails IMAGE_NOT_FOUND when it is not in the cache. */
  async get(hash: string): Promise<BuiltImage> {
    const meta = await this.readMeta(hash);
    if (!meta) throw AgentError.IMAGE_NOT_FOUND(hash);
    return this.toImage(meta);
  }

  /**
   * Builds `spec`, reusing every cached prefix; fails IMAGE_STEP_FAILED (with the step's output)
   * for a failing step, INVALID_SPEC for a malformed one, IMAGE_NOT_FOUND for a missing base.
   */
  async build(spec: ImageSpec): Promise<BuiltImage> {
    validate(spec);
    let meta = await this.layer(await this.baseKey(spec.base), () => this.buildBase(spec.base));
    for (const [i, step] of spec.steps.entries()) {
      const parent = meta;
      const key = await this.stepKey(parent.key, step);
      meta = await this.layer(key, () => this.runStep(key, parent, step, i));
    }
    return this.toImage(meta);
  }

  private toImage(meta: LayerMeta): BuiltImage {
    return { hash: meta.key, rootfs: join(this.cacheDir, "layers", meta.rootfsLayer, "rootfs"), config: meta.config };
  }

  private async readMeta(key: string): Promise<LayerMeta | undefined> {
    if (!/^[0-9a-f]{64}$/.test(key)) return undefined;
    const text = await readFile(join(this.cacheDir, "layers", key, "meta.json"), "utf8").catch(() => undefined);
    return text === undefined ? undefined : (JSON.parse(text) as LayerMeta);
  }

  private async layer(key: string, make: () => Promise<LayerMeta>): Promise<LayerMeta> {
    const cached = await this.readMeta(key);
    if (cached) {
      this.stats.cacheHits++;
      return cached;
    }
    let p = this.inflight.get(key);
    if (!p) {
      p = make().finally(() => this.inflight.delete(key));
      this.inflight.set(key, p);
    }
    return p;
  }

  private async baseKey(base: ImageBase): Promise<string> {
    switch (base.kind) {
      case "debian-slim":
        return sha256("base", canonicalJson({ kind: "debian-slim", suite: "bookworm", variant: "minbase", python: "3" }));
      case "oci": {
        const st = await stat(base.path).catch(() => undefined);
        if (!st) throw AgentError.IMAGE_NOT_FOUND(base.path);
        return sha256("base", "oci", st.isDirectory() ? await readFile(join(base.path, "index.json")) : await hashFile(base.path));
      }
      case "built":
        if (!(await this.readMeta(base.hash))) throw AgentError.IMAGE_NOT_FOUND(base.hash);
        return base.hash;
    }
  }

  private async stepKey(parent: string, step: ImageStep): Promise<string> {
    if (step.op === "copy" && step.strategy === "copy") {
      const content = await hashTree(step.src).catch((e) => {
        throw AgentError.IO(`read ${step.src}`, e, { path: step.src });
      });
      return sha256(parent, canonicalJson(step), content);
    }
    return sha256(parent, canonicalJson(step));
  }

  private async tmpDir(): Promise<string> {
    const dir = join(this.cacheDir, "tmp", randomBytes(8).toString("hex"));
    await mkdir(dir, { recursive: true });
    return dir;
  }

  private async commit(tmp: string, meta: LayerMeta): Promise<LayerMeta> {
    await writeFile(join(tmp, "meta.json"), JSON.stringify(meta, null, 1));
    await mkdir(join(this.cacheDir, "layers"), { recursive: true });
    try {
      await rename(tmp, join(this.cacheDir, "layers", meta.key));
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      const other = await this.readMeta(meta.key);
      if (!other) throw AgentError.IO("store image layer", e);
      return other;
    }
    return meta;
  }

  private async buildBase(base: ImageBase): Promise<LayerMeta> {
    const key = await this.baseKey(base);
    const tmp = await this.tmpDir();
    const rootfs = join(tmp, "rootfs");
    let config: ImageConfig = { ...DEFAULT_CONFIG, env: {}, exposedPorts: [], mounts: [] };
    try {
      if (base.kind === "debian-slim") {
        const mirror = this.opts.mirror ?? (await hostMirror());
        const argv = ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", rootfs, mirror];
        const r = await runCommand(argv);
        if (r.code !== 0) throw AgentError.IMAGE_STEP_FAILED("base debian-slim (debootstrap)", r.code, outputTail(r.stdout, r.stderr));
        await rm(join(rootfs, "var/cache/apt/archives"), { recursive: true, force: true });
        await mkdir(join(rootfs, "var/cache/apt/archives/partial"), { recursive: true });
        await rm(join(rootfs, "var/lib/apt/lists"), { recursive: true, force: true });
        await mkdir(join(rootfs, "var/lib/apt/lists/partial"), { recursive: true });
      } else if (base.kind === "oci") {
        await mkdir(rootfs);
        config = await unpackOci(base.path, rootfs, tmp);
      } else {
        throw AgentError.IMAGE_NOT_FOUND(base.hash);
      }
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
    this.stats.basesBuilt++;
    return this.commit(tmp, { key, rootfsLayer: key, config });
  }

  private async runStep(key: string, parent: LayerMeta, step: ImageStep, index: number): Promise<LayerMeta> {
    const config: ImageConfig = structuredClone(parent.config);
    const label = `${index + 1} (${step.op})`;
    let script: string | undefined;
    let asUser = false;
    let copy: { src: string; dst: string } | undefined;
    let mkdirPath: string | undefined;
    switch (step.op) {
      case "env":
        Object.assign(config.env, step.vars);
        break;
      case "user":
        config.user = step.user;
        break;
      case "expose":
        config.exposedPorts = [...new Set([...config.exposedPorts, ...step.ports])];
        break;
      case "workdir":
        config.workdir = posix.resolve(config.workdir, step.path);
        mkdirPath = config.workdir;
        break;
      case "apt":
        script = `apt-get update -q && apt-get install -y -q --no-install-recommends ${step.packages.map(shq).join(" ")} && apt-get clean && rm -rf /var/lib/apt/lists/*`;
        break;
      case "pip":
        script = `python3 -m pip install --no-cache-dir --disable-pip-version-check --timeout 15 --retries 0 ${step.packages.map(shq).join(" ")}`;
        break;
      case "run":
        script = step.commands.map((c) => `/bin/sh -c ${shq(c)}`).join(" && ");
        asUser = true;
        break;
      case "copy": {
        const dst = posix.resolve(config.workdir, step.dst) + (step.dst.endsWith("/") ? "/" : "");
        if (step.strategy === "mount") {
          const target = dst.endsWith("/") ? posix.join(dst, basename(step.src)) : dst;
          config.mounts.push({ source: step.src, destination: target, readOnly: true });
        } else {
          copy = { src: step.src, dst };
        }
        break;
      }
    }
    const parentRootfs = join(this.cacheDir, "layers", parent.rootfsLayer, "rootfs");
    if (mkdirPath !== undefined && (await stat(join(parentRootfs, mkdirPath)).catch(() => undefined))) mkdirPath = undefined;
    const changesFiles = script !== undefined || copy !== undefined || mkdirPath !== undefined;
    const tmp = await this.tmpDir();
    try {
      if (changesFiles) {
        const rootfs = join(tmp, "rootfs");
        await mustRun(["cp", "-a", "--reflink=auto", parentRootfs, rootfs]);
        if (mkdirPath !== undefined) await mkdir(join(rootfs, mkdirPath), { recursive: true });
        if (copy) await copyIn(copy.src, rootfs, copy.dst);
        if (script !== undefined) {
          const { uid, gid } = asUser ? await resolveUser(rootfs, config.user) : { uid: 0, gid: 0 };
          const env = { ...config.env, PATH: config.env.PATH ?? SHELL_PATH, HOME: uid === 0 ? "/root" : "/", DEBIAN_FRONTEND: "noninteractive" };
          const r = await this.chrootRun(rootfs, script, { uid, gid, cwd: config.workdir, env });
          if (r.code !== 0) throw AgentError.IMAGE_STEP_FAILED(label, r.code, outputTail(r.stdout, r.stderr));
        }
      }
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e instanceof AgentError ? e : AgentError.IO(`build image: step ${label}`, e);
    }
    this.stats.stepsRun++;
    return this.commit(tmp, { key, rootfsLayer: changesFiles ? key : parent.rootfsLayer, config });
  }

  private async chrootRun(rootfs: string, script: string, o: { uid: number; gid: number; cwd: string; env: Record<string, string> }) {
    const setup = [
      'R="$1"; U="$2"; shift 2',
      'mount -t proc proc "$R/proc"',
      'mount --rbind /dev "$R/dev"',
      '[ -e "$R/etc/resolv.conf" ] || [ -L "$R/etc/resolv.conf" ] || : > "$R/etc/resolv.conf"',
      '[ -L "$R/etc/resolv.conf" ] || mount --bind /etc/resolv.conf "$R/etc/resolv.conf"',
      'exec chroot --userspec="$U" "$R" /usr/bin/env -i "$@"',
    ].join(" && ");
    const envArgs = Object.entries(o.env).map(([k, v]) => `${k}=${v}`);
    const inner = `cd ${shq(o.cwd)} && ${script}`;
    const argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", setup, "sh", rootfs, `${o.uid}:${o.gid}`, ...envArgs, "/bin/sh", "-c", `exec 2>&1; ${inner}`];
    const r = await runCommandStreaming(argv, this.opts.onOutput);
    return r;
  }
}

function runCommandStreaming(argv: string[], onOutput?: (b: Buffer) => void) {
  if (!onOutput) return runCommand(argv);
  return import("node:child_process").then(({ spawn }) => new Promise<{ code: number | null; stdout: Buffer; stderr: Buffer }>((res, rej) => {
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout!.on("data", (b: Buffer) => { out.push(b); onOutput(b); });
    child.stderr!.on("data", (b: Buffer) => { err.push(b); onOutput(b); });
    child.on("error", rej);
    child.on("close", (code) => res({ code, stdout: Buffer.concat(out), stderr: Buffer.concat(err) }));
  }));
}

function shq(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

function outputTail(stdout: Buffer, stderr: Buffer, max = 4000): string {
  const text = Buffer.concat([stdout, stderr]).toString("utf8").trimEnd();
  return text.length > max ? `…${text.slice(text.length - max)}` : text;
}

function validate(spec: ImageSpec): void {
  if (!spec || typeof spec !== "object" || !spec.base || !Array.isArray(spec.steps)) {
    throw AgentError.INVALID_SPEC("image spec", "needs a base and a list of steps");
  }
  if (spec.base.kind === "debian-slim" && spec.base.python !== undefined && !["3", "3.11"].includes(spec.base.python)) {
    throw AgentError.INVALID_SPEC(`python ${JSON.stringify(spec.base.python)}`, "debian-slim (bookworm) has python 3.11 only");
  }
  if (spec.base.kind === "oci" && !isAbsolute(spec.base.path)) throw AgentError.INVALID_SPEC("oci base path", "must be absolute");
  for (const [i, s] of spec.steps.entries()) {
    const what = `step ${i + 1} (${s.op})`;
    if ((s.op === "apt" || s.op === "pip") && !s.packages.length) throw AgentError.INVALID_SPEC(what, "no packages");
    if ((s.op === "apt" || s.op === "pip") && s.packages.some((p) => !/^[A-Za-z0-9][A-Za-z0-9._+:=<>!~,\[\]-]*$/.test(p))) {
      throw AgentError.INVALID_SPEC(what, "bad package name");
    }
    if (s.op === "copy" && !isAbsolute(s.src)) throw AgentError.INVALID_SPEC(what, "src must be an absolute host path");
    if (s.op === "env" && Object.keys(s.vars).some((k) => !/^[A-Za-z_][A-Za-z0-9_]*$/.test(k))) throw AgentError.INVALID_SPEC(what, "bad variable name");
  }
}

async function copyIn(src: string, rootfs: string, dst: string): Promise<void> {
  const st = await stat(src);
  if (st.isDirectory()) {
    const target = join(rootfs, dst);
    await mkdir(target, { recursive: true });
    await mustRun(["cp", "-R", "--preserve=mode,timestamps,links", "--reflink=auto", "--no-target-directory", `${src}/.`, target]);
  } else {
    const target = dst.endsWith("/") ? join(rootfs, dst, basename(src)) : join(rootfs, dst);
    await mkdir(dirname(target), { recursive: true });
    await mustRun(["cp", "--preserve=mode,timestamps", "--reflink=auto", src, target]);
  }
}

interface OciDescriptor {
  mediaType?: string;
  digest: string;
  platform?: { architecture?: string; os?: string };
}

async function unpackOci(path: string, rootfs: string, work: string): Promise<ImageConfig> {
  let dir = path;
  if (!(await stat(path)).isDirectory()) {
    dir = join(work, "oci");
    await mkdir(dir);
    await mustRun(["tar", "-xf", path, "-C", dir]);
  }
  const blob = (digest: string) => join(dir, "blobs", ...digest.split(":", 2));
  let layers: string[];
  let configPath: string | undefined;
  const dockerManifest = await readFile(join(dir, "manifest.json"), "utf8").catch(() => undefined);
  const index = await readFile(join(dir, "index.json"), "utf8").catch(() => undefined);
  if (index !== undefined) {
    let desc = pick((JSON.parse(index) as { manifests: OciDescriptor[] }).manifests);
    let manifest = JSON.parse(await readFile(blob(desc.digest), "utf8")) as { manifests?: OciDescriptor[]; layers?: OciDescriptor[]; config?: OciDescriptor };
    while (manifest.manifests) {
      desc = pick(manifest.manifests);
      manifest = JSON.parse(await readFile(blob(desc.digest), "utf8"));
    }
    layers = (manifest.layers ?? []).map((l) => blob(l.digest));
    configPath = manifest.config ? blob(manifest.config.digest) : undefined;
  } else if (dockerManifest !== undefined) {
    const m = (JSON.parse(dockerManifest) as { Config: string; Layers: string[] }[])[0]!;
    layers = m.Layers.map((l) => join(dir, l));
    configPath = join(dir, m.Config);
  } else {
    throw AgentError.INVALID_SPEC(`oci base ${path}`, "neither index.json nor manifest.json found");
  }
  for (const layer of layers) await applyLayer(layer, rootfs);
  const config: ImageConfig = { env: {}, workdir: "/", exposedPorts: [], mounts: [] };
  if (configPath) {
    const c = (JSON.parse(await readFile(configPath, "utf8")) as { config?: { Env?: string[]; WorkingDir?: string; User?: string; ExposedPorts?: Record<string, unknown> } }).config ?? {};
    for (const e of c.Env ?? []) {
      const i = e.indexOf("=");
      if (i > 0) config.env[e.slice(0, i)] = e.slice(i + 1);
    }
    if (c.WorkingDir) config.workdir = c.WorkingDir;
    if (c.User) config.user = c.User;
    config.exposedPorts = Object.keys(c.ExposedPorts ?? {}).map((p) => parseInt(p, 10)).filter((n) => n > 0);
  }
  return config;
}

function pick(list: OciDescriptor[]): OciDescriptor {
  const d = list.find((m) => !m.platform || (m.platform.architecture === "amd64" && m.platform.os === "linux")) ?? list[0];
  if (!d) throw AgentError.INVALID_SPEC("oci index", "lists no manifests");
  return d;
}

async function applyLayer(layer: string, rootfs: string): Promise<void> {
  const names = (await mustRun(["tar", "-tf", layer], { maxBytes: 256 << 20 })).toString().split("\n").filter(Boolean);
  for (const raw of names) {
    const name = posix.normalize(raw.replace(/^\.?\//, ""));
    if (name.startsWith("..")) throw AgentError.INVALID_SPEC(`oci layer ${layer}`, `entry ${raw} leaves the root`);
    const base = posix.basename(name);
    if (!base.startsWith(".wh.")) continue;
    const parent = join(rootfs, posix.dirname(name));
    if (base === ".wh..wh..opq") {
      for (const e of await readdir(parent).catch(() => [])) await rm(join(parent, e), { recursive: true, force: true });
    } else {
      await rm(join(parent, base.slice(4)), { recursive: true, force: true });
    }
  }
  await mustRun(["tar", "-xf", layer, "-C", rootfs, "--numeric-owner", "--same-permissions", "--exclude=.wh.*"]);
}
