/**
 * The control directory of a mount: `/.strata/`, so that a process that has nothing but the
 * mount (a sandbox, no CLI, no network) can sync, reload and look at history. `readdir("/")`
 * does not list it; looking it up by name finds it. The CLI (`strata sync DIR`, `strata reload
 * DIR`, `strata status DIR`) uses exactly these files.
 *
 * Protocol (one write(2) is one command; the write returns when the command is done):
 *   /.strata/version   read: the base version id and "\n" ("\n" alone for an empty volume).
 *   /.strata/status    read: JSON of MountStatus {"volume","base","readOnly","staged":{"added",
 *                      "modified","removed"}} and "\n".
 *   /.strata/sync      write: a message (plain text), or JSON {"message","onConflict","labels"}
 *                      (onConflict "fail" | "ours" | "theirs"); runs a sync before the write
 *                      returns; a failed sync fails the write (EIO, EROFS, …).
 *                      read: the last result, {"version","changed","conflicts"} or
 *                      {"error":{"code","message"}}, and "\n"; "{}\n" before the first sync.
 *   /.strata/reload    write: "1" (refused while changes are staged) or "discard" (drops them);
 *                      moves the base to the volume's head. read: "".
 *   /.strata/versions/ readdir: the volume's version ids, newest first;
 *                      /.strata/versions/<id>/<path> is that version's tree, read-only
 *                      (<id> may be any unique prefix or "head", as `strata log` shows them).
 * Attributes of these files are never `immutable`: their content changes; sizes are the sizes of
 * the content at the time of the getattr call, so a FUSE adapter should open them with direct_io.
 */
import { VolumeError } from "../errors.js";
import type { ConflictPolicy } from "./build.js";
import type { FileAttr, MountStatus, MountSyncOptions, MountSyncResult } from "./mount-types.js";
import type { Repository } from "./repo.js";
import type { Snapshot } from "./snapshot.js";
import { blake3Hex, type Entry, type FileEntry } from "./tree.js";

/** What the control directory needs from its mount. */
export interface ControlHost {
  readonly repo: Repository;
  readonly volume: string;
  readonly readOnly: boolean;
  /** True when mounted at a fixed (old) version: it can never move, not even by reload. */
  readonly pinned: boolean;
  /** The base version id, or null. */
  baseId(): string | null;
  status(): Promise<MountStatus>;
  sync(opts?: MountSyncOptions): Promise<MountSyncResult>;
  reload(opts?: { discard?: boolean }): Promise<string | null>;
}

/** A handle opened on a control file: its content as of `open`. */
export interface ControlHandle {
  kind: "control";
  name: string;
  data: Uint8Array;
  writable: boolean;
}

/** A handle opened on a file of an old version under /.strata/versions. */
export interface VersionFileHandle {
  kind: "version";
  snapshot: Snapshot;
  entry: Entry;
}

const FILES = ["reload", "status", "sync", "version"] as const;

/** The last sync's outcome, as /.strata/sync reads it. */
export type LastSync = MountSyncResult | { error: { code: string; message: string; hint?: string } } | undefined;

/** The `/.strata/` directory of one mount. Paths are segments below `.strata`. */
export class ControlDir {
  /** The outcome of the last sync (from any caller). */
  last: LastSync;
  private readonly snapshots = new Map<string, Snapshot>();

  constructor(private readonly host: ControlHost) {}

  /** Records a sync's outcome. */
  recordSync(r: MountSyncResult | Error): void {
    this.last = r instanceof Error ? { error: { code: (r as VolumeError).code ?? "IO", message: r.message, ...((r as VolumeError).hint ? { hint: (r as VolumeError).hint } : {}) } } : { version: r.version, changed: r.changed, conflicts: r.conflicts };
  }

  private async content(name: string): Promise<Uint8Array> {
    switch (name) {
      case "version":
        return Buffer.from(`${this.host.baseId() ?? ""}\n`);
      case "status":
        return Buffer.from(JSON.stringify(await this.host.status()) + "\n");
      case "sync":
        return Buffer.from(JSON.stringify(this.last ?? {}) + "\n");
      default:
        return new Uint8Array(0);
    }
  }

  private dirAttr(): FileAttr {
    const t = Date.now();
    return { kind: "dir", mode: 0o555, size: 0, mtime: t, atime: t, ctime: t, nlink: 2, uid: 0, gid: 0, immutable: false };
  }

  private async version(id: string): Promise<Snapshot> {
    const hit = this.snapshots.get(id);
    if (hit) return hit;
    const v = await this.host.repo.resolve(this.host.volume, id);
    const s = this.host.repo.snapshot(v);
    if (this.snapshots.size > 64) this.snapshots.clear();
    this.snapshots.set(id, s);
    return s;
  }

  private async versionEntry(segs: readonly string[]): Promise<{ snapshot: Snapshot; entry: Entry }> {
    const snapshot = await this.version(segs[1]!);
    const entry = segs.length === 2 ? snapshot.rootEntry : await snapshot.lookupSegments(segs.slice(2));
    if (!entry) throw VolumeError.NOT_FOUND(JSON.stringify("/.strata/" + segs.join("/")), { op: "find" });
    return { snapshot, entry };
  }

  /** Attributes of `/.strata/<segs>`. Throws NOT_FOUND. */
  async getattr(segs: readonly string[]): Promise<FileAttr> {
    if (segs.length === 0 || (segs.length === 1 && segs[0] === "versions")) return this.dirAttr();
    if (segs[0] === "versions") {
      const { entry } = await this.versionEntry(segs);
      return entryAttr(entry);
    }
    if (segs.length === 1 && (FILES as readonly string[]).includes(segs[0]!)) {
      const t = Date.now();
      const writable = (segs[0] === "sync" && !this.host.readOnly) || (segs[0] === "reload" && !this.host.pinned);
      const size = (await this.content(segs[0]!)).length;
      return { kind: "file", mode: writable ? 0o644 : 0o444, size, mtime: t, atime: t, ctime: t, nlink: 1, uid: 0, gid: 0, immutable: false };
    }
    throw VolumeError.NOT_FOUND(JSON.stringify("/.strata/" + segs.join("/")), { op: "find" });
  }

  /** Names in a control directory. */
  async readdir(segs: readonly string[]): Promise<string[]> {
    if (segs.length === 0) return [...FILES, "versions"].sort();
    if (segs.length === 1 && segs[0] === "versions") return (await this.host.repo.log(this.host.volume)).map((v) => v.id);
    if (segs[0] === "versions") {
      const { snapshot, entry } = await this.versionEntry(segs);
      if (entry.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY("/.strata/" + segs.join("/"), { op: "list" });
      return (await snapshot.tree(entry.tree)).entries.map((e) => e.name);
    }
    const a = await this.getattr(segs);
    throw a.kind === "dir" ? VolumeError.NOT_FOUND("/.strata/" + segs.join("/")) : VolumeError.NOT_A_DIRECTORY("/.strata/" + segs.join("/"), { op: "list" });
  }

  /** The target of a symlink in an old version. */
  async readlink(segs: readonly string[]): Promise<string> {
    if (segs[0] === "versions" && segs.length > 2) {
      const { entry } = await this.versionEntry(segs);
      if (entry.kind === "symlink") return entry.target;
    }
    throw new VolumeError("INVALID_ARGUMENT", `read link ${JSON.stringify("/.strata/" + segs.join("/"))}: not a symbolic link`);
  }

  /** Opens a control file, or a file of an old version (read-only). */
  async open(segs: readonly string[], writeAccess: boolean): Promise<ControlHandle | VersionFileHandle> {
    if (segs[0] === "versions" && segs.length > 2) {
      if (writeAccess) throw VolumeError.READ_ONLY(JSON.stringify("/.strata/" + segs.join("/")), { op: "open", hint: "old versions are read-only" });
      const { snapshot, entry } = await this.versionEntry(segs);
      if (entry.kind === "dir") throw VolumeError.IS_A_DIRECTORY("/.strata/" + segs.join("/"));
      return { kind: "version", snapshot, entry };
    }
    const a = await this.getattr(segs);
    if (a.kind === "dir") throw VolumeError.IS_A_DIRECTORY("/.strata/" + segs.join("/"));
    const name = segs[0]!;
    if (writeAccess && (name === "version" || name === "status")) throw new VolumeError("PERMISSION", `open /.strata/${name}: read-only control file`);
    if (writeAccess && name === "sync" && this.host.readOnly) throw VolumeError.READ_ONLY("/.strata/" + name, { op: "open", hint: "the mount is read-only" });
    if (writeAccess && name === "reload" && this.host.pinned) throw VolumeError.READ_ONLY("/.strata/" + name, { op: "open", hint: "this mount shows a fixed version" });
    return { kind: "control", name, data: await this.content(name), writable: writeAccess };
  }

  /** Reads from an open control or old-version file. */
  async read(h: ControlHandle | VersionFileHandle, length: number, position: number): Promise<Uint8Array> {
    if (h.kind === "version") {
      if (h.entry.kind === "symlink") return Buffer.from(h.entry.target).subarray(position, position + length);
      return h.snapshot.read(h.entry, position, length);
    }
    return h.data.subarray(Math.min(position, h.data.length), Math.min(position + length, h.data.length));
  }

  /** Runs the command written to a control file; returns the bytes taken. */
  async write(h: ControlHandle | VersionFileHandle, data: Uint8Array): Promise<number> {
    if (h.kind === "version") throw VolumeError.READ_ONLY("an old version", { op: "write" });
    const text = Buffer.from(data).toString("utf8").trim();
    if (h.name === "sync") {
      const opts = parseSyncCommand(text);
      try {
        const r = await this.host.sync(opts);
        this.recordSync(r);
        h.data = await this.content("sync");
      } catch (err) {
        this.recordSync(err as Error);
        throw err;
      }
      return data.length;
    }
    if (h.name === "reload") {
      if (text !== "1" && text !== "discard" && text !== "") {
        throw new VolumeError("INVALID_ARGUMENT", `write /.strata/reload: expected "1" or "discard", got ${JSON.stringify(text.slice(0, 40))}`);
      }
      await this.host.reload({ discard: text === "discard" });
      return data.length;
    }
    throw new VolumeError("PERMISSION", `write /.strata/${h.name}: read-only control file`);
  }
}

/** Parses what was written to /.strata/sync: a plain message or JSON options. */
export function parseSyncCommand(text: string): MountSyncOptions {
  if (text.startsWith("{")) {
    let doc: { message?: unknown; onConflict?: unknown; labels?: unknown };
    try {
      doc = JSON.parse(text) as typeof doc;
    } catch (err) {
      throw new VolumeError("INVALID_ARGUMENT", `parse sync command: ${(err as Error).message}`, { cause: err });
    }
    const out: MountSyncOptions = {};
    if (typeof doc.message === "string") out.message = doc.message;
    if (doc.onConflict !== undefined) {
      if (doc.onConflict !== "fail" && doc.onConflict !== "ours" && doc.onConflict !== "theirs") {
        throw new VolumeError("INVALID_ARGUMENT", `parse sync command: onConflict must be "fail", "ours" or "theirs"`);
      }
      out.onConflict = doc.onConflict as ConflictPolicy;
    }
    if (doc.labels !== undefined) {
      if (typeof doc.labels !== "object" || doc.labels === null || Object.values(doc.labels).some((v) => typeof v !== "string")) {
        throw new VolumeError("INVALID_ARGUMENT", "parse sync command: labels must map names to strings");
      }
      out.labels = doc.labels as Record<string, string>;
    }
    return out;
  }
  return text === "" ? {} : { message: text };
}

/** stat(2) attributes of a stored entry. */
export function entryAttr(e: Entry, immutable = true): FileAttr {
  const size = e.kind === "file" ? e.size : e.kind === "symlink" ? Buffer.byteLength(e.target) : 0;
  const a: FileAttr = { kind: e.kind, mode: e.mode & 0o7777, size, mtime: e.mtime, atime: e.mtime, ctime: e.mtime, nlink: e.kind === "dir" ? 2 : 1, uid: e.uid ?? 0, gid: e.gid ?? 0, immutable: immutable && e.kind !== "dir", xattrs: hasXattrs(e) };
  if (e.kind === "file") a.tag = contentTag(e);
  else if (e.kind === "symlink") a.tag = e.target;
  return a;
}

/** True when the entry has at least one extended attribute. */
export function hasXattrs(e: { xattrs?: Record<string, Uint8Array> }): boolean {
  if (e.xattrs === undefined) return false;
  for (const _ in e.xattrs) return true;
  return false;
}

const tags = new WeakMap<FileEntry, string>();

/** Names a stored file's bytes: its chunk ids, hashed when there are many. */
function contentTag(e: FileEntry): string {
  let t = tags.get(e);
  if (t === undefined) {
    t = idsTag(e.list ?? e.chunks.map((c) => c.id).join(","));
    tags.set(e, t);
  }
  return t;
}

/** The tag (FileAttr.tag) a stored file with these chunks has. */
export function chunksTag(chunks: readonly { id: string }[]): string {
  return idsTag(chunks.map((c) => c.id).join(","));
}

function idsTag(ids: string): string {
  return ids.length > 256 ? blake3Hex(Buffer.from(ids)) : ids;
}
