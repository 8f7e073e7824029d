/**
 * `FileObjectStore`: the embedded default `ObjectStore`, a directory on the local disk.
 *
 * Layout: object `a/b/c` is the file `<root>/a/b/c`; key segments are directories. While a put
 * runs its bytes sit in `<dir>/.strata-tmp-<random>` next to the final name; such names are never
 * listed and no key segment may start with `.strata-tmp-`.
 * Invariants: a put writes the temp file, fsyncs it, then renames it over the final name
 * (or, create-only, hard-links it there: `link()` fails with EEXIST if the name exists, which is
 * atomic across processes) and fsyncs the directory. A reader therefore sees the whole old file,
 * the whole new one, or none. A key cannot be both an object and a prefix of another key's
 * directory ("a" and "a/b"): the second put fails with IO.
 */
import { randomBytes } from "node:crypto";
import { copyFile, link, mkdir, open, readdir, rename, stat, unlink, type FileHandle } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { VolumeError } from "../errors.js";
import { checkKey, checkRange } from "./keys.js";
import { compareKeys } from "./memory-object-store.js";
import type { ByteRange, ObjectInfo, ObjectStore, PutOptions } from "./types.js";

const TMP = ".strata-tmp-";

/** An `ObjectStore` in a local directory; see the file's design note for the layout. */
export class FileObjectStore implements ObjectStore {
  readonly url: string;
  /** Absolute root directory. */
  readonly root: string;

  /** Uses (and creates on first put) `rootDir`; nothing is touched until the first call. */
  constructor(rootDir: string) {
    this.root = resolve(rootDir);
    this.url = `file://${this.root}`;
  }

  private path(key: string, op: string): string {
    checkKey(key, op);
    if (key.split("/").some((s) => s.startsWith(TMP))) {
      throw new VolumeError("INVALID_ARGUMENT", `${op} ${JSON.stringify(key)}: segments starting with ${TMP} are reserved`, {
        op,
        path: key,
      });
    }
    return join(this.root, key);
  }

  /** Atomic put by temp file + fsync + rename (or link for `ifNoneMatch`, EEXIST → PRECONDITION_FAILED). */
  async put(key: string, body: Uint8Array, opts: PutOptions = {}): Promise<void> {
    const final = this.path(key, "put object");
    await this.install(key, final, opts, async (tmp) => {
      const fh = await open(tmp, "wx", 0o644);
      try {
        let done = 0;
        while (done < body.byteLength) {
          const { bytesWritten } = await fh.write(body, done, body.byteLength - done);
          done += bytesWritten;
        }
        await fh.sync();
      } finally {
        await fh.close();
      }
    });
  }

  /** Copies the file into a temp file, then installs it as `put` does. */
  async putFile(key: string, path: string, opts: PutOptions = {}): Promise<void> {
    const final = this.path(key, "put object");
    await this.install(key, final, opts, async (tmp) => {
      await copyFile(path, tmp);
      const fh = await open(tmp, "r+");
      try {
        await fh.sync();
      } finally {
        await fh.close();
      }
    });
  }

  private async install(key: string, final: string, opts: PutOptions, write: (tmp: string) => Promise<void>): Promise<void> {
    const dir = dirname(final);
    const tmp = join(dir, TMP + randomBytes(8).toString("hex"));
    try {
      await mkdir(dir, { recursive: true });
      await write(tmp);
      if (opts.ifNoneMatch === "*") {
        try {
          await link(tmp, final);
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === "EEXIST") {
            throw VolumeError.PRECONDITION_FAILED(JSON.stringify(key), { op: "put object", path: key, cause: err });
          }
          throw err;
        } finally {
          await unlink(tmp).catch(() => undefined);
        }
      } else {
        await rename(tmp, final);
      }
      await syncDir(dir);
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      if (err instanceof VolumeError) throw err;
      throw VolumeError.IO(`put object ${JSON.stringify(key)}`, err, { path: key });
    }
  }

  /** Reads the file or a range of it; NOT_FOUND when there is no such file. */
  async get(key: string, range?: ByteRange): Promise<Uint8Array> {
    const path = this.path(key, "get object");
    if (range !== undefined) checkRange(range, key, "get object");
    let fh: FileHandle;
    try {
      fh = await open(path, "r");
    } catch (err) {
      throw this.readError(err, key, "get object");
    }
    try {
      const st = await fh.stat();
      if (!st.isFile()) throw VolumeError.NOT_FOUND(JSON.stringify(key), { op: "get object", path: key });
      const start = range === undefined ? 0 : Math.min(range.offset, st.size);
      const end = range === undefined ? st.size : Math.min(range.offset + range.length, st.size);
      const buf = Buffer.allocUnsafe(end - start);
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await fh.read(buf, done, buf.length - done, start + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      return new Uint8Array(buf.buffer, buf.byteOffset, done);
    } catch (err) {
      throw this.readError(err, key, "get object");
    } finally {
      await fh.close();
    }
  }

  private readError(err: unknown, key: string, op: string): VolumeError {
    if (err instanceof VolumeError) return err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "ENOTDIR" || code === "EISDIR") return VolumeError.NOT_FOUND(JSON.stringify(key), { op, path: key });
    return VolumeError.IO(`${op} ${JSON.stringify(key)}`, err, { path: key });
  }

  /** Size of the file, or undefined when missing (or a directory). */
  async head(key: string): Promise<{ size: number } | undefined> {
    const path = this.path(key, "head object");
    try {
      const st = await stat(path);
      return st.isFile() ? { size: st.size } : undefined;
    } catch (err) {
      const ve = this.readError(err, key, "head object");
      if (ve.code === "NOT_FOUND") return undefined;
      throw ve;
    }
  }

  /** Walks the tree depth-first in UTF-8 key order, visiting only directories that can match. */
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    yield* this.walk("", prefix);
  }

  private async *walk(rel: string, prefix: string): AsyncGenerator<ObjectInfo> {
    let entries;
    try {
      entries = await readdir(join(this.root, rel), { withFileTypes: true });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT" || code === "ENOTDIR") return;
      throw VolumeError.IO(`list objects ${JSON.stringify(prefix)}`, err);
    }
    const named = entries
      .filter((e) => !e.name.startsWith(TMP) && (e.isDirectory() || e.isFile()))
      .map((e) => ({ e, sortKey: rel + e.name + (e.isDirectory() ? "/" : "") }))
      .sort((a, b) => compareKeys(a.sortKey, b.sortKey));
    for (const { e, sortKey } of named) {
      if (e.isDirectory()) {
        if (sortKey.startsWith(prefix) || prefix.startsWith(sortKey)) yield* this.walk(sortKey, prefix);
      } else if (sortKey.startsWith(prefix)) {
        let size: number;
        try {
          size = (await stat(join(this.root, sortKey))).size;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === "ENOENT") continue;
          throw VolumeError.IO(`list objects ${JSON.stringify(prefix)}`, err);
        }
        yield { key: sortKey, size };
      }
    }
  }

  /** Unlinks the files; missing ones are ignored. Empty directories are left in place. */
  async delete(keys: readonly string[]): Promise<void> {
    const paths = keys.map((k) => this.path(k, "delete object"));
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < paths.length) {
        const i = next++;
        try {
          await unlink(paths[i]!);
        } catch (err) {
          const code = (err as NodeJS.ErrnoException).code;
          if (code === "ENOENT" || code === "ENOTDIR") continue;
          if (code === "EISDIR" || code === "EPERM") continue;
          throw VolumeError.IO(`delete object ${JSON.stringify(keys[i])}`, err, { path: keys[i] });
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(16, paths.length) }, worker));
  }
}

async function syncDir(dir: string): Promise<void> {
  const fh = await open(dir, "r");
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
