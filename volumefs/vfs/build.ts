import { VolumeError } from "../errors.js";
import { emptyDir, isPending, type Overlay, type OverlayNode } from "./overlay.js";
import type { Snapshot } from "./snapshot.js";
import { encodeTree, sameEntry, type DirEntry, type EncodedTree, type Entry } from "./tree.js";

/** Conflict policy of a sync whose base is no longer the head. */
export type ConflictPolicy = "fail" | "ours" | "theirs";

/**
 * Applies an overlay (all content uploaded, no pending entries) onto a directory entry of
 * `onto`, bottom-up. Only directories on the path of a change are re-encoded; every new tree
 * is handed to `emit`. Works on the overlay's own base or, for a rebase, on another snapshot.
 */
export async function buildDir(onto: Snapshot, dir: DirEntry, node: OverlayNode, emit: (t: EncodedTree) => void): Promise<DirEntry> {
  if (!node.children || node.children.size === 0) return dir;
  const entries = new Map<string, Entry>();
  for (const e of (await onto.tree(dir.tree)).entries) entries.set(e.name, e);
  for (const [name, child] of node.children) {
    const baseEntry = entries.get(name);
    let e: Entry | undefined;
    if (child.replace === undefined) e = baseEntry;
    else if (child.replace === null) e = undefined;
    else if (child.implicit && baseEntry?.kind === "dir") e = baseEntry;
    else {
      if (isPending(child.replace)) throw new VolumeError("INVALID_ARGUMENT", `build tree: ${name} still has content to upload`);
      e = child.replace;
    }
    if (child.children && child.children.size > 0) {
      // Not a file's mode where the head has a file (a rebase under "ours" of a write below it).
      const asDir: DirEntry = e?.kind === "dir" ? e : emptyDir(name, 0o755);
      e = await buildDir(onto, asDir, child, emit);
    }
    if (e === undefined) entries.delete(name);
    else entries.set(name, e.name === name ? e : { ...e, name });
  }
  const enc = encodeTree([...entries.values()]);
  emit(enc);
  return { ...dir, tree: enc.id, files: enc.files, bytes: enc.bytes, ...(node.mtime !== undefined ? { mtime: node.mtime } : {}) };
}

/** What a rebase of an overlay onto a moved head found (`findConflicts`). */
export interface RebasePlan {
  /** Paths changed on both sides, to settle by the sync's policy. */
  conflicts: string[];
  /**
   * Directories both sides made where there was none, with the same attributes: one directory
   * holding both sides' entries, whose own collisions are among `conflicts`. The sync builds
   * them on the head's directory (`Overlay.mergeDir`).
   */
  merged: string[];
  /** Paths staged without a change (a hard link's source, say): the head's entry stands (`Overlay.drop`). */
  unchanged: string[];
}

/** Whether every change staged below `node` removes a name. */
function onlyRemovals(node: OverlayNode): boolean {
  for (const child of node.children?.values() ?? []) {
    if (child.replace === null) continue;
    if (child.replace !== undefined || !onlyRemovals(child)) return false;
  }
  return true;
}

/** Whether two directories carry the same attributes (mode, owner, xattrs), whatever they hold. */
function sameDirAttrs(a: DirEntry, b: DirEntry): boolean {
  const bare = (d: DirEntry): DirEntry => ({ ...d, tree: "", files: 0, bytes: 0, mtime: 0 });
  return sameEntry(bare(a), bare(b));
}

/**
 * Paths where the overlay (staged over `base`) collides with what happened between `base` and
 * `head`: a path we changed that they changed to something else, or a path we changed below a
 * directory they removed or replaced. Changing a path to the same result on both sides is not a
 * conflict, nor is a directory both sides made (their entries meet in it, path by path).
 */
export async function findConflicts(overlay: Overlay, base: Snapshot, head: Snapshot): Promise<RebasePlan> {
  const plan: RebasePlan = { conflicts: [], merged: [], unchanged: [] };
  const at = async (s: Snapshot, segs: string[]): Promise<Entry | undefined | "blocked"> => {
    try {
      return await s.lookupSegments(segs);
    } catch (err) {
      if (err instanceof VolumeError && err.code === "NOT_A_DIRECTORY") return "blocked";
      throw err;
    }
  };
  const walk = async (node: OverlayNode, segs: string[], parentGone: boolean): Promise<void> => {
    for (const [name, child] of node.children ?? []) {
      const p = [...segs, name];
      const eb = await at(base, p);
      const eh = await at(head, p);
      const theyChanged = eb === "blocked" || eh === "blocked" ? eb !== eh : !sameEntry(eb, eh);
      const explicit = child.replace !== undefined && !child.implicit;
      const leaf = !child.children || child.children.size === 0;
      let conflict = false;
      if (explicit) {
        const ours = child.replace === null ? undefined : child.replace;
        if (leaf && !isPending(ours) && eb !== "blocked" && sameEntry(ours as Entry | undefined, eb)) {
          plan.unchanged.push(p.join("/"));
          continue;
        }
        if (theyChanged || parentGone) {
          if (!parentGone && eb === undefined && ours?.kind === "dir" && eh !== "blocked" && eh?.kind === "dir" && sameDirAttrs(ours, eh)) {
            plan.merged.push(p.join("/"));
            await walk(child, p, false);
            continue;
          }
          const same = !isPending(ours) && eh !== "blocked" && leaf && sameEntry(ours as Entry | undefined, eh);
          conflict = !same;
        }
      } else if (child.replace === undefined) {
        conflict = parentGone || (eb !== "blocked" && eb?.kind === "dir" && (eh === "blocked" || eh?.kind !== "dir"));
        // Only removals below a directory they removed too: nothing of ours is left to keep.
        if (conflict && eh === undefined && onlyRemovals(child)) {
          plan.unchanged.push(p.join("/"));
          continue;
        }
      }
      if (conflict) {
        plan.conflicts.push(p.join("/"));
        continue;
      }
      const gone = child.implicit ? false : child.replace === undefined && eb !== "blocked" && eb?.kind === "dir" && (eh === "blocked" || eh?.kind !== "dir");
      await walk(child, p, gone);
    }
  };
  await walk(overlay.root, [], false);
  return plan;
}
