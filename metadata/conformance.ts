/**
 * The conformance suite of the `MetadataStore` seam: every implementation runs it.
 *
 * ```ts
 * describeMetadataStore("sqlite :memory:", async () => {
 *   const store = SqliteMetadataStore.open({ path: ":memory:" });
 *   return { store, cleanup: () => store.close() };
 * });
 * ```
 */
import { createHash } from "node:crypto";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { MetadataError } from "./errors.js";
import type { ChunkLocation, MetadataStore, VersionRecord } from "./types.js";

/** A store under test and how to dispose of it (close it and remove its files). */
export interface MetadataStoreFixture {
  store: MetadataStore;
  cleanup(): Promise<void>;
}

/** A 64-character lowercase hex id derived from `seed`, like a blake3 digest. */
export function testId(seed: string): string {
  return createHash("sha256").update(seed).digest("hex");
}

function version(seed: string, parents: string[] = [], extra: Partial<VersionRecord> = {}): VersionRecord {
  return {
    id: testId(`version ${seed}`),
    root: testId(`root ${seed}`),
    parents,
    time: 1_700_000_000_000,
    message: `version ${seed}`,
    labels: { run: seed, host: "h1" },
    files: 3,
    bytes: 1234,
    ...extra,
  };
}

async function rejection(p: Promise<unknown>): Promise<MetadataError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(MetadataError);
  return err as MetadataError;
}

const vol = (name: string, env = "main") => ({ env, name, head: null, forkedFrom: null, createdAt: 1000 });

/**
 * Registers a vitest suite named `name` that checks every method and contract of
 * `MetadataStore` on a fresh store from `make` per test; `cleanup` runs after each test.
 */
export function describeMetadataStore(name: string, make: () => Promise<MetadataStoreFixture>): void {
  describe(`MetadataStore conformance: ${name}`, () => {
    let fx: MetadataStoreFixture;
    let store: MetadataStore;
    beforeEach(async () => {
      fx = await make();
      store = fx.store;
    });
    afterEach(async () => {
      await fx.cleanup();
    });

    describe("volumes", () => {
      it("creates a volume with seq 0 and reads it back", async () => {
        const created = await store.createVolume(vol("data"));
        expect(created).toEqual({ env: "main", name: "data", head: null, forkedFrom: null, createdAt: 1000, seq: 0 });
        expect(await store.getVolume("main", "data")).toEqual(created);
      });

      it("keeps a fork's origin and head", async () => {
        const v = version("base");
        await store.putVersion(v);
        const fork = await store.createVolume({
          env: "main",
          name: "attempt-1",
          head: v.id,
          forkedFrom: { volume: "data", version: v.id },
          createdAt: 2000,
        });
        expect(fork.head).toBe(v.id);
        expect(fork.seq).toBe(0);
        expect((await store.getVolume("main", "attempt-1"))?.forkedFrom).toEqual({ volume: "data", version: v.id });
        const noVersion = await store.createVolume({ ...vol("empty-fork"), forkedFrom: { volume: "x", version: null } });
        expect(noVersion.forkedFrom).toEqual({ volume: "x", version: null });
      });

      it("throws ALREADY_EXISTS for a taken name and leaves the volume as it was", async () => {
        await store.createVolume(vol("data"));
        await store.casHead("main", "data", null, testId("h1"));
        const err = await rejection(store.createVolume({ ...vol("data"), createdAt: 5 }));
        expect(err.code).toBe("ALREADY_EXISTS");
        const after = await store.getVolume("main", "data");
        expect(after?.head).toBe(testId("h1"));
        expect(after?.createdAt).toBe(1000);
      });

      it("scopes names to their environment", async () => {
        await store.createVolume(vol("data", "a"));
        await store.createVolume(vol("data", "b"));
        await store.casHead("a", "data", null, testId("x"));
        expect((await store.getVolume("b", "data"))?.head).toBeNull();
        expect(await store.getVolume("c", "data")).toBeUndefined();
      });

      it("returns undefined for an unknown volume", async () => {
        expect(await store.getVolume("main", "nope")).toBeUndefined();
      });

      it("lists the volumes of one environment sorted by name", async () => {
        for (const n of ["zeta", "alpha", "mid"]) await store.createVolume(vol(n));
        await store.createVolume(vol("other", "elsewhere"));
        expect((await store.listVolumes("main")).map((v) => v.name)).toEqual(["alpha", "mid", "zeta"]);
        expect((await store.listVolumes("elsewhere")).map((v) => v.name)).toEqual(["other"]);
        expect(await store.listVolumes("empty")).toEqual([]);
      });

      it("deletes idempotently and keeps the versions", async () => {
        await store.createVolume(vol("data"));
        const v = version("kept");
        const res = await store.commit({ env: "main", volume: "data", expectedHead: null, version: v, trees: [] });
        expect(res.ok).toBe(true);
        expect(await store.deleteVolume("main", "data")).toBe(true);
        expect(await store.deleteVolume("main", "data")).toBe(false);
        expect(await store.getVolume("main", "data")).toBeUndefined();
        expect(await store.getVersion(v.id)).toEqual(v);
        const again = await store.createVolume(vol("data"));
        expect(again.seq).toBe(0);
        expect(again.head).toBeNull();
      });
    });

    describe("casHead", () => {
      it("moves the head and increments seq on every move", async () => {
        await store.createVolume(vol("data"));
        let head: string | null = null;
        for (let i = 1; i <= 5; i++) {
          const next = testId(`head ${i}`);
          const res = await store.casHead("main", "data", head, next);
          expect(res.ok).toBe(true);
          if (res.ok) {
            expect(res.volume.head).toBe(next);
            expect(res.volume.seq).toBe(i);
          }
          head = next;
        }
        expect((await store.getVolume("main", "data"))?.seq).toBe(5);
      });

      it("refuses a stale expected head, reports the current one and changes nothing", async () => {
        await store.createVolume(vol("data"));
        const a = testId("a");
        await store.casHead("main", "data", null, a);
        expect(await store.casHead("main", "data", null, testId("b"))).toEqual({ ok: false, head: a });
        expect(await store.casHead("main", "data", testId("other"), testId("b"))).toEqual({ ok: false, head: a });
        const now = await store.getVolume("main", "data");
        expect(now?.head).toBe(a);
        expect(now?.seq).toBe(1);
      });

      it("lets exactly one of many concurrent moves from the same head win", async () => {
        await store.createVolume(vol("data"));
        const results = await Promise.all(
          Array.from({ length: 10 }, (_, i) => store.casHead("main", "data", null, testId(`racer ${i}`))),
        );
        expect(results.filter((r) => r.ok)).toHaveLength(1);
        expect((await store.getVolume("main", "data"))?.seq).toBe(1);
      });

      it("throws NOT_FOUND for an unknown volume", async () => {
        const err = await rejection(store.casHead("main", "ghost", null, testId("x")));
        expect(err.code).toBe("NOT_FOUND");
      });
    });

    describe("commit", () => {
      it("writes trees, version and head move together", async () => {
        await store.createVolume(vol("data"));
        const v1 = version("one");
        const trees = [
          { id: testId("tree a"), data: new Uint8Array([1, 2, 3]) },
          { id: testId("tree b"), data: new Uint8Array([4, 5]) },
        ];
        const r1 = await store.commit({ env: "main", volume: "data", expectedHead: null, version: v1, trees });
        expect(r1.ok).toBe(true);
        if (r1.ok) expect(r1.volume).toMatchObject({ head: v1.id, seq: 1 });
        expect(await store.getVersion(v1.id)).toEqual(v1);
        expect(Array.from((await store.getTree(trees[0]!.id)) ?? [])).toEqual([1, 2, 3]);
        expect(Array.from((await store.getTree(trees[1]!.id)) ?? [])).toEqual([4, 5]);

        const v2 = version("two", [v1.id]);
        const r2 = await store.commit({
          env: "main",
          volume: "data",
          expectedHead: v1.id,
          version: v2,
          trees: [trees[0]!, { id: testId("tree c"), data: new Uint8Array([6]) }],
        });
        expect(r2.ok).toBe(true);
        if (r2.ok) expect(r2.volume).toMatchObject({ head: v2.id, seq: 2 });
        expect((await store.getVersion(v2.id))?.parents).toEqual([v1.id]);
      });

      it("writes nothing at all when the expected head is stale", async () => {
        await store.createVolume(vol("data"));
        const v1 = version("one");
        await store.commit({ env: "main", volume: "data", expectedHead: null, version: v1, trees: [] });
        const stale = version("stale");
        const tree = { id: testId("stale tree"), data: new Uint8Array([9, 9]) };
        const res = await store.commit({ env: "main", volume: "data", expectedHead: null, version: stale, trees: [tree] });
        expect(res).toEqual({ ok: false, head: v1.id });
        expect(await store.getVersion(stale.id)).toBeUndefined();
        expect(await store.getTree(tree.id)).toBeUndefined();
        expect(await store.findVersions(stale.id.slice(0, 12))).toEqual([]);
        expect((await store.getVolume("main", "data"))?.seq).toBe(1);
      });

      it("throws NOT_FOUND for an unknown volume and writes nothing", async () => {
        const v = version("orphan");
        const tree = { id: testId("orphan tree"), data: new Uint8Array([1]) };
        const err = await rejection(
          store.commit({ env: "main", volume: "ghost", expectedHead: null, version: v, trees: [tree] }),
        );
        expect(err.code).toBe("NOT_FOUND");
        expect(await store.getVersion(v.id)).toBeUndefined();
        expect(await store.getTree(tree.id)).toBeUndefined();
      });

      it("keeps both parents of a merge in order", async () => {
        await store.createVolume(vol("data"));
        const a = version("a");
        const b = version("b");
        await store.putVersion(a);
        await store.putVersion(b);
        await store.casHead("main", "data", null, a.id);
        const merge = version("merge", [b.id, a.id]);
        const res = await store.commit({ env: "main", volume: "data", expectedHead: a.id, version: merge, trees: [] });
        expect(res.ok).toBe(true);
        expect((await store.getVersion(merge.id))?.parents).toEqual([b.id, a.id]);
        const listed = (await store.listVersions()).find((v) => v.id === merge.id);
        expect(listed?.parents).toEqual([b.id, a.id]);
      });
    });

    describe("versions", () => {
      it("round-trips every field and is idempotent", async () => {
        const v = version("x", [testId("p")], { labels: { sandbox: "sb-1", "run id": "r 7" }, files: 0, bytes: 0, message: "" });
        await store.putVersion(v);
        await store.putVersion(v);
        await store.putVersion({ ...v, message: "a second put of the same id changes nothing" });
        expect(await store.getVersion(v.id)).toEqual(v);
        expect(await store.listVersions()).toEqual([v]);
      });

      it("returns undefined for an unknown version", async () => {
        expect(await store.getVersion(testId("none"))).toBeUndefined();
      });

      it("lists every version sorted by id", async () => {
        const vs = ["1", "2", "3", "4"].map((s, i) => version(s, i === 0 ? [] : [testId(`version ${i}`)]));
        for (const v of vs) await store.putVersion(v);
        const listed = await store.listVersions();
        expect(listed.map((v) => v.id)).toEqual(vs.map((v) => v.id).sort());
        for (const v of vs) expect(listed.find((l) => l.id === v.id)).toEqual(v);
      });

      it("finds versions by id prefix, sorted, with a default limit of 10", async () => {
        const ids = ["ab00", "ab01", "ab02", "abff", "ac00", "aa99", "b000"].map((p) => p + "0".repeat(60));
        for (const id of ids) await store.putVersion({ ...version(id), id });
        expect(await store.findVersions("ab")).toEqual([ids[0], ids[1], ids[2], ids[3]]);
        expect(await store.findVersions("ab", 2)).toEqual([ids[0], ids[1]]);
        expect(await store.findVersions("ac00")).toEqual([ids[4]]);
        expect(await store.findVersions(ids[6]!)).toEqual([ids[6]]);
        expect(await store.findVersions("c")).toEqual([]);
        expect(await store.findVersions("abf")).toEqual([ids[3]]);

        for (let i = 0; i < 15; i++) await store.putVersion(version(`many ${i}`));
        expect(await store.findVersions("")).toHaveLength(10);
        expect(await store.findVersions("", 100)).toHaveLength(22);
      });
    });

    describe("trees", () => {
      it("stores trees idempotently and returns their bytes", async () => {
        const t = { id: testId("t"), data: new Uint8Array(Array.from({ length: 300 }, (_, i) => i & 0xff)) };
        await store.putTrees([t]);
        await store.putTrees([t, { id: testId("u"), data: new Uint8Array(0) }]);
        await store.putTrees([{ id: t.id, data: new Uint8Array([7]) }]);
        await store.putTrees([]);
        const got = await store.getTree(t.id);
        expect(got).toBeInstanceOf(Uint8Array);
        expect(Array.from(got!)).toEqual(Array.from(t.data));
        expect((await store.getTree(testId("u")))?.length).toBe(0);
        expect(await store.getTree(testId("none"))).toBeUndefined();
      });

      it("accepts a view into a larger buffer", async () => {
        const big = new Uint8Array([0, 1, 2, 3, 4, 5, 6, 7]);
        await store.putTrees([{ id: testId("view"), data: big.subarray(2, 5) }]);
        expect(Array.from((await store.getTree(testId("view")))!)).toEqual([2, 3, 4]);
      });
    });

    describe("packs and chunks", () => {
      const locations = (pack: string, n: number, from = 0): ChunkLocation[] =>
        Array.from({ length: n }, (_, i) => ({ id: testId(`chunk ${from + i}`), pack, offset: i * 100, length: 100 }));

      it("records a pack and finds 2,000 chunks in one call", async () => {
        const p1 = testId("pack 1");
        const p2 = testId("pack 2");
        const c1 = locations(p1, 1200);
        const c2 = locations(p2, 800, 1200);
        await store.putPack({ id: p1, size: 120_000, createdAt: 1 }, c1);
        await store.putPack({ id: p2, size: 80_000, createdAt: 2 }, c2);
        const all = [...c1, ...c2];
        const unknown = Array.from({ length: 50 }, (_, i) => testId(`unknown ${i}`));
        const got = await store.getChunks([...all.map((c) => c.id), ...unknown, all[0]!.id]);
        expect(got.size).toBe(2000);
        for (const c of all) expect(got.get(c.id)).toEqual(c);
        for (const u of unknown) expect(got.has(u)).toBe(false);
      });

      it("returns an empty map for no ids or only unknown ids", async () => {
        expect((await store.getChunks([])).size).toBe(0);
        expect((await store.getChunks([testId("nope")])).size).toBe(0);
      });

      it("is idempotent and keeps a chunk's first location", async () => {
        const p1 = testId("pack 1");
        const p2 = testId("pack 2");
        const c = locations(p1, 3);
        await store.putPack({ id: p1, size: 300, createdAt: 1 }, c);
        await store.putPack({ id: p1, size: 300, createdAt: 1 }, c);
        await store.putPack({ id: p2, size: 50, createdAt: 2 }, [{ ...c[0]!, pack: p2, offset: 0, length: 50 }]);
        expect((await store.getChunks([c[0]!.id])).get(c[0]!.id)).toEqual(c[0]);
        expect(await store.listPacks()).toEqual(
          [
            { id: p1, size: 300, createdAt: 1 },
            { id: p2, size: 50, createdAt: 2 },
          ].sort((a, b) => (a.id < b.id ? -1 : 1)),
        );
      });

      it("accepts a pack with no chunks", async () => {
        await store.putPack({ id: testId("empty pack"), size: 0, createdAt: 3 }, []);
        expect(await store.listPacks()).toEqual([{ id: testId("empty pack"), size: 0, createdAt: 3 }]);
      });
    });

    describe("close", () => {
      it("is idempotent, and calls after it reject with a MetadataError", async () => {
        await store.createVolume(vol("data"));
        await store.close();
        await store.close();
        await rejection(store.getVolume("main", "data"));
        await rejection(store.casHead("main", "data", null, testId("x")));
      });
    });
  });
}
