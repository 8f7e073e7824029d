import { readFile } from "node:fs/promises";
import { VolumeError } from "../errors.js";
import { checkKey, checkRange } from "./keys.js";
import type { ByteRange, ObjectInfo, ObjectStore, PutOptions } from "./types.js";

/**
 * A real `ObjectStore` held in process memory: keeps every contract of the seam (atomic puts,
 * create-only puts, ranged gets, sorted listing) and copies bytes in and out so callers cannot
 * alter stored objects. For unit tests of other layers and for throw-away volumes.
 */
export class MemoryObjectStore implements ObjectStore {
  readonly url: string;
  private readonly objects = new Map<string, Uint8Array>();

  /** `name` only shows in `url` ("memory://<name>"). */
  constructor(name = "default") {
    this.url = `memory://${name}`;
  }

  /** Stores a copy of `body`; with `ifNoneMatch: "*"` throws PRECONDITION_FAILED if `key` exists. */
  async put(key: string, body: Uint8Array, opts: PutOptions = {}): Promise<void> {
    checkKey(key, "put object");
    if (opts.ifNoneMatch === "*" && this.objects.has(key)) {
      throw VolumeError.PRECONDITION_FAILED(JSON.stringify(key), { op: "put object", path: key });
    }
    this.objects.set(key, Uint8Array.prototype.slice.call(body));
  }

  /** Reads the file fully, then behaves as `put`. A missing file throws IO. */
  async putFile(key: string, path: string, opts: PutOptions = {}): Promise<void> {
    checkKey(key, "put object");
    let body: Uint8Array;
    try {
      body = await readFile(path);
    } catch (err) {
      throw VolumeError.IO(`put object ${JSON.stringify(key)}: read ${path}`, err, { path: key });
    }
    await this.put(key, body, opts);
  }

  /** A copy of the object or of `range` of it; NOT_FOUND when missing. */
  async get(key: string, range?: ByteRange): Promise<Uint8Array> {
    checkKey(key, "get object");
    const obj = this.objects.get(key);
    if (obj === undefined) throw VolumeError.NOT_FOUND(JSON.stringify(key), { op: "get object", path: key });
    if (range === undefined) return obj.slice();
    checkRange(range, key, "get object");
    return obj.slice(Math.min(range.offset, obj.length), Math.min(range.offset + range.length, obj.length));
  }

  /** Size of the object, or undefined. */
  async head(key: string): Promise<{ size: number } | undefined> {
    checkKey(key, "head object");
    const obj = this.objects.get(key);
    return obj === undefined ? undefined : { size: obj.length };
  }

  /** A snapshot of matching keys taken at the first iteration, in ascending order. */
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const keys = [...this.objects.keys()].filter((k) => k.startsWith(prefix)).sort(compareKeys);
    for (const key of keys) {
      const obj = this.objects.get(key);
      if (obj !== undefined) yield { key, size: obj.length };
    }
  }

  /** Removes the keys; missing ones are ignored. */
  async delete(keys: readonly string[]): Promise<void> {
    for (const key of keys) checkKey(key, "delete object");
    for (const key of keys) this.objects.delete(key);
  }
}

/** Orders keys by their UTF-8 bytes, as S3 lists them. */
export function compareKeys(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a, "utf8"), Buffer.from(b, "utf8"));
}
