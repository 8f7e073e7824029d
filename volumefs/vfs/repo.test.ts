import { describe, expect, it } from "vitest";
import { SqliteMetadataStore, type VersionRecord } from "../../metadata/index.js";
import { MemoryObjectStore, withFaults, transientError, type ObjectStore } from "../object/index.js";
import { VolumeError } from "../errors.js";
import { Repository } from "./repo.js";
import { fsck, rebuildMetadata } from "./fsck.js";
import { splitWritablePath as w } from "./paths.js";
import { encodeTree } from "./tree.js";
import type { Overlay } from "./overlay.js";

function makeRepo(objects: ObjectStore = new MemoryObjectStore()): Repository {
  return new Repository({ meta: SqliteMetadataStore.open({ path: ":memory:" }), objects });
}

async function put(o: Overlay, path: string, text: string): Promise<void> {
  const data = Buffer.from(text);
  const segs = w(path);
  await o.put(segs, { kind: "file", name: segs.at(-1)!, mode: 0o644, mtime: 1000, size: data.length, pending: { kind: "bytes", data } });
}

/** A repository whose volume "v" has one version (what `fill` puts), and our staged change over it. */
async function ourSide(fill: (o: Overlay) => Promise<void>): Promise<{ repo: Repository; base: VersionRecord | null; mine: Overlay }> {
  const repo = makeRepo();
  await repo.createVolume("v");
  await commit(repo, "v", fill);
  const base = await repo.resolve("v");
  return { repo, base, mine: repo.stage(base) };
}

async function commit(repo: Repository, vol: string, fn: (o: Overlay) => Promise<void>, opts = {}) {
  const base = await repo.resolve(vol);
  const o = repo.stage(base);
  await fn(o);
  return repo.sync(vol, base, o, opts);
}

async function text(repo: Repository, vol: string, path: string, at?: string): Promise<string> {
  return Buffer.from(await repo.snapshot(await repo.resolve(vol, at)).readFile(path)).toString();
}

describe("Repository", () => {
  it("commits a batch as one version and reads it back", async () => {
    const repo = makeRepo();
    await repo.createVolume("v");
    const r = await commit(repo, "v", async (o) => {
      await put(o, "a/b/c.txt", "hello");
      await put(o, "top.txt", "top");
      await o.mkdir(w("empty"));
    });
    expect(r.changed).toBe(true);
    expect(r.version!.files).toBe(2);
    expect(r.version!.bytes).toBe(8);
    expect(await text(repo, "v", "a/b/c.txt")).toBe("hello");
    const snap = repo.snapshot(r.version);
    expect((await snap.readdir("")).map((e) => e.name)).toEqual(["a", "empty", "top.txt"]);
    expect((await repo.volume("v")).head).toBe(r.version!.id);
  });

  it("makes no version when nothing changed", async () => {
    const repo = makeRepo();
    await repo.createVolume("v");
    const r1 = await commit(repo, "v", (o) => put(o, "x", "1"));
    const r2 = await commit(repo, "v", (o) => put(o, "x", "1").then(() => o.setAttr(w("x"), { mtime: 1000 })));
    expect(r2.changed).toBe(false);
    expect(r2.version!.id).toBe(r1.version!.id);
  });

  it("renames directories, removes, symlinks, chmods", async () => {
    const repo = makeRepo();
    await repo.createVolume("v");
    await commit(repo, "v", async (o) => {
      for (let i = 0; i < 50; i++) await put(o, `src/f${i}.txt`, `file ${i}`);
      await put(o, "keep.txt", "k");
    });
    const r = await commit(repo, "v", async (o) => {
      await o.rename(w("src"), w("dst/moved"));
      await put(o, "dst/moved/new.txt", "new");
      await o.remove(w("keep.txt"));
      await o.put(w("link"), { kind: "symlink", name: "link", mode: 0o777, mtime: 1, target: "../../etc" });
      await o.setAttr(w("dst/moved/f1.txt"), { mode: 0o600 });
    });
    const snap = repo.snapshot(r.version);
    expect(await snap.lookup("src")).toBeUndefined();
    expect(await snap.lookup("keep.txt")).toBeUndefined();
    expect(Buffer.from(await snap.readFile("dst/moved/f7.txt")).toString()).toBe("file 7");
    expect(Buffer.from(await snap.readFile("dst/moved/new.txt")).toString()).toBe("new");
    expect((await snap.stat("dst/moved/f1.txt")).mode).toBe(0o600);
    expect(await snap.stat("link")).toMatchObject({ kind: "symlink", target: "../../etc" });
    expect(r.version!.files).toBe(52);
  });

  it("refuses what POSIX refuses", async () => {
    const repo = makeRepo();
    await repo.createVolume("v");
    await commit(repo, "v", async (o) => {
      await put(o, "file", "x");
      await put(o, "dir/a", "a");
    });
    const o = repo.stage(await repo.resolve("v"));
    await expect(put(o, "file/child", "x")).rejects.toMatchObject({ code: "NOT_A_DIRECTORY" });
    await expect(o.remove(w("dir"))).rejects.toMatchObject({ code: "NOT_EMPTY" });
    await expect(o.remove(w("nope"))).rejects.toMatchObject({ code: "NOT_FOUND" });
    await expect(o.rename(w("dir"), w("dir/sub"))).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
    await expect(put(o, "dir", "x")).rejects.toMatchObject({ code: "IS_A_DIRECTORY" });
    expect(() => w("../escape")).toThrow(VolumeError);
    expect(() => w(".strata/x")).toThrow(/reserved/);
  });

  it("resolves a version id only among the volume's own versions (a fork's include its source's before the fork)", async () => {
    const repo = makeRepo();
    await repo.createVolume("a");
    await repo.createVolume("b");
    const a1 = (await commit(repo, "a", (o) => put(o, "x", "a1"))).version!.id;
    const b1 = (await commit(repo, "b", (o) => put(o, "y", "b1"))).version!.id;
    await expect(repo.resolve("b", a1)).rejects.toMatchObject({ code: "UNKNOWN_VERSION", message: expect.stringMatching(/of volume "b"/) });
    await expect(repo.resolve("b", a1.slice(0, 12))).rejects.toMatchObject({ code: "UNKNOWN_VERSION" });
    await expect(repo.revert("b", a1)).rejects.toMatchObject({ code: "UNKNOWN_VERSION" });
    expect((await repo.resolve("b"))!.id).toBe(b1);
    await repo.fork("a", "f");
    await commit(repo, "f", (o) => put(o, "x", "f1"));
    expect((await repo.resolve("f", a1))!.id).toBe(a1);
    expect((await repo.resolve("f", a1.slice(0, 8).toUpperCase()))!.id).toBe(a1);
    await expect(repo.resolve("f", a1.slice(0, 3))).rejects.toMatchObject({ code: "INVALID_ARGUMENT", hint: expect.stringMatching(/at least 4/) });
  });

  it("forks in constant time and keeps forks isolated", async () => {
    const repo = makeRepo();
    await repo.createVolume("base");
    const r = await commit(repo, "base", (o) => put(o, "shared.txt", "shared"));
    const f = await repo.fork("base", "fork");
    expect(f.head).toBe(r.version!.id);
    expect(f.forkedFrom).toEqual({ volume: "base", version: r.version!.id });
    await commit(repo, "fork", (o) => put(o, "shared.txt", "changed in fork"));
    expect(await text(repo, "base", "shared.txt")).toBe("shared");
    expect(await text(repo, "fork", "shared.txt")).toBe("changed in fork");
    await expect(repo.fork("base", "fork")).rejects.toMatchObject({ code: "ALREADY_EXISTS" });
    await expect(repo.fork("nope", "x")).rejects.toMatchObject({ code: "UNKNOWN_VOLUME" });
  });

  it("stores identical content once across versions and forks", async () => {
    const objects = new MemoryObjectStore();
    const repo = makeRepo(objects);
    await repo.createVolume("a");
    const big = Buffer.alloc(1 << 20);
    for (let i = 0; i < big.length; i++) big[i] = (i * 2654435761) >>> 24;
    const r1 = await commit(repo, "a", async (o) => {
      const segs = w("big.bin");
      await o.put(segs, { kind: "file", name: "big.bin", mode: 0o644, mtime: 1, size: big.length, pending: { kind: "bytes", data: big } });
    });
    expect(r1.stats.newBytes).toBeGreaterThanOrEqual(big.length);
    await repo.fork("a", "b");
    const r2 = await commit(repo, "b", async (o) => {
      const segs = w("copy.bin");
      await o.put(segs, { kind: "file", name: "copy.bin", mode: 0o644, mtime: 1, size: big.length, pending: { kind: "bytes", data: big } });
    });
    expect(r2.stats.newBytes).toBeLessThan(4096);
    expect(r2.stats.dedupedBytes).toBeGreaterThanOrEqual(big.length);
  });

  it("keeps large files' chunk lists apart, so editing one file does not rewrite its siblings' lists", async () => {
    const objects = new MemoryObjectStore();
    const repo = makeRepo(objects);
    await repo.createVolume("v");
    // Fixed pseudo-random bytes (AES-CTR of zeros): random bytes made the cuts around the edit, and so
    // the new bytes, differ from run to run, now and then past the bound below.
    const { createCipheriv } = await import("node:crypto");
    const bytes = (seed: number, n: number) => createCipheriv("aes-128-ctr", Buffer.alloc(16, seed), Buffer.alloc(16)).update(Buffer.alloc(n));
    const files = [bytes(1, 3 << 20), bytes(2, 3 << 20), bytes(3, 3 << 20)];
    await commit(repo, "v", async (o) => {
      for (const [i, data] of files.entries()) {
        await o.put(w(`big/f${i}`), { kind: "file", name: `f${i}`, mode: 0o644, mtime: 1, size: data.length, pending: { kind: "bytes", data } });
      }
    });
    const edited = Buffer.from(files[0]!);
    bytes(4, 1000).copy(edited, 1 << 20);
    const r = await commit(repo, "v", (o) => o.put(w("big/f0"), { kind: "file", name: "f0", mode: 0o644, mtime: 2, size: edited.length, pending: { kind: "bytes", data: edited } }));
    // One or two new chunks, f0's new list, and the trees on the path: far less than a sibling's list again.
    expect(r.stats.newBytes).toBeLessThan(400 * 1024);
    const snap = repo.snapshot(r.version);
    const tree = await snap.tree((await snap.stat("big")).kind === "dir" ? ((await snap.stat("big")) as { tree: string }).tree : "");
    expect(tree.entries.every((e) => e.kind === "file" && e.chunks.length > 16 && e.list === undefined)).toBe(true);
    // Inline, three lists of ~45 chunks would make this directory ~10 KB; apart, it names three ids.
    expect(encodeTree(tree.entries).data.length).toBeLessThan(600);
    expect(encodeTree(tree.entries).lists).toHaveLength(3);
    expect(Buffer.compare(Buffer.from(await snap.readFile("big/f0")), edited)).toBe(0);
    expect(Buffer.compare(Buffer.from(await snap.readFile("big/f2")), files[2]!)).toBe(0);
    expect((await fsck(repo)).problems).toEqual([]);
    const meta2 = SqliteMetadataStore.open({ path: ":memory:" });
    await rebuildMetadata(meta2, objects);
    const again = new Repository({ meta: meta2, objects });
    expect(Buffer.compare(Buffer.from(await again.snapshot(await again.resolve("v")).readFile("big/f1")), files[1]!)).toBe(0);
  });

  it("rebases onto a moved head when paths do not collide", async () => {
    const { repo, base, mine } = await ourSide((o) => put(o, "base.txt", "base"));
    await put(mine, "out/mine.txt", "mine");
    await commit(repo, "v", (o) => put(o, "out/theirs.txt", "theirs"));
    const r = await repo.sync("v", base, mine);
    expect(r.rebased).toBe(true);
    expect(r.conflicts).toEqual([]);
    expect(await text(repo, "v", "out/mine.txt")).toBe("mine");
    expect(await text(repo, "v", "out/theirs.txt")).toBe("theirs");
    expect(await text(repo, "v", "base.txt")).toBe("base");
  });

  it("settles a path changed on both sides by policy", async () => {
    for (const policy of ["fail", "ours", "theirs"] as const) {
      const { repo, base, mine } = await ourSide((o) => put(o, "f.txt", "base"));
      await put(mine, "f.txt", "mine");
      await put(mine, "other.txt", "other");
      await commit(repo, "v", (o) => put(o, "f.txt", "theirs"));
      const headBefore = (await repo.volume("v")).head;
      if (policy === "fail") {
        const err = await repo.sync("v", base, mine, { onConflict: policy }).catch((e) => e);
        expect(err).toBeInstanceOf(VolumeError);
        expect(err.code).toBe("CONFLICT");
        expect((err.details as { paths: string[] }).paths).toEqual(["f.txt"]);
        expect((await repo.volume("v")).head).toBe(headBefore);
        continue;
      }
      const r = await repo.sync("v", base, mine, { onConflict: policy });
      expect(r.conflicts).toEqual(["f.txt"]);
      expect(await text(repo, "v", "f.txt")).toBe(policy === "ours" ? "mine" : "theirs");
      expect(await text(repo, "v", "other.txt")).toBe("other");
    }
  });

  it("merges a directory both sides made: only the names both made in it are conflicts", async () => {
    for (const policy of ["fail", "ours", "theirs"] as const) {
      const { repo, base, mine } = await ourSide((o) => put(o, "base.txt", "base"));
      await mine.mkdir(w("results"));
      await put(mine, "results/mine.txt", "mine");
      await put(mine, "results/both.txt", policy === "fail" ? "same" : "mine");
      await commit(repo, "v", async (o) => {
        await o.mkdir(w("results"));
        await put(o, "results/theirs.txt", "theirs");
        await put(o, "results/both.txt", policy === "fail" ? "same" : "theirs");
      });
      // Same bytes on both sides under "fail": nothing collides.
      const r = await repo.sync("v", base, mine, { onConflict: policy });
      expect(r.conflicts).toEqual(policy === "fail" ? [] : ["results/both.txt"]);
      expect(await text(repo, "v", "results/mine.txt")).toBe("mine");
      expect(await text(repo, "v", "results/theirs.txt")).toBe("theirs");
      expect(await text(repo, "v", "results/both.txt")).toBe({ fail: "same", ours: "mine", theirs: "theirs" }[policy]);
    }
    // A directory made with other attributes than theirs is one conflict, settled whole.
    const repo = makeRepo();
    await repo.createVolume("v");
    const mine = repo.stage(null);
    await mine.mkdir(w("results"), 0o700);
    await put(mine, "results/mine.txt", "mine");
    await commit(repo, "v", (o) => o.mkdir(w("results"), 0o755));
    await expect(repo.sync("v", null, mine)).rejects.toMatchObject({ code: "CONFLICT", details: { paths: ["results"] } });
  });

  it("takes their change of a path staged without a change (a hard link's source)", async () => {
    for (const policy of ["fail", "ours"] as const) {
      const { repo, base, mine } = await ourSide((o) => put(o, "src.txt", "old"));
      await put(mine, "src.txt", "old"); // what base has, to the byte and attribute
      await put(mine, "dst.txt", "old");
      await commit(repo, "v", (o) => put(o, "src.txt", "theirs"));
      const r = await repo.sync("v", base, mine, { onConflict: policy });
      expect(r.conflicts).toEqual([]);
      expect(await text(repo, "v", "src.txt")).toBe("theirs");
      expect(await text(repo, "v", "dst.txt")).toBe("old");
    }
  });

  it("takes a directory both sides removed names of, as removed, and keeps ours a directory where they made a file", async () => {
    for (const policy of ["fail", "ours"] as const) {
      const { repo, base, mine } = await ourSide(async (o) => {
        await put(o, "d/x", "x");
        await put(o, "d/y", "y");
        await put(o, "keep", "k");
      });
      await mine.remove(w("d/x"));
      await commit(repo, "v", (o) => o.remove(w("d"), { recursive: true }));
      const r = await repo.sync("v", base, mine, { onConflict: policy });
      expect(r.conflicts).toEqual([]);
      expect(await repo.snapshot(await repo.resolve("v")).lookup("d")).toBeUndefined();
    }
    const { repo, base, mine } = await ourSide((o) => put(o, "d/x", "x"));
    await put(mine, "d/y", "Y");
    await commit(repo, "v", async (o) => {
      await o.remove(w("d"), { recursive: true });
      await put(o, "d", "a file");
    });
    const r = await repo.sync("v", base, mine, { onConflict: "ours" });
    expect(r.conflicts).toEqual(["d"]);
    const d = await repo.snapshot(await repo.resolve("v")).lookup("d");
    expect(d).toMatchObject({ kind: "dir", mode: 0o755 });
    expect(await text(repo, "v", "d/y")).toBe("Y");
  });

  it("sees a write under a directory removed by the other side as a conflict", async () => {
    const { repo, base, mine } = await ourSide((o) => put(o, "d/a.txt", "a"));
    await put(mine, "d/b.txt", "b");
    await commit(repo, "v", (o) => o.remove(w("d"), { recursive: true }));
    await expect(repo.sync("v", base, mine)).rejects.toMatchObject({ code: "CONFLICT" });
  });

  it("resolves version references", async () => {
    const repo = makeRepo();
    await repo.createVolume("v");
    const r1 = await commit(repo, "v", (o) => put(o, "x", "1"));
    const r2 = await commit(repo, "v", (o) => put(o, "x", "2"));
    expect((await repo.resolve("v"))!.id).toBe(r2.version!.id);
    expect((await repo.resolve("v", "head~1"))!.id).toBe(r1.version!.id);
    expect((await repo.resolve("v", r1.version!.id.slice(0, 10)))!.id).toBe(r1.version!.id);
    await expect(repo.resolve("v", "ffffffffff")).rejects.toMatchObject({ code: "UNKNOWN_VERSION" });
    await expect(repo.resolve("v", "not-a-version")).rejects.toMatchObject({ code: "UNKNOWN_VERSION" });
    await expect(repo.resolve("v", "head~9")).rejects.toMatchObject({ code: "UNKNOWN_VERSION" });
    const log = await repo.log("v");
    expect(log.map((v) => v.id)).toEqual([r2.version!.id, r1.version!.id]);
    const rv = await repo.revert("v", r1.version!.id);
    expect(rv.root).toBe(r1.version!.root);
    expect(rv.parents).toEqual([r2.version!.id]);
    expect(await text(repo, "v", "x")).toBe("1");
    expect(await repo.diff("v", r1.version!.id, r2.version!.id)).toEqual({ added: [], modified: ["x"], removed: [] });
    // Reverting to what the head already has changes nothing, so it makes no version.
    expect((await repo.revert("v", "head")).id).toBe(rv.id);
    expect((await repo.revert("v", r1.version!.id)).id).toBe(rv.id);
    expect((await repo.log("v")).map((v) => v.id)).toEqual([rv.id, r2.version!.id, r1.version!.id]);
  });

  it("leaves the head intact when the store fails at any step of a sync", async () => {
    // Fail the n-th object-store call of a sync, for every n until the sync gets through.
    const inner = new MemoryObjectStore();
    let failAt = 0;
    let calls = 0;
    const faulty = withFaults(inner, (op) => (op === "put" || op === "putFile") && ++calls === failAt ? transientError("injected") : undefined);
    const repo = makeRepo(faulty);
    await repo.createVolume("v");
    const first = await commit(repo, "v", (o) => put(o, "keep.txt", "committed"));
    let succeeded = false;
    for (failAt = 1; failAt < 20 && !succeeded; failAt++) {
      calls = 0;
      const base = await repo.resolve("v");
      const o = repo.stage(base);
      await put(o, "new.txt", "new");
      await put(o, "keep.txt", "overwritten");
      try {
        await repo.sync("v", base, o);
        succeeded = true;
      } catch (err) {
        expect((err as VolumeError).code).toBeDefined();
        const head = await repo.resolve("v");
        // Either the old version, or (a failure after the commit point, writing the ref) the new one whole.
        if (head!.id === first.version!.id) {
          expect(await text(repo, "v", "keep.txt")).toBe("committed");
        } else {
          expect(await text(repo, "v", "keep.txt")).toBe("overwritten");
          expect(await text(repo, "v", "new.txt")).toBe("new");
          succeeded = true;
        }
      }
    }
    expect(succeeded).toBe(true);
    expect(failAt).toBeGreaterThan(2);
    const report = await fsck(repo);
    expect(report.problems).toEqual([]);
  });

  it("rebuilds the metadata from the bucket alone", async () => {
    const objects = new MemoryObjectStore();
    const repo = makeRepo(objects);
    await repo.createVolume("a");
    await commit(repo, "a", async (o) => {
      await put(o, "dir/one.txt", "one");
      await put(o, "two.txt", "two");
    });
    await repo.fork("a", "b");
    const rb = await commit(repo, "b", (o) => put(o, "dir/three.txt", "three"));
    await repo.createVolume("gone");
    await repo.deleteVolume("gone");

    const meta2 = SqliteMetadataStore.open({ path: ":memory:" });
    const report = await rebuildMetadata(meta2, objects);
    expect(report.volumes).toBe(2);
    const repo2 = new Repository({ meta: meta2, objects });
    expect((await repo2.listVolumes()).map((v) => v.name)).toEqual(["a", "b"]);
    expect((await repo2.volume("b")).head).toBe(rb.version!.id);
    expect(await text(repo2, "b", "dir/three.txt")).toBe("three");
    expect(await text(repo2, "a", "dir/one.txt")).toBe("one");
    expect((await repo2.log("b")).length).toBe(2);
    const r = await fsck(repo2);
    expect(r.problems).toEqual([]);
    // Commits continue where the bucket left off.
    await commit(repo2, "b", (o) => put(o, "four.txt", "4"));
    const meta3 = SqliteMetadataStore.open({ path: ":memory:" });
    await rebuildMetadata(meta3, objects);
    expect(await text(new Repository({ meta: meta3, objects }), "b", "four.txt")).toBe("4");
  });

  it("catches a second host committing the same head move through a shared bucket", async () => {
    const objects = new MemoryObjectStore();
    const a = makeRepo(objects);
    await a.createVolume("v");
    await commit(a, "v", (o) => put(o, "x", "0"));
    const metaB = SqliteMetadataStore.open({ path: ":memory:" });
    await rebuildMetadata(metaB, objects);
    const b = new Repository({ meta: metaB, objects });
    await commit(a, "v", (o) => put(o, "x", "from a"));
    await expect(commit(b, "v", (o) => put(o, "x", "from b"))).rejects.toMatchObject({ code: "CONFLICT" });
    const metaC = SqliteMetadataStore.open({ path: ":memory:" });
    await rebuildMetadata(metaC, objects);
    expect(await text(new Repository({ meta: metaC, objects }), "v", "x")).toBe("from a");
  });

  it("fsck finds a corrupted chunk and a missing pack", async () => {
    const objects = new MemoryObjectStore();
    const repo = makeRepo(objects);
    await repo.createVolume("v");
    await commit(repo, "v", (o) => put(o, "f.txt", "some content that will be damaged"));
    expect((await fsck(repo)).problems).toEqual([]);
    const packs: string[] = [];
    for await (const o of objects.list("packs/")) packs.push(o.key);
    const bytes = Buffer.from(await objects.get(packs[0]!));
    bytes[0] = bytes[0]! ^ 0xff;
    await objects.put(packs[0]!, bytes);
    const report = await fsck(repo);
    expect(report.problems.map((p) => p.kind)).toContain("corrupt-chunk");
    const fresh = makeRepo(objects);
    await expect(rebuildMetadata((fresh as unknown as { meta: SqliteMetadataStore }).meta, objects)).resolves.toBeDefined();
    await objects.delete(packs);
    const report2 = await fsck(repo);
    expect(report2.problems.map((p) => p.kind)).toContain("missing-pack");
  });
});
