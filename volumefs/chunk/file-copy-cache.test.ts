import { randomBytes } from "node:crypto";
import { constants, existsSync, fstatSync, mkdirSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, closeSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { FileCopyCache } from "./index.js";

const MiB = 2 ** 20;
/** Where a cache under `d` keeps this boot's copies. */
const root = (d: string) => join(d, readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim());

/** Waits for the fill's writes, sync and rename to end. */
async function settle(cache: FileCopyCache, key: string): Promise<number | undefined> {
  for (let i = 0; i < 200; i++) {
    const fd = cache.open(key);
    if (fd !== undefined) return fd;
    await new Promise((r) => setTimeout(r, 10));
  }
  return undefined;
}

/** Whether files under `dir` open with O_DIRECT. */
function takesDirect(dir: string): boolean {
  const p = join(dir, "probe");
  try {
    closeSync(openSync(p, constants.O_WRONLY | constants.O_CREAT | constants.O_DIRECT));
    return true;
  } catch {
    return false;
  } finally {
    rmSync(p, { force: true });
  }
}

function readAll(fd: number, size: number): Buffer {
  const b = Buffer.alloc(size + 1);
  let n = 0;
  for (let got; (got = readSync(fd, b, n, b.length - n, n)) > 0; ) n += got;
  closeSync(fd);
  return b.subarray(0, n);
}

describe("FileCopyCache", () => {
  const dirs: string[] = [];
  const dir = () => {
    const d = mkdtempSync(join(tmpdir(), "strata-copies-"));
    dirs.push(d);
    return d;
  };
  afterEach(() => {
    for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
  });

  it("keeps a copy given in any order once every byte is in, and names it by the chunk ids", async () => {
    const cache = new FileCopyCache({ dir: dir(), maxBytes: 64 * MiB });
    const data = randomBytes(3 * MiB + 17);
    const key = FileCopyCache.key(["a".repeat(64), "b".repeat(64)]);
    expect(FileCopyCache.key(["a".repeat(64), "b".repeat(64)])).toBe(key);
    expect(FileCopyCache.key(["b".repeat(64), "a".repeat(64)])).not.toBe(key);
    const fill = cache.startFill(key, data.length)!;
    expect(cache.startFill(key, data.length)).toBeUndefined();
    expect(fill.write(2 * MiB, [data.subarray(2 * MiB, 3 * MiB), data.subarray(3 * MiB)])).toBe(true);
    expect(fill.write(0, [data.subarray(0, MiB)])).toBe(true);
    expect(cache.open(key)).toBeUndefined();
    expect(fill.write(MiB, [data.subarray(MiB, 2 * MiB)])).toBe(true);
    const fd = await settle(cache, key);
    expect(fd).toBeDefined();
    expect(readAll(fd!, data.length).equals(data)).toBe(true);
    expect(cache.startFill(key, data.length)).toBeUndefined();
  });

  it("refuses writes to a copy that has ended, and writes nothing through descriptors it closed", async () => {
    const d = dir();
    const cache = new FileCopyCache({ dir: d, maxBytes: 64 * MiB });
    const data = randomBytes(2 * MiB);
    const key = FileCopyCache.key(["c".repeat(64)]);
    const fill = cache.startFill(key, data.length)!;
    expect(fill.write(0, [data])).toBe(true);
    const fd = await settle(cache, key);
    closeSync(fd!);
    // Files opened now take the descriptor numbers the fill closed.
    const others = Array.from({ length: 4 }, (_, i) => join(d, `other${i}`));
    const fds = others.map((p) => openSync(p, "w+"));
    try {
      expect(fill.write(0, [data.subarray(0, MiB)])).toBe(false);
      await new Promise((r) => setTimeout(r, 50));
      for (const p of others) expect(readFileSync(p).length).toBe(0);
    } finally {
      for (const f of fds) closeSync(f);
    }
    expect(readAll(cache.open(key)!, data.length).equals(data)).toBe(true);
  });

  it("reads nothing through a closed reader, and closes nothing a second time", async () => {
    const d = dir();
    const cache = new FileCopyCache({ dir: d, maxBytes: 64 * MiB });
    const data = randomBytes(2 * MiB);
    const key = FileCopyCache.key(["d".repeat(64)]);
    expect(cache.startFill(key, data.length)!.write(0, [data])).toBe(true);
    closeSync((await settle(cache, key))!);
    const reader = cache.reader(key)!;
    expect(Buffer.from((await reader.read(MiB, 16))!).equals(data.subarray(MiB, MiB + 16))).toBe(true);
    reader.close();
    await new Promise((r) => setTimeout(r, 20));
    // Files opened now take the descriptor number the reader closed.
    const fds = Array.from({ length: 4 }, (_, i) => openSync(join(d, `other${i}`), "w+"));
    try {
      expect(await reader.read(0, 16)).toBeUndefined();
      await new Promise((r) => setTimeout(r, 20));
      for (const f of fds) expect(fstatSync(f).size).toBe(0);
    } finally {
      for (const f of fds) closeSync(f);
    }
  });

  it("keeps a copy given as many pieces at once, shuffled, byte-exact; a copy given up with writes queued keeps nothing", async () => {
    const d = dir();
    const cache = new FileCopyCache({ dir: d, maxBytes: 64 * MiB });
    const data = randomBytes(5 * MiB + 3);
    const piece = 64 * 1024;
    const offsets = Array.from({ length: Math.ceil(data.length / piece) }, (_, i) => i * piece);
    for (let i = offsets.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [offsets[i], offsets[j]] = [offsets[j]!, offsets[i]!];
    }
    const key = FileCopyCache.key(["f".repeat(64)]);
    const fill = cache.startFill(key, data.length)!;
    // Two views per write, as reads hand over chunk views.
    for (const o of offsets) {
      const end = Math.min(o + piece, data.length);
      const mid = Math.min(o + 1000, end);
      expect(fill.write(o, [data.subarray(o, mid), data.subarray(mid, end)])).toBe(true);
    }
    expect(readAll((await settle(cache, key))!, data.length).equals(data)).toBe(true);

    const other = FileCopyCache.key(["0".repeat(64)]);
    const given = cache.startFill(other, data.length)!;
    for (let o = data.length - piece; o > 0; o -= piece) given.write(o, [data.subarray(o, o + piece)]);
    given.abandon();
    await new Promise((r) => setTimeout(r, 200));
    expect(cache.open(other)).toBeUndefined();
    expect(readdirSync(join(root(d), "tmp"))).toEqual([]);
  });

  it("writes aligned pieces past the page cache and the rest through it, cuts a padded last piece to the size, byte-exact", async () => {
    const data = randomBytes(3 * MiB + 5000);
    // Aligned 1 MiB reads, an unaligned piece in the middle, and an unaligned last piece.
    const writes: [number, number][] = [[MiB, 2 * MiB], [0, 12288], [12288, 12288 + 777], [12288 + 777, MiB], [2 * MiB, 3 * MiB], [3 * MiB, data.length]];
    const fillWith = (cache: FileCopyCache, key: string) => {
      const fill = cache.startFill(key, data.length)!;
      for (const [a, b] of writes) expect(fill.write(a, [data.subarray(a, a + 100), data.subarray(a + 100, b)])).toBe(true);
      return fill;
    };
    const cache = new FileCopyCache({ dir: dir(), maxBytes: 64 * MiB });
    const key = FileCopyCache.key(["d".repeat(64)]);
    const fill = fillWith(cache, key);
    const fd = await settle(cache, key);
    expect(readAll(fd!, data.length + 4096).equals(data)).toBe(true);
    // On a file system that takes O_DIRECT (a disk's; not tmpfs) every aligned piece went past
    // the page cache, the last one (5000 bytes) padded to 8192 and cut back.
    expect(fill.directBytes).toBe(takesDirect(cache.dir) ? 2 * MiB + 12288 + 5000 : 0);

    const buffered = new FileCopyCache({ dir: dir(), maxBytes: 64 * MiB, direct: false });
    const plain = fillWith(buffered, key);
    expect(readAll((await settle(buffered, key))!, data.length + 4096).equals(data)).toBe(true);
    expect(plain.directBytes).toBe(0);
  });

  it("keeps a copy a reader gave in order with one gap filled last, byte-exact; a copy given up partway keeps nothing, and takes no more", async () => {
    const d = dir();
    const cache = new FileCopyCache({ dir: d, maxBytes: 64 * MiB });
    const data = randomBytes(10 * MiB + 123);
    const piece = 128 * 1024;
    const gap = 4 * MiB;
    const key = FileCopyCache.key(["e".repeat(64)]);
    const fill = cache.startFill(key, data.length)!;
    for (let o = 0; o < data.length; o += piece) {
      if (o === gap) continue;
      expect(fill.write(o, [data.subarray(o, Math.min(o + 7, data.length)), data.subarray(Math.min(o + 7, data.length), Math.min(o + piece, data.length))])).toBe(true);
    }
    expect(fill.whole).toBe(false);
    expect(fill.write(gap, [data.subarray(gap, gap + piece)])).toBe(true);
    expect(fill.whole).toBe(true);
    expect(readAll((await settle(cache, key))!, data.length + 4096).equals(data)).toBe(true);
    expect(fill.directBytes).toBe(takesDirect(cache.dir) ? data.length : 0);

    const other = FileCopyCache.key(["9".repeat(64)]);
    const partway = cache.startFill(other, data.length)!;
    for (let o = 0; o < 3 * MiB + piece; o += piece) partway.write(o, [data.subarray(o, o + piece)]);
    partway.abandon();
    expect(partway.write(3 * MiB + piece, [data.subarray(3 * MiB + piece, 3 * MiB + 2 * piece)])).toBe(false);
    await new Promise((r) => setTimeout(r, 200));
    expect(cache.open(other)).toBeUndefined();
    expect(readdirSync(join(root(d), "tmp"))).toEqual([]);
  });

  it("reads a whole copy through a CopyReader, and gives nothing for bytes past its end or after close", async () => {
    const cache = new FileCopyCache({ dir: dir(), maxBytes: 64 * MiB });
    const data = randomBytes(2 * MiB + 5);
    const key = FileCopyCache.key(["e".repeat(64)]);
    expect(cache.reader(key)).toBeUndefined();
    cache.startFill(key, data.length)!.write(0, [data]);
    closeSync((await settle(cache, key))!);
    const r = cache.reader(key)!;
    expect(Buffer.from((await r.read(MiB - 3, MiB))!).equals(data.subarray(MiB - 3, 2 * MiB - 3))).toBe(true);
    expect(await r.read(2 * MiB, 6)).toBeUndefined(); // one byte short
    const during = r.read(0, data.length);
    r.close(); // while a read runs: the descriptor stays open until it ends
    const got = await during;
    expect(got === undefined || Buffer.from(got).equals(data)).toBe(true);
    expect(await r.read(0, 10)).toBeUndefined();
  });

  it("keeps nothing of a copy given up, or of one that goes past the file's end", async () => {
    const d = dir();
    const cache = new FileCopyCache({ dir: d, maxBytes: 64 * MiB });
    const data = randomBytes(2 * MiB);
    const key = FileCopyCache.key(["c".repeat(64)]);
    const fill = cache.startFill(key, data.length)!;
    fill.write(0, [data.subarray(0, MiB)]);
    fill.abandon();
    await new Promise((r) => setTimeout(r, 100));
    expect(cache.open(key)).toBeUndefined();
    expect(readdirSync(join(root(d), "tmp"))).toEqual([]);

    const again = cache.startFill(key, data.length)!;
    expect(again.write(MiB, [data])).toBe(false);

    // A read far from what the copy holds so far: a random reader, not a whole-file one.
    const far = new FileCopyCache({ dir: d, maxBytes: 64 * MiB, maxPendingBytes: 256 * 1024 }).startFill(FileCopyCache.key(["d".repeat(64)]), data.length)!;
    expect(far.write(0, [data.subarray(0, 1024)])).toBe(true);
    expect(far.write(MiB, [data.subarray(MiB, MiB + 1024)])).toBe(false);
    await new Promise((r) => setTimeout(r, 100));
    expect(cache.open(key)).toBeUndefined();
    expect(readdirSync(join(root(d), "tmp"))).toEqual([]);
  });

  it("copies no file under minBytes or over half the bound, and evicts the least recently opened beyond the bound", async () => {
    const d = dir();
    const cache = new FileCopyCache({ dir: d, maxBytes: 5 * MiB, minBytes: MiB });
    expect(cache.startFill("0".repeat(64), MiB - 1)).toBeUndefined();
    expect(cache.startFill("0".repeat(64), 3 * MiB)).toBeUndefined();
    const keys = ["1", "2", "3"].map((c) => c.repeat(64));
    for (const k of keys) {
      const f = cache.startFill(k, 2 * MiB)!;
      f.write(0, [randomBytes(2 * MiB)]);
      closeSync((await settle(cache, k))!);
      await new Promise((r) => setTimeout(r, 20));
    }
    // 3 × 2 MiB over a 5 MiB bound: the oldest went.
    expect(existsSync(join(root(d), keys[0]!.slice(0, 2), keys[0]!))).toBe(false);
    expect(cache.size).toBeLessThanOrEqual(5 * MiB);
    for (const k of keys.slice(1)) expect(readFileSync(join(root(d), k.slice(0, 2), k)).length).toBe(2 * MiB);
  });

  it("uses only copies written in this boot, and removes those of earlier ones", async () => {
    const d = dir();
    const data = randomBytes(MiB);
    const key = FileCopyCache.key(["e".repeat(64)]);
    const old = join(d, "11111111-2222-3333-4444-555555555555");
    mkdirSync(join(old, key.slice(0, 2)), { recursive: true });
    writeFileSync(join(old, key.slice(0, 2), key), data);
    const cache = new FileCopyCache({ dir: d, maxBytes: 64 * MiB });
    expect(cache.open(key)).toBeUndefined();
    for (let i = 0; i < 100 && existsSync(old); i++) await new Promise((r) => setTimeout(r, 10));
    expect(existsSync(old)).toBe(false);
  });
});
