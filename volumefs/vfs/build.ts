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
      const asDir: DirEntry = e?.kind === "dir" ? e : emptyDir(name, e?.mode ?? 0o755);
      e = await buildDir(onto, asDir, child, emit);
    }
    if (e === undefined) entries.delete(name);
    else entries.set(name, e.name === name ? e : { ...e, name });
  }
  const enc = encodeTree([...entries.values()]);
  emit(enc);
  return { ...dir, tree: enc.id, files: enc.files, bytes: enc.bytes, ...(node.mtime !== undefined ? { mtime: node.mtime } : {}) };
}

/**
 * Paths where the overlay (staged over `base`) collides with what happened between `base` and
 * `head`: a path we changed that they changed to something else, or a path we changed below a
 * directory they removed or replaced. Changing a path to the same result on both sides is not a
 * conflict.
 */
export async function findConflicts(overlay: Overlay, base: Snapshot, head: Snapshot): Promise<string[]> {
  const conflicts: string[] = [];
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
      let conflict = false;
      if (explicit) {
        if (theyChanged || parentGone) {
          const ours = child.replace === null ? undefined : child.replace;
          const same = !isPending(ours) && eh !== "blocked" && (!child.children || child.children.size === 0) && sameEntry(ours as Entry | undefined, eh);
          conflict = !same;
        }
      } else if (child.replace === undefined) {
        conflict = parentGone || (eb !== "blocked" && eb?.kind === "dir" && (eh === "blocked" || eh?.kind !== "dir"));
      }
      if (conflict) {
        conflicts.push(p.join("/"));
        continue;
      }
      const gone = child.implicit ? false : child.replace === undefined && eb !== "blocked" && eb?.kind === "dir" && (eh === "blocked" || eh?.kind !== "dir");
      await walk(child, p, gone);
    }
  };
  await walk(overlay.root, [], false);
  return conflicts;
}
