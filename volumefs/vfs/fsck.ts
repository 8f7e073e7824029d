import type { ChunkLocation, MetadataStore, VersionRecord, VolumeRecord } from "../../metadata/index.js";
import { readPackIndex } from "../chunk/index.js";
import { VolumeError } from "../errors.js";
import type { ObjectStore } from "../object/index.js";
import { decodeVersion, refKey, type Repository } from "./repo.js";
import { blake3Hex, decodeChunkList, decodeTree, EMPTY_TREE } from "./tree.js";

/** One thing fsck found wrong. */
export interface FsckProblem {
  kind: "missing-version-object" | "corrupt-version-object" | "missing-version" | "missing-tree" | "corrupt-tree" | "missing-chunk" | "corrupt-chunk" | "missing-pack";
  /** The id (version, tree, chunk or pack) concerned. */
  id: string;
  /** A one-line description. */
  detail: string;
}

/** What fsck checked and found. */
export interface FsckReport {
  volumes: number;
  versions: number;
  trees: number;
  chunks: number;
  /** Bytes of chunk data read and verified. */
  bytes: number;
  problems: FsckProblem[];
  /** Volumes whose ref in the bucket was behind the metadata and was rewritten. */
  repairedRefs: string[];
}

/** Options of fsck. */
export interface FsckOptions {
  /** Called with a short phase name and a count, for progress displays. */
  onProgress?: (phase: string, done: number, total: number) => void;
  /** Packs fetched at once. Default 4. */
  concurrency?: number;
}

async function pool<T>(items: readonly T[], n: number, fn: (item: T) => Promise<void>): Promise<void> {
  let i = 0;
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, async () => {
    while (i < items.length) await fn(items[i++]!);
  }));
}

/**
 * Checks that every retained version is complete in the bucket: its version object is there and
 * hashes right, every tree it reaches is there and hashes right, and every chunk those trees name
 * is in its pack with the right hash (each pack is read once). Also brings the bucket's volume
 * refs up to date with the metadata (the only repair it makes).
 */
export async function fsck(repo: Repository, opts: FsckOptions = {}): Promise<FsckReport> {
  const { meta, objects } = repo;
  const report: FsckReport = { volumes: 0, versions: 0, trees: 0, chunks: 0, bytes: 0, problems: [], repairedRefs: [] };
  const problem = (p: FsckProblem): void => {
    report.problems.push(p);
  };

  const volumes = await meta.listVolumes(repo.env);
  report.volumes = volumes.length;
  const versions = new Map<string, VersionRecord>();
  for (const v of await meta.listVersions()) versions.set(v.id, v);
  for (const vol of volumes) {
    if (vol.head && !versions.has(vol.head)) problem({ kind: "missing-version", id: vol.head, detail: `volume ${vol.name}: head version is not in the metadata` });
  }

  let n = 0;
  await pool([...versions.values()], 8, async (v) => {
    try {
      const data = await objects.get(`versions/${v.id}`);
      decodeVersion(v.id, data);
    } catch (err) {
      if (err instanceof VolumeError && err.code === "NOT_FOUND") problem({ kind: "missing-version-object", id: v.id, detail: `versions/${v.id} is not in the bucket` });
      else if (err instanceof VolumeError && err.code === "CORRUPT") problem({ kind: "corrupt-version-object", id: v.id, detail: `versions/${v.id} does not hash to its id` });
      else throw err;
    }
    opts.onProgress?.("versions", ++n, versions.size);
  });
  report.versions = versions.size;

  // Trees: read from their packs (not the SQLite copy), verify, and collect the chunks they name.
  const seenTrees = new Set<string>([EMPTY_TREE.id]);
  const chunkIds = new Set<string>();
  const lists = new Set<string>();
  const queue = [...new Set([...versions.values()].map((v) => v.root))].filter((id) => !seenTrees.has(id));
  for (const id of queue) seenTrees.add(id);
  while (queue.length > 0) {
    const batch = queue.splice(0, 256);
    const locs = await meta.getChunks(batch);
    const byPack = groupByPack(batch, locs, (id) => problem({ kind: "missing-tree", id, detail: `tree ${id} is in no pack` }));
    await pool([...byPack.entries()], opts.concurrency ?? 4, async ([pack, entries]) => {
      const parts = await readParts(objects, pack, entries, (id, kind) => problem({ kind: kind === "missing" ? "missing-pack" : "corrupt-tree", id: kind === "missing" ? pack : id, detail: kind === "missing" ? `pack ${pack} is not in the bucket` : `tree ${id} does not hash to its id` }));
      for (const [id, data] of parts) {
        if (lists.has(id)) {
          for (const c of decodeChunkList(data, id)) chunkIds.add(c.id);
          continue;
        }
        report.trees++;
        for (const e of decodeTree(data, id).entries) {
          if (e.kind === "dir" && !seenTrees.has(e.tree)) {
            seenTrees.add(e.tree);
            queue.push(e.tree);
          } else if (e.kind === "file" && e.list !== undefined && !seenTrees.has(e.list)) {
            seenTrees.add(e.list);
            lists.add(e.list);
            queue.push(e.list);
          } else if (e.kind === "file") for (const c of e.chunks) chunkIds.add(c.id);
        }
      }
    });
    opts.onProgress?.("trees", report.trees, seenTrees.size);
  }

  const ids = [...chunkIds];
  for (let i = 0; i < ids.length; i += 2000) {
    const batch = ids.slice(i, i + 2000);
    const locs = await meta.getChunks(batch);
    const byPack = groupByPack(batch, locs, (id) => problem({ kind: "missing-chunk", id, detail: `chunk ${id} is in no pack` }));
    await pool([...byPack.entries()], opts.concurrency ?? 4, async ([pack, entries]) => {
      const parts = await readParts(objects, pack, entries, (id, kind) => problem({ kind: kind === "missing" ? "missing-pack" : "corrupt-chunk", id: kind === "missing" ? pack : id, detail: kind === "missing" ? `pack ${pack} is not in the bucket` : `chunk ${id} does not hash to its id` }));
      for (const [, data] of parts) {
        report.chunks++;
        report.bytes += data.length;
      }
    });
    opts.onProgress?.("chunks", Math.min(i + 2000, ids.length), ids.length);
  }
  dedupeProblems(report);

  for (const vol of volumes) {
    const key = refKey(repo.env, vol);
    if (!(await objects.head(key))) {
      const body = { head: vol.head, forkedFrom: vol.forkedFrom, createdAt: vol.createdAt, seq: vol.seq };
      await objects.put(key, Buffer.from(JSON.stringify(body)));
      report.repairedRefs.push(vol.name);
    }
  }
  return report;
}

function dedupeProblems(report: FsckReport): void {
  const seen = new Set<string>();
  report.problems = report.problems.filter((p) => {
    const k = `${p.kind}:${p.id}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

function groupByPack(ids: readonly string[], locs: Map<string, ChunkLocation>, missing: (id: string) => void): Map<string, ChunkLocation[]> {
  const out = new Map<string, ChunkLocation[]>();
  for (const id of ids) {
    const l = locs.get(id);
    if (!l) {
      missing(id);
      continue;
    }
    let list = out.get(l.pack);
    if (!list) out.set(l.pack, (list = []));
    list.push(l);
  }
  return out;
}

/** Reads the given entries of one pack (one GET per contiguous run) and verifies their hashes. */
async function readParts(objects: ObjectStore, pack: string, entries: ChunkLocation[], bad: (id: string, kind: "missing" | "corrupt") => void): Promise<Map<string, Uint8Array>> {
  const out = new Map<string, Uint8Array>();
  entries.sort((a, b) => a.offset - b.offset);
  let i = 0;
  while (i < entries.length) {
    let j = i;
    while (j + 1 < entries.length && entries[j + 1]!.offset <= entries[j]!.offset + entries[j]!.length + 64 * 1024 && entries[j + 1]!.offset + entries[j + 1]!.length - entries[i]!.offset <= 64 << 20) j++;
    const start = entries[i]!.offset;
    const end = entries[j]!.offset + entries[j]!.length;
    let data: Uint8Array;
    try {
      data = await objects.get(`packs/${pack}`, { offset: start, length: end - start });
    } catch (err) {
      if (err instanceof VolumeError && err.code === "NOT_FOUND") {
        for (const e of entries) bad(e.id, "missing");
        return out;
      }
      throw err;
    }
    for (let k = i; k <= j; k++) {
      const e = entries[k]!;
      const part = data.subarray(e.offset - start, e.offset - start + e.length);
      if (part.length !== e.length || blake3Hex(part) !== e.id) bad(e.id, "corrupt");
      else out.set(e.id, part);
    }
    i = j + 1;
  }
  return out;
}

/** What a rebuild found in the bucket. */
export interface RebuildReport {
  packs: number;
  chunks: number;
  versions: number;
  volumes: number;
}

/**
 * Rebuilds an empty metadata store from the bucket alone: the chunk index from every pack's
 * index, the versions from `versions/`, and each volume from its newest ref (deleted volumes
 * stay deleted). Trees are found in the packs on first read.
 */
export async function rebuildMetadata(meta: MetadataStore, objects: ObjectStore, opts: FsckOptions = {}): Promise<RebuildReport> {
  const report: RebuildReport = { packs: 0, chunks: 0, versions: 0, volumes: 0 };
  const packs: string[] = [];
  for await (const o of objects.list("packs/")) packs.push(o.key.slice("packs/".length));
  await pool(packs, opts.concurrency ?? 8, async (id) => {
    const idx = await readPackIndex(objects, id);
    await meta.putPack({ id, size: idx.size, createdAt: Date.now() }, idx.entries.map((e) => ({ id: e.id, pack: id, offset: e.offset, length: e.length })));
    report.packs++;
    report.chunks += idx.entries.length;
    opts.onProgress?.("packs", report.packs, packs.length);
  });

  const versionKeys: string[] = [];
  for await (const o of objects.list("versions/")) versionKeys.push(o.key);
  await pool(versionKeys, 16, async (key) => {
    const id = key.slice("versions/".length);
    await meta.putVersion(decodeVersion(id, await objects.get(key)));
    report.versions++;
    opts.onProgress?.("versions", report.versions, versionKeys.length);
  });

  const newest = new Map<string, string>();
  for await (const o of objects.list("refs/")) {
    const parts = o.key.split("/");
    if (parts.length !== 4) continue;
    const vol = `${parts[1]}/${parts[2]}`;
    const cur = newest.get(vol);
    if (!cur || cur < o.key) newest.set(vol, o.key);
  }
  for (const [vol, key] of newest) {
    const [env, name] = vol.split("/") as [string, string];
    const ref = JSON.parse(Buffer.from(await objects.get(key)).toString("utf8")) as Omit<VolumeRecord, "env" | "name"> & { deleted?: boolean };
    if (ref.deleted) continue;
    await meta.createVolume({ env, name, head: ref.head, forkedFrom: ref.forkedFrom, createdAt: ref.createdAt, seq: ref.seq });
    report.volumes++;
  }
  return report;
}
