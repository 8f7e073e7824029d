/**
 * The storage commands of the `strata` CLI: `volume`, `put`, `get`, `cat`, `ls`, `rm`, `fork`,
 * `log`, `diff`, `revert`, `fsck` and `demo`. Each opens the store from the configuration, does
 * one thing and closes it. cli.ts loads this module only when one of them runs.
 */
import { createWriteStream } from "node:fs";
import { lstat, mkdir, readdir, readlink, rename, rm, stat, symlink, chmod, utimes } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { pipeline } from "node:stream/promises";
import { Readable as NodeReadable } from "node:stream";
import { SqliteMetadataStore } from "../metadata/index.js";
import { fsck, rebuildMetadata, splitPath, VolumeError, type Snapshot } from "../volumefs/index.js";
import { Strata, metadataPath, openObjectStore } from "./client.js";
import { loadConfig } from "./config.js";
import { runDemo } from "./demo.js";
import { commands, shownName, usageError, type CliIO, type GroupRun, type ParsedArgs } from "./command.js";
import { Volume } from "./volume.js";

function client(io: CliIO): Strata {
  return Strata.connect(loadConfig(io.env), { labels: { tool: "cli" } });
}

async function withClient<T>(io: CliIO, fn: (c: Strata) => Promise<T>): Promise<T> {
  const c = client(io);
  try {
    return await fn(c);
  } finally {
    await c.close();
  }
}

function out(io: CliIO, text: string): void {
  io.stdout.write(text.endsWith("\n") ? text : text + "\n");
}

function json(io: CliIO, value: unknown): void {
  out(io, JSON.stringify(value, null, 2));
}

function need(args: ParsedArgs, n: number, usage: string): void {
  if (args.positionals.length < n) throw usageError("missing arguments", usage);
}

function atOpt(args: ParsedArgs): string | undefined {
  const at = args.values.at;
  return typeof at === "string" ? at : undefined;
}

/** A progress line on a terminal; silent when stderr is not one. */
function progress(io: CliIO, label: string): { update(done: number, total: number): void; end(): void } {
  if (!io.stderr.isTTY) return { update() {}, end() {} };
  let last = 0;
  let shown = false;
  return {
    update(done, total) {
      const now = Date.now();
      if (now - last < 100 && done !== total) return;
      last = now;
      shown = true;
      io.stderr.write(`\r${label}: ${done}/${total} files`);
    },
    end() {
      if (shown) io.stderr.write("\n");
    },
  };
}

function humanBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

function modeString(kind: string, mode: number): string {
  const t = kind === "dir" ? "d" : kind === "symlink" ? "l" : "-";
  const bits = "rwxrwxrwx";
  let s = "";
  for (let i = 0; i < 9; i++) s += mode & (1 << (8 - i)) ? bits[i] : "-";
  return t + s;
}

// ---- put / get: local files in and out ----

interface LocalItem {
  local: string;
  dest: string;
  mode: number;
  mtime: number;
  size: number;
}

async function collectLocal(src: string, dest: string, items: LocalItem[], dirs: { dest: string; mode: number; mtime: number }[], links: { dest: string; target: string }[], io: CliIO): Promise<void> {
  let st;
  try {
    st = await lstat(src);
  } catch (err) {
    throw new VolumeError("NOT_FOUND", `read ${src}: no such file or directory`, { cause: err, hint: "check the local path" });
  }
  if (st.isSymbolicLink()) links.push({ dest, target: await readlink(src) });
  else if (st.isDirectory()) {
    dirs.push({ dest, mode: st.mode & 0o7777, mtime: Math.floor(st.mtimeMs) });
    const names = (await readdir(src)).sort();
    for (const name of names) await collectLocal(join(src, name), `${dest}/${name}`, items, dirs, links, io);
  } else if (st.isFile()) items.push({ local: src, dest, mode: st.mode & 0o7777, mtime: Math.floor(st.mtimeMs), size: st.size });
  else io.stderr.write(`strata: skipping ${src}: not a regular file, directory or symlink\n`);
}

async function cmdPut(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 3, commands.put.usage);
  const [name, ...rest] = args.positionals as [string, ...string[]];
  const destArg = rest.pop()!;
  const srcs = rest;
  await withClient(io, async (c) => {
    const vol = await Volume.open(name, { client: c, create: false });
    const destSegs = splitPath(destArg);
    const destIsDir = destArg.endsWith("/") || destSegs.length === 0 || srcs.length > 1 || (await vol.exists(destArg).then(async (e) => e && (await vol.stat(destArg)).kind === "dir"));
    const items: LocalItem[] = [];
    const dirs: { dest: string; mode: number; mtime: number }[] = [];
    const links: { dest: string; target: string }[] = [];
    for (const src of srcs) {
      const base = basename(resolve(src));
      const dest = destIsDir ? [...destSegs, base].join("/") : destSegs.join("/");
      await collectLocal(src, dest, items, dirs, links, io);
    }
    if (items.length + dirs.length + links.length === 0) {
      throw new VolumeError("INVALID_ARGUMENT", `put: nothing to put from ${srcs.join(" ")}`, { hint: "give regular files, directories or symlinks (devices, fifos and sockets are skipped)" });
    }
    const batch = vol.batch();
    for (const d of dirs) batch.mkdir(d.dest, { mode: d.mode });
    for (const it of items) batch.putLocalFile(it.dest, it.local, { mode: it.mode, mtime: it.mtime, size: it.size });
    for (const l of links) batch.symlink(l.dest, l.target);
    for (const d of dirs) batch.chmod(d.dest, d.mode);
    const bar = progress(io, "put");
    const res = await batch.syncDetailed({ message: `put ${srcs.join(" ")} -> ${destArg}`, onProgress: bar.update });
    bar.end();
    if (!res.version) throw new VolumeError("INVALID_ARGUMENT", "put: nothing to put", { hint: "give at least one file or a non-empty directory" });
    out(io, res.version.id);
  });
}

async function writeLocalFile(snap: Snapshot, entry: Parameters<Snapshot["read"]>[0], dest: string): Promise<void> {
  const tmp = join(dirname(dest), `.${basename(dest)}.strata-${process.pid}-${Date.now()}`);
  try {
    if (entry.kind === "file") {
      const CHUNK = 8 << 20;
      let off = 0;
      const gen = async function* () {
        while (off < entry.size) {
          const part = await snap.read(entry, off, CHUNK);
          off += part.length;
          yield part;
        }
      };
      await pipeline(NodeReadable.from(gen()), createWriteStream(tmp, { mode: entry.mode & 0o777 }));
      await chmod(tmp, entry.mode & 0o7777);
      await utimes(tmp, entry.mtime / 1000, entry.mtime / 1000);
    } else if (entry.kind === "symlink") {
      await symlink(entry.target, tmp);
    }
    await rename(tmp, dest);
  } catch (err) {
    await rm(tmp, { force: true }).catch(() => undefined);
    throw err;
  }
}

async function cmdGet(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 3, commands.get.usage);
  const [name, src, destArg] = args.positionals as [string, string, string];
  await withClient(io, async (c) => {
    const repo = c.repo;
    const snap = repo.snapshot(await repo.resolve(name, atOpt(args)));
    const srcPath = splitPath(src).join("/");
    const entry = await snap.stat(srcPath);
    let dest = resolve(destArg);
    const destStat = await stat(dest).catch(() => undefined);
    if (destStat?.isDirectory()) dest = join(dest, srcPath === "" ? name : basename(srcPath));
    if (entry.kind !== "dir") {
      await writeLocalFile(snap, entry, dest).catch((err) => {
        throw localWriteError(dest, err);
      });
      return;
    }
    if (await lstat(dest).catch(() => undefined)) {
      throw new VolumeError("ALREADY_EXISTS", `get ${JSON.stringify(src)}: ${dest} already exists`, { hint: "remove it or pick another destination" });
    }
    // A directory lands in a temporary sibling first, then is renamed into place: nothing half-written.
    const staging = join(dirname(dest), `.${basename(dest)}.strata-${process.pid}-${Date.now()}`);
    try {
      await mkdir(staging, { recursive: false, mode: 0o700 });
      const dirModes: [string, number, number][] = [[staging, entry.mode, entry.mtime]];
      let n = 0;
      const bar = progress(io, "get");
      for await (const item of snap.walk(srcPath)) {
        const rel = srcPath === "" ? item.path : item.path.slice(srcPath.length + 1);
        const target = join(staging, ...rel.split("/"));
        if (!resolve(target).startsWith(staging + "/")) throw VolumeError.INVALID_PATH(item.path, "escapes the destination");
        if (item.entry.kind === "dir") {
          await mkdir(target, { mode: 0o700 });
          dirModes.push([target, item.entry.mode, item.entry.mtime]);
        } else {
          await writeLocalFile(snap, item.entry, target);
          bar.update(++n, entry.files);
        }
      }
      bar.end();
      for (const [p, mode, mtime] of dirModes.reverse()) {
        await chmod(p, mode & 0o7777);
        await utimes(p, mtime / 1000, mtime / 1000);
      }
      await rename(staging, dest);
    } catch (err) {
      await rm(staging, { recursive: true, force: true }).catch(() => undefined);
      throw localWriteError(dest, err);
    }
  });
}

/** A local file system's refusal of `get`'s write to `dest`, said of `dest` (not of a temporary name), with a hint. */
function localWriteError(dest: string, err: unknown): unknown {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (err instanceof VolumeError || typeof code !== "string") return err;
  const why: Record<string, [VolumeError["code"], string, string]> = {
    ENOENT: ["NOT_FOUND", "its directory does not exist", "create the directory first, or pick another destination"],
    ENOTDIR: ["NOT_A_DIRECTORY", "a file is in the way of its directory", "pick another destination"],
    EROFS: ["READ_ONLY", "the file system is read-only", "pick a writable destination"],
    EACCES: ["PERMISSION", "permission denied", "pick a destination you may write to"],
    EPERM: ["PERMISSION", "operation not permitted", "pick a destination you may write to"],
    ENOSPC: ["IO", "no space left on the device", "free some space and retry (nothing was left half-written)"],
  };
  const w = why[code];
  return w ? new VolumeError(w[0], `get: write ${dest}: ${w[1]}`, { cause: err, path: dest, hint: w[2] }) : err;
}

async function cmdCat(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 2, commands.cat.usage);
  const [name, path] = args.positionals as [string, string];
  await withClient(io, async (c) => {
    const snap = c.repo.snapshot(await c.repo.resolve(name, atOpt(args)));
    const p = splitPath(path).join("/");
    const entry = await snap.stat(p);
    if (entry.kind === "dir") throw VolumeError.IS_A_DIRECTORY(p, { op: "cat", hint: "use `strata ls` for directories" });
    if (entry.kind === "symlink") throw new VolumeError("INVALID_ARGUMENT", `cat ${JSON.stringify(p)}: is a symlink to ${JSON.stringify(entry.target)}`, { hint: "symlinks are not followed" });
    for (let off = 0; off < entry.size; ) {
      const part = await snap.read(entry, off, 8 << 20);
      off += part.length;
      if (!io.stdout.write(part)) await new Promise((r) => io.stdout.once("drain", r));
    }
  });
}

async function cmdLs(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 1, commands.ls.usage);
  const [name, path = ""] = args.positionals as [string, string?];
  await withClient(io, async (c) => {
    const vol = await Volume.open(name, { client: c, create: false });
    const items = await vol.listDir(path, { at: atOpt(args), recursive: args.values.r === true || args.values.recursive === true });
    if (args.values.json) {
      json(io, items.map((i) => ({ path: i.path, kind: i.kind, size: i.size, mode: i.mode, mtime: i.mtime.toISOString(), ...(i.target !== undefined ? { target: i.target } : {}) })));
      return;
    }
    for (const i of items) {
      const name = shownName(i.path);
      const shown = i.kind === "dir" ? name + "/" : i.kind === "symlink" ? `${name} -> ${shownName(i.target ?? "")}` : name;
      out(io, `${modeString(i.kind, i.mode)} ${String(i.size).padStart(12)} ${i.mtime.toISOString().slice(0, 19).replace("T", " ")} ${shown}`);
    }
  });
}

async function cmdRm(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 2, commands.rm.usage);
  const [name, ...paths] = args.positionals as [string, ...string[]];
  await withClient(io, async (c) => {
    const vol = await Volume.open(name, { client: c, create: false });
    const batch = vol.batch();
    for (const p of paths) batch.remove(p, { recursive: args.values.r === true || args.values.recursive === true });
    const v = await batch.sync({ message: `rm ${paths.join(" ")}` });
    out(io, v?.id ?? "");
  });
}

async function cmdFork(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 2, commands.fork.usage);
  const [src, dst] = args.positionals as [string, string];
  await withClient(io, async (c) => {
    const rec = await c.repo.fork(src, dst, { at: atOpt(args) });
    out(io, rec.head ?? "");
  });
}

async function cmdLog(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 1, commands.log.usage);
  const [name] = args.positionals as [string];
  await withClient(io, async (c) => {
    const versions = await c.repo.log(name);
    if (args.values.json) {
      json(io, versions.map((v) => ({ id: v.id, parents: v.parents, time: new Date(v.time).toISOString(), message: v.message, files: v.files, bytes: v.bytes, labels: v.labels })));
      return;
    }
    for (const v of versions) {
      const prov = Object.entries(v.labels).map(([k, val]) => `${k}=${val}`).join(" ");
      out(io, `${v.id.slice(0, 16)}  ${new Date(v.time).toISOString()}  ${String(v.files).padStart(7)} files ${humanBytes(v.bytes).padStart(10)}  ${shownName(v.message)}${prov ? `  [${prov}]` : ""}`);
    }
  });
}

async function cmdDiff(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 2, commands.diff.usage);
  const [name, a, b] = args.positionals as [string, string, string?];
  await withClient(io, async (c) => {
    const d = await c.repo.diff(name, a, b);
    if (args.values.json) return json(io, d);
    for (const p of d.added) out(io, `A ${shownName(p)}`);
    for (const p of d.modified) out(io, `M ${shownName(p)}`);
    for (const p of d.removed) out(io, `D ${shownName(p)}`);
  });
}

async function cmdRevert(args: ParsedArgs, io: CliIO): Promise<void> {
  need(args, 2, commands.revert.usage);
  const [name, v] = args.positionals as [string, string];
  await withClient(io, async (c) => out(io, (await c.repo.revert(name, v)).id));
}

async function cmdFsck(args: ParsedArgs, io: CliIO): Promise<number> {
  const config = loadConfig(io.env);
  const onProgress = io.stderr.isTTY ? (phase: string, done: number, total: number) => io.stderr.write(`\rfsck ${phase}: ${done}/${total}   `) : undefined;
  if (args.values.rebuild) {
    const path = metadataPath(config);
    const objects = openObjectStore(config);
    // Build the new database beside the old one, then swap it in: a failed rebuild loses nothing.
    SqliteMetadataStore.checkpointAlone(path); // refused early while in use, not after the rebuild
    const tmp = `${path}.rebuild-${process.pid}`;
    await rm(tmp, { force: true });
    const meta = SqliteMetadataStore.open({ path: tmp });
    try {
      const r = await rebuildMetadata(meta, objects, { onProgress });
      await meta.close();
      // The old database is kept beside the new one, not deleted: it may hold what the bucket lacks.
      const old = `${path}.before-rebuild-${new Date().toISOString().replace(/[:.]/g, "-")}`;
      const kept = SqliteMetadataStore.setAside(path, old);
      await rename(tmp, path);
      if (onProgress) io.stderr.write("\n");
      out(io, `rebuilt metadata from ${objects.url}: ${r.volumes} volumes, ${r.versions} versions, ${r.packs} packs, ${r.chunks} chunks and trees`);
      if (kept) out(io, `the old database is kept as ${old}`);
    } catch (err) {
      await meta.close().catch(() => undefined);
      for (const suffix of ["", "-wal", "-shm"]) await rm(tmp + suffix, { force: true });
      throw err;
    }
  }
  return withClient(io, async (c) => {
    const r = await fsck(c.repo, { onProgress });
    if (onProgress) io.stderr.write("\n");
    if (args.values.json) json(io, r);
    else {
      out(io, `checked ${r.volumes} volumes, ${r.versions} versions, ${r.trees} trees, ${r.chunks} chunks (${humanBytes(r.bytes)})`);
      for (const v of r.repairedRefs) out(io, `repaired: ref of volume ${v} was behind; rewritten`);
      for (const p of r.problems) out(io, `problem: ${p.kind} ${p.id}: ${p.detail}`);
      out(io, r.problems.length === 0 ? "ok" : `${r.problems.length} problem(s)`);
    }
    return r.problems.length === 0 ? 0 : 1;
  });
}

async function cmdVolume(args: ParsedArgs, io: CliIO): Promise<void> {
  const [sub, name] = args.positionals;
  switch (sub) {
    case "create":
      if (!name) throw usageError("volume create: missing NAME", "volume create NAME");
      await withClient(io, async (c) => {
        await c.repo.createVolume(name);
        out(io, name);
      });
      return;
    case "ls":
      if (name) throw usageError(`volume ls: unexpected argument ${JSON.stringify(name)}`, commands.volume.usage);
      await withClient(io, async (c) => {
        const vols = await c.repo.listVolumes();
        if (args.values.json) {
          json(io, vols.map((v) => ({ name: v.name, head: v.head, forkedFrom: v.forkedFrom, createdAt: new Date(v.createdAt).toISOString() })));
          return;
        }
        for (const v of vols) out(io, `${v.name.padEnd(24)} ${(v.head ?? "(empty)").slice(0, 16).padEnd(16)} ${v.forkedFrom ? `forked from ${v.forkedFrom.volume}` : ""}`.trimEnd());
      });
      return;
    case "rm":
      if (!name) throw usageError("volume rm: missing NAME", "volume rm NAME [--discard]");
      await withClient(io, (c) => c.deleteVolume(name, { discard: args.values.discard === true }));
      return;
    default:
      throw usageError(`volume: unknown subcommand ${JSON.stringify(sub ?? "")}`, "volume create|ls|rm ...");
  }
}

/** The code of the storage commands, for cli.ts. */
export const run: GroupRun<"store"> = {
  volume: cmdVolume,
  put: cmdPut,
  get: cmdGet,
  cat: cmdCat,
  ls: cmdLs,
  rm: cmdRm,
  fork: cmdFork,
  log: cmdLog,
  diff: cmdDiff,
  revert: cmdRevert,
  fsck: cmdFsck,
  demo: (_args, io) => runDemo(io),
};
