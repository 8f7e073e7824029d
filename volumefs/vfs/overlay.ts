/**
 * An overlay: changes staged on top of a base snapshot, as a trie of path segments.
 *
 * A node may replace the base entry at its path (`replace`: an entry, or null for deleted) and
 * may carry overrides for its children. The effective entry at a path is the nearest replace
 * on the way down, or else the base entry found through the effective parent's tree. A rename
 * moves a node (its replace and its children) to another place, so a directory rename is O(1)
 * however large the directory. Nodes with `implicit` are parent directories created by a write
 * below them (mkdir -p); they are not changes of their own and never conflict.
 */
import { VolumeError } from "../errors.js";
import type { ChunkStore } from "../chunk/index.js";
import type { Snapshot } from "./snapshot.js";
import { EMPTY_TREE, findEntry, type ChunkRef, type DirEntry, type Entry, type FileEntry } from "./tree.js";

/** The chunk writer of one sync, as `ChunkStore.writer()` returns it. */
export type PendingWriter = ReturnType<ChunkStore["writer"]>;

/**
 * Where the bytes of a staged file come from until sync chunks and uploads them.
 * "upload": the owner of the bytes chunks and uploads them itself through the sync's writer
 * (a mount re-chunks only around the ranges it changed); `upload` may be called again after a
 * failed sync and must then give the same result.
 */
export type PendingContent =
  | { kind: "bytes"; data: Uint8Array }
  | { kind: "file"; path: string; size: number }
  | { kind: "upload"; size: number; upload(writer: PendingWriter): Promise<{ chunks: ChunkRef[]; size: number }> };

/** A regular file whose content is not yet chunked. */
export interface PendingFileEntry extends Omit<FileEntry, "chunks"> {
  pending: PendingContent;
}

/** What an overlay node may hold: a stored entry, or a file still to upload. */
export type StagedEntry = Entry | PendingFileEntry;

/** One node of the overlay trie. */
export interface OverlayNode {
  /** The entry that replaces the base one here: undefined = base, null = deleted. */
  replace?: StagedEntry | null;
  /** A parent made by a write below it, not a change of its own. */
  implicit?: boolean;
  /** Overrides for child names. */
  children?: Map<string, OverlayNode>;
  /** A directory's mtime since a name in it was made, removed or renamed (not a change of its own). */
  mtime?: number;
}

/** Makes `node` an explicit change to `replace` (null: removed), dropping what was staged below it. */
function settle(node: OverlayNode, replace: StagedEntry | null): void {
  node.replace = replace;
  node.implicit = false;
  node.children = undefined;
  node.mtime = undefined;
}

/** `e` with the time its node's names last changed, when it is a directory that has one. */
function withNamesTime(e: StagedEntry | undefined, node: OverlayNode | undefined): StagedEntry | undefined {
  return node?.mtime !== undefined && e?.kind === "dir" ? { ...e, mtime: node.mtime } : e;
}

/** True when a staged entry still has bytes to upload. */
export function isPending(e: StagedEntry | null | undefined): e is PendingFileEntry {
  return !!e && (e as PendingFileEntry).pending !== undefined;
}

/** A new empty directory entry. */
export function emptyDir(name: string, mode = 0o755, mtime = Date.now()): DirEntry {
  return { kind: "dir", name, mode, mtime, tree: EMPTY_TREE.id, files: 0, bytes: 0 };
}

interface Resolved {
  entry: StagedEntry | undefined;
  node: OverlayNode | undefined;
}

/** Staged changes over a base snapshot. Methods take normalized path segments. */
export class Overlay {
  root: OverlayNode = {};

  constructor(readonly base: Snapshot) {}

  /** True when nothing is staged. */
  isEmpty(): boolean {
    return !this.root.children || this.root.children.size === 0;
  }

  private async resolve(segs: readonly string[]): Promise<Resolved> {
    let entry: StagedEntry | undefined = withNamesTime(this.base.rootEntry, this.root);
    let node: OverlayNode | undefined = this.root;
    for (let i = 0; i < segs.length; i++) {
      if (!entry) return { entry: undefined, node: undefined };
      if (entry.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY(segs.slice(0, i).join("/"));
      const name = segs[i]!;
      const child: OverlayNode | undefined = node?.children?.get(name);
      if (child && child.replace !== undefined) {
        entry = child.replace ?? undefined;
      } else {
        entry = findEntry((await this.base.tree(entry.tree)).entries, name);
      }
      entry = withNamesTime(entry, child);
      node = child;
    }
    return { entry, node };
  }

  /** The effective entry at a path, or undefined. Throws NOT_A_DIRECTORY for a file in the way. */
  async lookup(segs: readonly string[]): Promise<StagedEntry | undefined> {
    return (await this.resolve(segs)).entry;
  }

  /** The effective entries of a directory, sorted by name. Throws NOT_FOUND, NOT_A_DIRECTORY. */
  async readdir(segs: readonly string[]): Promise<StagedEntry[]> {
    const { entry, node } = await this.resolve(segs);
    if (!entry) throw VolumeError.NOT_FOUND(JSON.stringify(segs.join("/")), { op: "list" });
    if (entry.kind !== "dir") throw VolumeError.NOT_A_DIRECTORY(segs.join("/"), { op: "list" });
    const byName = new Map<string, StagedEntry>();
    for (const e of (await this.base.tree(entry.tree)).entries) byName.set(e.name, e);
    for (const [name, child] of node?.children ?? []) {
      if (child.replace === null) byName.delete(name);
      else if (child.replace !== undefined) byName.set(name, { ...child.replace, name });
      const e = withNamesTime(byName.get(name), child);
      if (e) byName.set(name, e);
    }
    return [...byName.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /** The node at a path, created (with implicit parent dirs where nothing exists) if missing. */
  private async nodeFor(segs: readonly string[]): Promise<OverlayNode> {
    let node = this.root;
    for (let i = 0; i < segs.length; i++) {
      const name = segs[i]!;
      node.children ??= new Map();
      let child = node.children.get(name);
      if (!child) {
        child = {};
        node.children.set(name, child);
      }
      if (i < segs.length - 1) {
        const prefix = segs.slice(0, i + 1);
        const e = child.replace !== undefined ? child.replace : await this.lookup(prefix);
        if (!e) {
          child.replace = emptyDir(name);
          child.implicit = true;
        } else if (e.kind !== "dir") {
          throw VolumeError.NOT_A_DIRECTORY(prefix.join("/"), { op: "write" });
        }
      }
      node = child;
    }
    return node;
  }

  /** Stages an entry at a path (a file, symlink or dir), replacing what is there but a directory. */
  async put(segs: readonly string[], entry: StagedEntry): Promise<void> {
    const cur = await this.lookup(segs);
    if (cur?.kind === "dir" && entry.kind !== "dir") throw VolumeError.IS_A_DIRECTORY(segs.join("/"), { op: "write" });
    const node = await this.nodeFor(segs);
    settle(node, { ...entry, name: segs[segs.length - 1]! });
    if (!cur) this.namesChanged(segs);
  }

  /**
   * When names change, for the directories' mtimes: the time of the journal line being applied,
   * so that a replay gives the times the mount answered; now when unset.
   */
  time: number | undefined;

  /** The directory holding `segs` had a name made, removed or renamed: its mtime is now (`time`). */
  private namesChanged(segs: readonly string[]): void {
    if (segs.length === 0) return;
    let node: OverlayNode | undefined = this.root;
    for (const name of segs.slice(0, -1)) node = node?.children?.get(name);
    if (node) node.mtime = this.time ?? Date.now();
  }

  /** Creates a directory; a no-op when one is there. Parents are created as needed. */
  async mkdir(segs: readonly string[], mode = 0o755): Promise<void> {
    const cur = await this.lookup(segs);
    if (cur?.kind === "dir") return;
    if (cur) throw VolumeError.ALREADY_EXISTS(JSON.stringify(segs.join("/")), { op: "mkdir", hint: "a file is in the way" });
    const node = await this.nodeFor(segs);
    settle(node, emptyDir(segs[segs.length - 1]!, mode));
    this.namesChanged(segs);
  }

  /** Removes a path and returns what was there; a non-empty directory needs `recursive`. Throws NOT_FOUND, NOT_EMPTY. */
  async remove(segs: readonly string[], opts: { recursive?: boolean } = {}): Promise<StagedEntry> {
    const cur = await this.lookup(segs);
    if (!cur) throw VolumeError.NOT_FOUND(JSON.stringify(segs.join("/")), { op: "remove", path: segs.join("/") });
    if (cur.kind === "dir" && !opts.recursive && (await this.readdir(segs)).length > 0) {
      throw new VolumeError("NOT_EMPTY", `remove ${JSON.stringify(segs.join("/"))}: directory not empty`, {
        path: segs.join("/"),
        hint: "remove it recursively (strata rm -r)",
      });
    }
    settle(await this.nodeFor(segs), null);
    this.namesChanged(segs);
    return cur;
  }

  /**
   * Renames `src` to `dst` as rename(2) does: replaces a file or an empty directory at `dst`;
   * parents of `dst` are created as needed. O(1) for directories of any size. Returns what it
   * replaced at `dst`, if anything.
   */
  async rename(src: readonly string[], dst: readonly string[]): Promise<StagedEntry | undefined> {
    const s = src.join("/");
    const d = dst.join("/");
    if (s === d) return undefined;
    if (d.startsWith(s + "/")) throw new VolumeError("INVALID_ARGUMENT", `rename ${JSON.stringify(s)}: target ${JSON.stringify(d)} is inside it`, { path: s });
    const { entry, node } = await this.resolve(src);
    if (!entry) throw VolumeError.NOT_FOUND(JSON.stringify(s), { op: "rename", path: s });
    const target = await this.lookup(dst);
    if (target) {
      if (target.kind === "dir" && entry.kind !== "dir") throw VolumeError.IS_A_DIRECTORY(d, { op: "rename" });
      if (target.kind !== "dir" && entry.kind === "dir") throw VolumeError.NOT_A_DIRECTORY(d, { op: "rename" });
      if (target.kind === "dir" && (await this.readdir(dst)).length > 0) {
        throw new VolumeError("NOT_EMPTY", `rename ${JSON.stringify(s)}: target ${JSON.stringify(d)} is a directory that is not empty`, { path: d });
      }
    }
    const moved: OverlayNode = { replace: { ...entry, name: dst[dst.length - 1]! }, implicit: false, children: node?.children, mtime: node?.mtime };
    settle(await this.nodeFor(src), null);
    const dstNode = await this.nodeFor(dst);
    Object.assign(dstNode, moved);
    this.namesChanged(src);
    this.namesChanged(dst);
    return target;
  }

  /** Changes attributes of the entry at a path. Throws NOT_FOUND. */
  async setAttr(segs: readonly string[], patch: { mode?: number; mtime?: number; uid?: number; gid?: number; xattrs?: Record<string, Uint8Array> | undefined }): Promise<void> {
    const { entry } = await this.resolve(segs);
    if (!entry) throw VolumeError.NOT_FOUND(JSON.stringify(segs.join("/")), { op: "set attributes", path: segs.join("/") });
    if (segs.length === 0) throw VolumeError.INVALID_PATH("/", "the root's attributes are fixed");
    const node = await this.nodeFor(segs);
    const next = { ...entry } as StagedEntry;
    if (patch.mode !== undefined) next.mode = patch.mode & 0o7777;
    if (patch.mtime !== undefined) {
      next.mtime = patch.mtime;
      node.mtime = undefined;
    }
    if (patch.uid !== undefined) {
      if (patch.uid) next.uid = patch.uid;
      else delete next.uid;
    }
    if (patch.gid !== undefined) {
      if (patch.gid) next.gid = patch.gid;
      else delete next.gid;
    }
    if ("xattrs" in patch) {
      if (patch.xattrs && Object.keys(patch.xattrs).length > 0) next.xattrs = patch.xattrs;
      else delete next.xattrs;
    }
    node.replace = next;
    node.implicit = false;
  }

  /** Paths changed explicitly (not implicit parents), parents before children. */
  changedPaths(): string[] {
    const out: string[] = [];
    const walk = (node: OverlayNode, prefix: string): void => {
      for (const [name, child] of node.children ?? []) {
        const p = prefix === "" ? name : `${prefix}/${name}`;
        if (child.replace !== undefined && !child.implicit) out.push(p);
        walk(child, p);
      }
    };
    walk(this.root, "");
    return out;
  }

  /** Every staged entry still to upload, with the node that holds it. */
  pendingNodes(): { path: string; node: OverlayNode & { replace: PendingFileEntry } }[] {
    const out: { path: string; node: OverlayNode & { replace: PendingFileEntry } }[] = [];
    const walk = (node: OverlayNode, prefix: string): void => {
      for (const [name, child] of node.children ?? []) {
        const p = prefix === "" ? name : `${prefix}/${name}`;
        if (isPending(child.replace)) out.push({ path: p, node: child as OverlayNode & { replace: PendingFileEntry } });
        walk(child, p);
      }
    };
    walk(this.root, "");
    return out;
  }

  /**
   * Makes the directory staged at `segs` take the base's directory there as what it starts
   * from, as a parent made by a write does: a rebase's directory both sides made (the base is
   * then the head it is rebased onto, whose directory has the same attributes).
   */
  mergeDir(segs: readonly string[]): void {
    let node: OverlayNode | undefined = this.root;
    for (const name of segs) node = node?.children?.get(name);
    if (node?.replace?.kind === "dir") node.implicit = true;
  }

  /** Drops the change at a path and everything staged below it (the "theirs" policy, and unchanged paths of a rebase). */
  drop(segs: readonly string[]): void {
    let node: OverlayNode | undefined = this.root;
    const parents: [OverlayNode, string][] = [];
    for (const name of segs) {
      if (!node) return;
      parents.push([node, name]);
      node = node.children?.get(name);
    }
    const last = parents.pop();
    if (!last) return;
    last[0].children?.delete(last[1]);
    for (let i = parents.length - 1; i >= 0; i--) {
      const [parent, name] = parents[i]!;
      const child = parent.children?.get(name);
      if (child && child.implicit && (!child.children || child.children.size === 0)) parent.children!.delete(name);
      else if (child && child.replace === undefined && (!child.children || child.children.size === 0)) parent.children!.delete(name);
      else break;
    }
  }
}
