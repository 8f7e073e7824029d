import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { StrataError } from "../../metadata/index.js";
import type { ObjectInfo, ObjectStore } from "./types.js";

/** What a conformance factory returns: a fresh, empty store and how to dispose of it. */
export interface ObjectStoreFixture {
  store: ObjectStore;
  cleanup(): Promise<void>;
}

/** Options of `describeObjectStore`. */
export interface ConformanceOptions {
  /** Size of the "large" putFile case, in bytes; default 40 MiB (above the S3 multipart threshold). */
  largeFileBytes?: number;
}

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    if (err instanceof StrataError) return err.code;
    throw err;
  }
}

async function collect(it: AsyncIterable<ObjectInfo>): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const x of it) out.push(x);
  return out;
}

async function parallel<T>(items: readonly T[], n: number, fn: (x: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

const utf8Order = (a: string, b: string) => Buffer.compare(Buffer.from(a), Buffer.from(b));

/**
 * The vitest suite every `ObjectStore` implementation must pass. `make` returns a fresh empty
 * store; it is called once for the whole suite (cases use distinct key prefixes).
 */
export function describeObjectStore(name: string, make: () => Promise<ObjectStoreFixture>, opts: ConformanceOptions = {}): void {
  const largeBytes = opts.largeFileBytes ?? 40 * 2 ** 20;
  describe(`ObjectStore conformance: ${name}`, () => {
    let fx: ObjectStoreFixture;
    let s: ObjectStore;
    let dir: string;
    beforeAll(async () => {
      fx = await make();
      s = fx.store;
      dir = await mkdtemp(join(tmpdir(), "strata-conf-"));
    });
    afterAll(async () => {
      await fx?.cleanup();
      if (dir !== undefined) await rm(dir, { recursive: true, force: true });
    });

    it("round-trips bytes, overwrites, and stores empty objects", async () => {
      const a = randomBytes(1000);
      await s.put("rt/a", a);
      expect(Buffer.from(await s.get("rt/a")).equals(a)).toBe(true);
      const b = randomBytes(10);
      await s.put("rt/a", b);
      expect(Buffer.from(await s.get("rt/a")).equals(b)).toBe(true);
      await s.put("rt/empty", new Uint8Array(0));
      expect((await s.get("rt/empty")).byteLength).toBe(0);
      expect(await s.head("rt/empty")).toEqual({ size: 0 });
      expect(typeof s.url).toBe("string");
    });

    it("reads ranges, clipped at the end of the object", async () => {
      const data = randomBytes(4096);
      await s.put("range/x", data);
      expect(Buffer.from(await s.get("range/x", { offset: 0, length: 10 })).equals(data.subarray(0, 10))).toBe(true);
      expect(Buffer.from(await s.get("range/x", { offset: 100, length: 1000 })).equals(data.subarray(100, 1100))).toBe(true);
      expect(Buffer.from(await s.get("range/x", { offset: 4000, length: 1000 })).equals(data.subarray(4000))).toBe(true);
      expect((await s.get("range/x", { offset: 4096, length: 10 })).byteLength).toBe(0);
      expect((await s.get("range/x", { offset: 9999, length: 10 })).byteLength).toBe(0);
      expect((await s.get("range/x", { offset: 5, length: 0 })).byteLength).toBe(0);
    });

    it("heads sizes and reports missing objects", async () => {
      await s.put("head/x", randomBytes(123));
      expect(await s.head("head/x")).toEqual({ size: 123 });
      expect(await s.head("head/missing")).toBeUndefined();
      expect(await codeOf(s.get("head/missing"))).toBe("NOT_FOUND");
      expect(await codeOf(s.get("head/missing", { offset: 0, length: 5 }))).toBe("NOT_FOUND");
    });

    it("lists a prefix in ascending key order across more than 1000 keys", async () => {
      const keys: string[] = [];
      for (let i = 0; i < 1105; i++) keys.push(`list/p/${(i * 7919) % 1105}`.padEnd(12, "x"));
      keys.push("list/p-dash", "list/p/sub/deep", "list/pz");
      await parallel(keys, 16, (k) => s.put(k, new Uint8Array([1, 2, 3])));
      await s.put("lisu", new Uint8Array(1));
      const got = await collect(s.list("list/p/"));
      const want = keys.filter((k) => k.startsWith("list/p/")).sort(utf8Order);
      expect(got.map((o) => o.key)).toEqual(want);
      expect(got.every((o) => o.size === 3)).toBe(true);
      const all = (await collect(s.list("list/"))).map((o) => o.key);
      expect(all).toEqual([...keys].sort(utf8Order));
      expect((await collect(s.list("list/p"))).length).toBe(keys.length);
      expect((await collect(s.list("list/p-"))).map((o) => o.key)).toEqual(["list/p-dash"]);
      expect(await collect(s.list("list/nothing-here/"))).toEqual([]);
    });

    it("deletes many keys and ignores missing ones", async () => {
      const keys = Array.from({ length: 1203 }, (_, i) => `del/${i}`);
      await parallel(keys, 16, (k) => s.put(k, new Uint8Array(1)));
      await s.put("del-keep", new Uint8Array(1));
      await s.delete([...keys, "del/missing-1", "del/missing-2"]);
      expect(await collect(s.list("del/"))).toEqual([]);
      expect(await s.head("del-keep")).toEqual({ size: 1 });
      await s.delete(["del/missing-3"]);
      await s.delete([]);
      expect(await codeOf(s.get("del/5"))).toBe("NOT_FOUND");
    });

    it("create-only put fails once the key exists", async () => {
      await s.put("cond/a", new Uint8Array([1]), { ifNoneMatch: "*" });
      expect(await codeOf(s.put("cond/a", new Uint8Array([2]), { ifNoneMatch: "*" }))).toBe("PRECONDITION_FAILED");
      expect([...(await s.get("cond/a"))]).toEqual([1]);
      await s.put("cond/a", new Uint8Array([3]));
      expect([...(await s.get("cond/a"))]).toEqual([3]);
    });

    it("exactly one of many concurrent create-only puts wins", async () => {
      const n = 16;
      const results = await Promise.allSettled(
        Array.from({ length: n }, (_, i) => s.put("cond/race", new Uint8Array([i, i, i]), { ifNoneMatch: "*" })),
      );
      const won = results.map((r, i) => (r.status === "fulfilled" ? i : -1)).filter((i) => i >= 0);
      expect(won.length).toBe(1);
      for (const r of results) {
        if (r.status === "rejected") expect((r.reason as StrataError).code).toBe("PRECONDITION_FAILED");
      }
      expect([...(await s.get("cond/race"))]).toEqual([won[0], won[0], won[0]]);
    });

    it("puts small and large files byte-exact", async () => {
      const small = randomBytes(100_000);
      await writeFile(join(dir, "small"), small);
      await s.putFile("file/small", join(dir, "small"));
      expect(Buffer.from(await s.get("file/small")).equals(small)).toBe(true);
      const large = randomBytes(largeBytes + 12345);
      await writeFile(join(dir, "large"), large);
      await s.putFile("file/large", join(dir, "large"));
      expect(await s.head("file/large")).toEqual({ size: large.length });
      expect(Buffer.from(await s.get("file/large")).equals(large)).toBe(true);
      const mid = 9 * 2 ** 20 - 17;
      expect(Buffer.from(await s.get("file/large", { offset: mid, length: 100 })).equals(large.subarray(mid, mid + 100))).toBe(true);
      expect(await codeOf(s.putFile("file/large", join(dir, "large"), { ifNoneMatch: "*" }))).toBe("PRECONDITION_FAILED");
      expect(await codeOf(s.putFile("file/small", join(dir, "small"), { ifNoneMatch: "*" }))).toBe("PRECONDITION_FAILED");
    }, 180_000);

    it("keeps keys with spaces, unicode, + and =", async () => {
      const keys = ["odd/with space", "odd/ünïcödé/文件", "odd/a+b=c", "odd/emoji-😀", "odd/%20literal", "odd/tilde~!'()*,;"];
      for (const k of keys) await s.put(k, Buffer.from(k));
      for (const k of keys) expect(Buffer.from(await s.get(k)).toString()).toBe(k);
      expect((await collect(s.list("odd/"))).map((o) => o.key)).toEqual([...keys].sort(utf8Order));
      await s.delete(keys);
      expect(await collect(s.list("odd/"))).toEqual([]);
    });

    it("rejects malformed keys", async () => {
      for (const k of ["", "/abs", "a//b", "a/./b", "a/../b", "trail/"]) {
        expect(await codeOf(s.put(k, new Uint8Array(1)))).toBe("INVALID_ARGUMENT");
      }
    });
  });
}
