/**
 * The chunk store: the upload pipeline (chunk, hash, dedup, pack, upload, register) and the read
 * pipeline (cache, chunk index, ranged GETs of packs, verify) used by sync and the mount.
 *
 * Write path invariants:
 * - a chunk is stored at most once per writer, and not at all when `meta` already knows it
 *   (dedup across versions, forks and volumes); new candidates are checked in batches with one
 *   `meta.getChunks` query per batch, never per file;
 * - a pack is registered with `meta.putPack` only after its upload succeeded, so the chunk index
 *   never names a pack that is not in the bucket;
 * - bytes buffered and in flight stay under about `maxBufferedPacks × packTargetBytes`.
 * Read path invariants: bytes are verified against their id before they are returned or cached.
 */
import { VolumeError } from "../errors.js";
import type { HashedParts, ObjectStore } from "../object/types.js";
import { hold, pin, type BufferHold } from "../object/buffer-lease.js";
import type { ChunkLocation, MetadataStore } from "../../metadata/index.js";
import { Chunker, cutPoints, DEFAULT_CHUNK_PARAMS, SegmentJoiner } from "./chunker.js";
import { chunkId, verifyChunk } from "./hash.js";
import { PackBuilder, packKey, type BuiltPack } from "./pack.js";
import { sharedChunkPool, type ChunkedSegment, type ChunkPool } from "./chunk-pool.js";
import type { ChunkCache, ChunkParams, PackEntryKind } from "./types.js";

/** One chunk of a file: a file's content is an ordered list of these. */
export interface ChunkRef {
  /** blake3 hex of the chunk's bytes. */
  id: string;
  /** Length in bytes. */
  length: number;
}

/** What a file write produced. */
export interface WriteResult {
  chunks: ChunkRef[];
  /** Total bytes, the sum of the chunk lengths. */
  size: number;
}

/** Totals of a writer since it was created. */
export interface WriteStats {
  /** Packs uploaded and registered. */
  packs: number;
  /** Chunks (and trees) stored in those packs, and their bytes. */
  newChunks: number;
  newBytes: number;
  /** Chunks (and trees) not stored because the writer or `meta` already had them. */
  dedupedChunks: number;
  dedupedBytes: number;
  /** Bytes of pack objects uploaded (entries plus index and trailer). */
  uploadedBytes: number;
}

/** Options of a ChunkStore. */
export interface ChunkStoreOptions {
  /** Where packs live (`packs/<id>`). */
  objects: ObjectStore;
  /** The chunk index and trees. */
  meta: MetadataStore;
  /** Host-wide cache of chunk bytes; reads fill it. None by default. */
  cache?: ChunkCache;
  /** Chunking parameters; default DEFAULT_CHUNK_PARAMS. Changing them defeats dedup with old data. */
  params?: ChunkParams;
  /** A pack is sealed and uploaded once its entries reach this many bytes; default 16 MiB. */
  packTargetBytes?: number;
  /** Pack uploads running at once; default 4. */
  uploadConcurrency?: number;
  /** Bound of sealed-but-not-uploaded data, in packs; writes wait beyond it; default 4. */
  maxBufferedPacks?: number;
  /** New-chunk candidates are checked against `meta` once they reach this many bytes; default 4 MiB. */
  dedupBatchBytes?: number;
  /**
   * Inputs of at least this many bytes are chunked and hashed in a worker thread; default 8 MiB.
   * `Infinity` keeps all work on the calling thread.
   */
  workerThresholdBytes?: number;
  /** The worker pool; default the process-wide `sharedChunkPool()`. */
  pool?: ChunkPool;
  /**
   * Inputs chunked in workers are cut into segments of this many bytes, chunked in parallel and
   * joined in order (the cuts are the same as sequential chunking); default 8 MiB.
   */
  segmentBytes?: number;
  /** Ranged GETs running at once per `readRange`; default 8. */
  readConcurrency?: number;
  /** Chunks of one pack at most this far apart are fetched in one ranged GET; default 64 KiB. */
  coalesceGapBytes?: number;
  /**
   * Upper bound of one coalesced ranged GET; default 16 MiB, a whole pack at the default pack
   * size. A cold sequential read of 512 MiB on RGW ran at 287-319 MB/s with 16 MiB GETs against
   * 247-260 MB/s with 8 MiB ones (32 MiB: no better): half the requests, and each one's fixed
   * cost in the server, the signing and the worker.
   */
  maxReadBytes?: number;
  /** Most bytes of fetched chunks waiting for their cache write; default 64 MiB. */
  cacheBehindBytes?: number;
}

/** Options of ChunkWriter.writeStream. */
export interface WriteStreamOptions {
  /**
   * The writer takes over every buffer the stream yields and may move its memory to a worker
   * thread (which detaches it and every view of it): yield buffers that are not reused and do not
   * share their ArrayBuffer with other data. Saves a copy of each buffer of 1 MiB or more that
   * spans its whole ArrayBuffer. Default false: the writer copies what it keeps.
   */
  transfer?: boolean;
  /**
   * With `transfer`: called with each taken-over buffer (a view of its whole ArrayBuffer) once the
   * writer holds no view of it, for the producer to fill again; reading into reused buffers saves
   * page faults and external-memory GCs. Default: such buffers are dropped.
   */
  recycle?: (buf: Uint8Array) => void;
}

/** A batch writer of chunks and trees; see ChunkStore.writer(). Not for use after abort(). */
export interface ChunkWriter {
  /** Chunks, hashes and dedups a stream; new chunks are packed and uploaded in the background. */
  writeStream(src: AsyncIterable<Uint8Array>, opts?: WriteStreamOptions): Promise<WriteResult>;
  /** The same for bytes in memory; the caller may reuse `data` once this resolves. */
  writeBuffer(data: Uint8Array): Promise<WriteResult>;
  /** Adds an encoded tree (`id` = blake3 hex of `data`) to a pack as kind "tree". */
  addTree(id: string, data: Uint8Array): void;
  /**
   * Uploads everything buffered, waits for every upload, registers every pack with
   * `meta.putPack` (each after its upload succeeded) and returns the writer's totals. Throws the
   * first upload or registration failure. The writer may be used again afterwards.
   */
  flush(): Promise<WriteStats>;
  /** Drops what is buffered and waits for uploads in flight; their packs are not registered. */
  abort(): Promise<void>;
}

interface Candidate {
  id: string;
  kind: PackEntryKind;
  data: Uint8Array;
}

/** A counting semaphore. */
class Limiter {
  private active = 0;
  private readonly queue: (() => void)[] = [];
  constructor(private readonly max: number) {}
  /** Takes a slot if one is free now. */
  tryAcquire(): boolean {
    if (this.active >= this.max) return false;
    this.active++;
    return true;
  }
  /** Waits for a slot and takes it (a released slot passes straight to the longest waiter). */
  async acquire(): Promise<void> {
    if (!this.tryAcquire()) await new Promise<void>((r) => this.queue.push(r));
  }
  release(): void {
    const next = this.queue.shift();
    if (next) next();
    else this.active--;
  }
  async run<T>(f: () => Promise<T>): Promise<T> {
    await this.acquire();
    try {
      return await f();
    } finally {
      this.release();
    }
  }
}

/** Yielded buffers of at least this size that may be transferred go to a worker as they are. */
const DIRECT_SEGMENT_BYTES = 1024 * 1024;

/** True when `b` spans the whole of a (non-shared) ArrayBuffer, so moving that buffer moves only `b`. */
function spansBuffer(b: Uint8Array): boolean {
  return b.byteOffset === 0 && b.buffer instanceof ArrayBuffer && b.byteLength === b.buffer.byteLength;
}

function copyOf(src: Uint8Array, from: number, to: number): Uint8Array {
  return Uint8Array.prototype.slice.call(src, from, to);
}

class Writer implements ChunkWriter {
  private readonly taken = new Set<string>();
  private candidates: Candidate[] = [];
  private candidateBytes = 0;
  private builder = this.newBuilder();
  private readonly uploads = new Set<Promise<void>>();
  private inflightBytes = 0;
  private readonly limiter: Limiter;
  private error: unknown;
  private aborted = false;
  private readonly stats: WriteStats = { packs: 0, newChunks: 0, newBytes: 0, dedupedChunks: 0, dedupedBytes: 0, uploadedBytes: 0 };
  /** Buffers of packs whose upload finished: reused for the next packs (fresh buffers of 16 MiB cost page faults and GC). */
  private readonly spare: Uint8Array[] = [];
  /** Candidate batches being checked against `meta`. */
  private readonly resolving = new Set<Promise<void>>();

  constructor(private readonly s: ChunkStore) {
    this.limiter = new Limiter(s.uploadConcurrency);
  }

  private check(): void {
    if (this.aborted) throw new VolumeError("INVALID_ARGUMENT", "write chunks: writer was aborted");
    if (this.error !== undefined) throw this.error;
  }

  private offer(id: string, kind: PackEntryKind, data: Uint8Array, owned: boolean): void {
    if (this.taken.has(id)) {
      this.stats.dedupedChunks++;
      this.stats.dedupedBytes += data.length;
      return;
    }
    this.taken.add(id);
    this.candidates.push({ id, kind, data: owned ? data : copyOf(data, 0, data.length) });
    this.candidateBytes += data.length;
  }

  private async settle(): Promise<void> {
    if (this.candidateBytes >= this.s.dedupBatchBytes) await this.resolve();
    while (this.inflightBytes > this.s.maxBufferedBytes && this.uploads.size > 0) await Promise.race(this.uploads);
    this.check();
  }

  private resolve(): Promise<void> {
    if (this.candidates.length === 0) return Promise.resolve();
    const batch = this.candidates;
    this.candidates = [];
    this.candidateBytes = 0;
    const p = this.resolveBatch(batch).finally(() => this.resolving.delete(p));
    this.resolving.add(p);
    return p;
  }

  /** Resolves every candidate offered so far; afterwards none holds a view of a caller's buffer (packs copy). */
  private async resolveAll(): Promise<void> {
    void this.resolve();
    await Promise.all(this.resolving);
  }

  private async resolveBatch(batch: Candidate[]): Promise<void> {
    const known = await this.s.meta.getChunks(batch.map((c) => c.id));
    for (const c of batch) {
      if (known.has(c.id)) {
        this.stats.dedupedChunks++;
        this.stats.dedupedBytes += c.data.length;
        continue;
      }
      this.builder.add(c.id, c.kind, c.data);
      this.stats.newChunks++;
      this.stats.newBytes += c.data.length;
      if (this.builder.size >= this.s.packTargetBytes) this.seal();
    }
  }

  private seal(): void {
    if (this.builder.count === 0) return;
    const built = this.builder.finish();
    this.builder = this.newBuilder();
    this.upload(built);
  }

  /** A pack builder that lays out in a spare buffer when one fits, else in a new one with room for a full pack. */
  private newBuilder(): PackBuilder {
    return new PackBuilder((min) => {
      const k = this.spare.findIndex((b) => b.length >= min);
      if (k >= 0) return this.spare.splice(k, 1)[0]!;
      return new Uint8Array(Math.max(min, this.s.packTargetBytes + (this.s.packTargetBytes >> 3)));
    });
  }

  private upload(built: BuiltPack): void {
    const size = built.bytes.length;
    this.inflightBytes += size;
    const p = this.limiter
      .run(async () => {
        if (this.aborted) return;
        await this.s.objects.put(packKey(built.id), built.bytes);
        this.spare.push(new Uint8Array(built.bytes.buffer));
        if (this.aborted) return;
        const locations: ChunkLocation[] = built.entries.map((e) => ({ id: e.id, pack: built.id, offset: e.offset, length: e.length }));
        await this.s.meta.putPack({ id: built.id, size, createdAt: Date.now() }, locations);
        this.stats.packs++;
        this.stats.uploadedBytes += size;
      })
      .catch((err: unknown) => {
        this.error ??= err;
      })
      .finally(() => {
        this.inflightBytes -= size;
        this.uploads.delete(p);
      });
    this.uploads.add(p);
  }

  async writeBuffer(data: Uint8Array): Promise<WriteResult> {
    this.check();
    if (data.length >= this.s.workerThresholdBytes && (await this.s.workersReady())) {
      return this.writeStream((async function* () {
        yield data;
      })());
    }
    return this.writeOnThread(data);
  }

  private async writeOnThread(data: Uint8Array): Promise<WriteResult> {
    const chunks: ChunkRef[] = [];
    let prev = 0;
    for (const c of cutPoints(data, this.s.params)) {
      const piece = data.subarray(prev, c);
      const id = chunkId(piece);
      chunks.push({ id, length: piece.length });
      this.offer(id, "chunk", piece, false);
      prev = c;
    }
    await this.settle();
    return { chunks, size: data.length };
  }

  async writeStream(src: AsyncIterable<Uint8Array>, opts: WriteStreamOptions = {}): Promise<WriteResult> {
    this.check();
    const head: Uint8Array[] = [];
    let headBytes = 0;
    const it = src[Symbol.asyncIterator]();
    let next = await it.next();
    while (!next.done && headBytes < this.s.workerThresholdBytes) {
      head.push(next.value);
      headBytes += next.value.length;
      next = await it.next();
    }
    if (next.done && headBytes < this.s.workerThresholdBytes) return this.writeOnThread(head.length === 1 ? head[0]! : Buffer.concat(head));
    if (!(await this.s.workersReady())) return this.streamOnThread(head, next, it);
    return this.streamOnWorkers(head, next, it, opts.transfer === true ? (opts.recycle ?? (() => undefined)) : undefined);
  }

  /**
   * Cuts the stream into segments (owned buffers of 1 MiB or more as they are, the rest gathered
   * into `segmentBytes` buffers), sends them to the workers and joins their cuts in stream order.
   * A segment holds one of the store's `segmentSlots` from when it is sent until it is joined, so
   * all streams together keep at most two segments per worker in flight. A stream that finds no
   * free slot joins its own segments first, and waits only when it holds none (no stream waits
   * for a slot while holding one). A joined segment's buffer is reused (gathered ones here, taken
   * over ones by `recycle`) once its chunks are resolved (packs copy them) and the joiner carries
   * none of its bytes. `recycle` is given when the stream's buffers may be taken over.
   */
  private async streamOnWorkers(
    head: Uint8Array[],
    next: IteratorResult<Uint8Array>,
    it: AsyncIterator<Uint8Array>,
    recycle: ((buf: Uint8Array) => void) | undefined,
  ): Promise<WriteResult> {
    const { pool, params, segmentBytes, segmentSlots: slots } = this.s;
    const joiner = new SegmentJoiner(params);
    const queue: { seg: Promise<ChunkedSegment>; gathered: boolean }[] = [];
    const joined: { buf: Uint8Array; gathered: boolean }[] = [];
    const spareGathered: Uint8Array[] = [];
    const depth = 2 * pool.size;
    const chunks: ChunkRef[] = [];
    let size = 0;
    let acc: Uint8Array | undefined;
    let accLen = 0;
    const reuse = async (all: boolean): Promise<void> => {
      await this.resolveAll();
      for (let k = 0; k < joined.length; ) {
        const j = joined[k]!;
        if (!all && joiner.holds(j.buf.buffer)) k++;
        else {
          joined.splice(k, 1);
          if (j.gathered) spareGathered.push(j.buf);
          else recycle?.(j.buf);
        }
      }
    };
    const join = async (): Promise<void> => {
      const q = queue.shift()!;
      let seg: ChunkedSegment;
      try {
        seg = await q.seg;
      } finally {
        slots.release();
      }
      for (const c of joiner.push(seg.data, seg)) this.take(c.index >= 0 ? seg.ids[c.index]! : chunkId(c.data), c.data, chunks);
      joined.push({ buf: new Uint8Array(seg.data.buffer), gathered: q.gathered });
      await reuse(false);
      await this.settle();
    };
    const send = async (data: Uint8Array, gathered: boolean): Promise<void> => {
      while (!slots.tryAcquire()) {
        if (queue.length > 0) await join();
        else {
          await slots.acquire();
          break;
        }
      }
      const seg = pool.chunkSegment(data, params);
      seg.catch(() => undefined);
      queue.push({ seg, gathered });
      while (queue.length >= depth) await join();
    };
    const sendGathered = async (): Promise<void> => {
      if (accLen === 0) return;
      const data = acc!.subarray(0, accLen);
      acc = undefined;
      accLen = 0;
      await send(data, true);
    };
    const feed = async (data: Uint8Array): Promise<void> => {
      size += data.length;
      if (recycle && data.length >= DIRECT_SEGMENT_BYTES && spansBuffer(data)) {
        await sendGathered();
        await send(data, false);
        return;
      }
      for (let at = 0; at < data.length; ) {
        acc ??= spareGathered.pop() ?? new Uint8Array(segmentBytes);
        const n = Math.min(segmentBytes - accLen, data.length - at);
        acc.set(data.subarray(at, at + n), accLen);
        accLen += n;
        at += n;
        if (accLen === segmentBytes) await sendGathered();
      }
    };
    try {
      for (const h of head) await feed(h);
      for (; !next.done; next = await it.next()) await feed(next.value);
      await sendGathered();
      while (queue.length > 0) await join();
    } finally {
      for (const q of queue.splice(0)) q.seg.then(() => slots.release(), () => slots.release());
    }
    const last = joiner.finish();
    if (last) this.take(chunkId(last), last, chunks);
    await reuse(true);
    await this.settle();
    return { chunks, size };
  }

  /** Records an owned chunk of the file being written and offers it for packing. */
  private take(id: string, data: Uint8Array, out: ChunkRef[]): void {
    out.push({ id, length: data.length });
    this.offer(id, "chunk", data, true);
  }

  private async streamOnThread(head: Uint8Array[], next: IteratorResult<Uint8Array>, it: AsyncIterator<Uint8Array>): Promise<WriteResult> {
    const chunker = new Chunker(this.s.params);
    const chunks: ChunkRef[] = [];
    let size = 0;
    const feed = async (data: Uint8Array): Promise<void> => {
      size += data.length;
      for (const piece of chunker.push(data)) this.take(chunkId(piece), piece, chunks);
      await this.settle();
    };
    for (const h of head) await feed(h);
    for (let n = next; !n.done; n = await it.next()) await feed(n.value);
    const last = chunker.finish();
    if (last) this.take(chunkId(last), last, chunks);
    await this.settle();
    return { chunks, size };
  }

  addTree(id: string, data: Uint8Array): void {
    this.check();
    if (!verifyChunk(id, data)) throw new VolumeError("INVALID_ARGUMENT", `add tree ${id}: id is not the blake3 hash of its bytes`);
    this.offer(id, "tree", data, false);
  }

  async flush(): Promise<WriteStats> {
    this.check();
    await this.resolveAll();
    this.seal();
    while (this.uploads.size > 0) await Promise.all(this.uploads);
    this.check();
    return { ...this.stats };
  }

  async abort(): Promise<void> {
    this.aborted = true;
    this.candidates = [];
    this.candidateBytes = 0;
    this.builder = this.newBuilder();
    while (this.uploads.size > 0) await Promise.all(this.uploads);
  }
}

interface Range {
  pack: string;
  offset: number;
  length: number;
  members: ChunkLocation[];
}

/** Bytes a caller keeps for good: their buffer, if leased, never goes back (see buffer-lease.ts). */
function pinned(data: Uint8Array): Uint8Array {
  pin(data);
  return data;
}

/**
 * Reads and writes chunks and trees as packs in an ObjectStore, indexed by a MetadataStore.
 *
 * ```ts
 * const store = new ChunkStore({ objects, meta, cache: new DiskChunkCache({ dir, maxBytes }) });
 * const w = store.writer();
 * const { chunks, size } = await w.writeBuffer(bytes);
 * await w.flush();
 * const again = await store.readRange(chunks, 0, size);
 * ```
 */
export class ChunkStore {
  readonly objects: ObjectStore;
  readonly meta: MetadataStore;
  readonly cache: ChunkCache | undefined;
  readonly params: Readonly<ChunkParams>;
  readonly packTargetBytes: number;
  readonly uploadConcurrency: number;
  readonly maxBufferedBytes: number;
  readonly dedupBatchBytes: number;
  readonly workerThresholdBytes: number;
  readonly pool: ChunkPool;
  readonly segmentBytes: number;
  /** Segments in workers or waiting to be joined, over all writers: two per worker. */
  readonly segmentSlots: Limiter;
  private readonly readConcurrency: number;
  private readonly coalesceGapBytes: number;
  /** See ChunkStoreOptions.maxReadBytes: readers batch their chunk requests up to this much. */
  readonly maxReadBytes: number;
  private readonly inflight = new Map<string, Promise<Uint8Array>>();
  /** Chunks whose cache write has not ended yet, and their bytes. */
  private readonly writing = new Map<string, Promise<Uint8Array>>();
  private writingBytes = 0;
  private readonly cacheBehindBytes: number;
  private workersOk: Promise<boolean> | undefined;

  constructor(opts: ChunkStoreOptions) {
    this.objects = opts.objects;
    this.meta = opts.meta;
    this.cache = opts.cache;
    this.params = Object.freeze({ ...(opts.params ?? DEFAULT_CHUNK_PARAMS) });
    this.packTargetBytes = opts.packTargetBytes ?? 16 * 1024 * 1024;
    this.uploadConcurrency = opts.uploadConcurrency ?? 4;
    this.maxBufferedBytes = (opts.maxBufferedPacks ?? 4) * this.packTargetBytes;
    this.dedupBatchBytes = opts.dedupBatchBytes ?? 4 * 1024 * 1024;
    this.workerThresholdBytes = opts.workerThresholdBytes ?? 8 * 1024 * 1024;
    this.pool = opts.pool ?? sharedChunkPool();
    this.segmentBytes = Math.max(1, opts.segmentBytes ?? 8 * 1024 * 1024);
    this.segmentSlots = new Limiter(2 * this.pool.size);
    this.readConcurrency = opts.readConcurrency ?? 8;
    this.coalesceGapBytes = opts.coalesceGapBytes ?? 64 * 1024;
    this.maxReadBytes = opts.maxReadBytes ?? 16 * 1024 * 1024;
    this.cacheBehindBytes = opts.cacheBehindBytes ?? 64 * 1024 * 1024;
    cutPoints(new Uint8Array(0), this.params);
  }

  /** True when worker threads are available (started on first need). */
  workersReady(): Promise<boolean> {
    if (this.workerThresholdBytes === Infinity) return Promise.resolve(false);
    this.workersOk ??= this.pool.start();
    return this.workersOk.then((ok) => ok && this.pool.healthy);
  }

  /** A new batch writer. Writers are independent; each dedups against `meta` and itself. */
  writer(): ChunkWriter {
    return new Writer(this);
  }

  /**
   * A chunk's bytes: from the cache, else a ranged GET of its pack. Throws VolumeError NOT_FOUND
   * for an id the chunk index does not know, CORRUPT when the bytes do not hash to `id`.
   */
  async read(id: string): Promise<Uint8Array> {
    const running = this.running(id);
    if (running) return running.then(pinned);
    const loaded = this.load([id]);
    this.track(id, loaded.then((l) => l.found.get(id)!));
    const l = await loaded;
    l.release();
    return pinned(l.found.get(id)!);
  }

  /** The bytes of a chunk a read or a cache write has in memory now, if any. */
  private running(id: string): Promise<Uint8Array> | undefined {
    return this.writing.get(id) ?? this.inflight.get(id);
  }

  /**
   * The bytes of each of `ids` from the cache, else from their packs (written to the cache unless
   * `keep` is false), and the release of the holds on the received buffers (see buffer-lease.ts),
   * for the caller to call once it handed the bytes on. Throws NOT_FOUND for an id the index does
   * not know.
   */
  private async load(ids: string[], keep = true): Promise<{ found: Map<string, Uint8Array>; release: () => void }> {
    const locs = await this.meta.getChunks(ids);
    const unknown = ids.find((id) => !locs.has(id));
    if (unknown) throw VolumeError.NOT_FOUND(`chunk ${unknown}`, { op: "read chunk" });
    const found = new Map<string, Uint8Array>();
    const absent: ChunkLocation[] = [];
    await Promise.all(
      [...locs.values()].map(async (loc) => {
        const hit = await this.cached(loc);
        if (hit) found.set(loc.id, hit);
        else absent.push(loc);
      }),
    );
    const holds: BufferHold[] = [];
    for (const c of await this.fetch(absent, keep, holds)) found.set(c.id, c.data);
    return { found, release: () => holds.forEach((h) => h.release()) };
  }

  private async cached(loc: ChunkLocation): Promise<Uint8Array | undefined> {
    if (!this.cache) return undefined;
    return this.cache.get(loc).catch(() => undefined);
  }

  private track(id: string, p: Promise<Uint8Array>): Promise<Uint8Array> {
    this.inflight.set(id, p);
    const clear = (): void => {
      if (this.inflight.get(id) === p) this.inflight.delete(id);
    };
    p.then(clear, clear);
    return p;
  }

  /**
   * The range's bytes and its members' views of them. With `leased`, the store may lease the
   * buffer (see buffer-lease.ts): `hold` is then the caller's hold on it.
   */
  private async fetchRange(r: Range, leased: boolean): Promise<{ bytes: Uint8Array; chunks: { id: string; data: Uint8Array }[]; hold?: BufferHold }> {
    const key = packKey(r.pack);
    // The store may hash the chunks as it receives them (while they are in the CPU's cache).
    const hashed: HashedParts = { parts: r.members.map((m) => ({ offset: m.offset - r.offset, length: m.length })) };
    const lease: { hold?: BufferHold } | undefined = leased ? {} : undefined;
    const bytes = await this.objects.get(key, { offset: r.offset, length: r.length }, lease ? { blake3: hashed, lease } : { blake3: hashed });
    try {
      if (bytes.length !== r.length) {
        throw new VolumeError("CORRUPT", `read pack ${r.pack}: short read (${bytes.length} of ${r.length} bytes)`, { op: "read chunk", path: key });
      }
      const out: { id: string; data: Uint8Array }[] = [];
      for (const [k, m] of r.members.entries()) {
        // Views, not copies: the members of one range are read (and evicted) together.
        const data = bytes.subarray(m.offset - r.offset, m.offset - r.offset + m.length);
        const ok = hashed.digests ? hashed.digests[k] === m.id : verifyChunk(m.id, data);
        if (!ok) throw VolumeError.CORRUPT(`chunk ${m.id}`, { op: "read chunk", path: key });
        out.push({ id: m.id, data });
      }
      return { bytes, chunks: out, hold: lease?.hold };
    } catch (err) {
      lease?.hold?.release();
      throw err;
    }
  }

  private coalesce(locs: ChunkLocation[]): Range[] {
    const byPack = new Map<string, ChunkLocation[]>();
    for (const l of locs) {
      const list = byPack.get(l.pack);
      if (list) list.push(l);
      else byPack.set(l.pack, [l]);
    }
    const ranges: Range[] = [];
    for (const [pack, list] of byPack) {
      list.sort((a, b) => a.offset - b.offset);
      let cur: Range | undefined;
      for (const l of list) {
        const end = l.offset + l.length;
        if (cur && l.offset - (cur.offset + cur.length) <= this.coalesceGapBytes && end - cur.offset <= this.maxReadBytes) {
          cur.length = Math.max(cur.length, end - cur.offset);
          cur.members.push(l);
        } else {
          cur = { pack, offset: l.offset, length: l.length, members: [l] };
          ranges.push(cur);
        }
      }
    }
    return ranges;
  }

  /**
   * Fetches the located chunks with coalesced ranged GETs in parallel, verifies them, and caches
   * them when `keep`. The holds on the received buffers go to `holds`.
   */
  private async fetch(locs: ChunkLocation[], keep: boolean, holds: BufferHold[]): Promise<{ id: string; data: Uint8Array }[]> {
    const limiter = new Limiter(this.readConcurrency);
    const ranges = this.coalesce(locs);
    const parts = await Promise.all(ranges.map((r) => limiter.run(() => this.fetchRange(r, true))));
    for (const p of parts) if (p.hold) holds.push(p.hold);
    if (keep) ranges.forEach((r, k) => this.cacheBehind(r, parts[k]!.bytes, parts[k]!.chunks));
    return parts.flatMap((p) => p.chunks);
  }

  /**
   * Stores fetched chunks in the cache without making the reader wait. Chunks being written stay
   * readable from memory until their write ends; beyond `cacheBehindBytes` in flight, further
   * chunks are not cached (the cache is an optimisation; a slow disk must not stall reads).
   */
  private cacheBehind(r: Range, bytes: Uint8Array, chunks: { id: string; data: Uint8Array }[]): void {
    const cache = this.cache;
    if (!cache || this.writingBytes + bytes.length > this.cacheBehindBytes) return;
    const mine = chunks.filter((c) => !this.writing.has(c.id));
    for (const c of mine) this.writing.set(c.id, Promise.resolve(c.data));
    this.writingBytes += bytes.length;
    const held = hold(bytes);
    const done = (): void => {
      for (const c of mine) this.writing.delete(c.id);
      this.writingBytes -= bytes.length;
      held?.release();
    };
    cache.putRange(r.pack, r.offset, bytes, r.members).then(done, done);
  }

  /**
   * Bytes [offset, offset + length) of a file made of `chunks`, shorter only when the file ends
   * first. Needed chunks come from the cache, else in parallel from their packs, adjacent chunks
   * of one pack in one ranged GET. Throws NOT_FOUND / CORRUPT as `read` does.
   */
  async readRange(chunks: readonly ChunkRef[], offset: number, length: number): Promise<Uint8Array> {
    if (!(offset >= 0) || !(length >= 0)) throw new VolumeError("INVALID_ARGUMENT", `read range: bad offset ${offset} or length ${length}`);
    const want: { ref: ChunkRef; start: number }[] = [];
    let pos = 0;
    const end = offset + length;
    for (const ref of chunks) {
      const next = pos + ref.length;
      if (next > offset && pos < end) want.push({ ref, start: pos });
      if (pos >= end) break;
      pos = next;
    }
    const holds = new Map<string, BufferHold>();
    const got = await this.readChunks(
      want.map((w) => w.ref),
      { holds },
    );
    const outEnd = Math.min(end, want.length > 0 ? want[want.length - 1]!.start + want[want.length - 1]!.ref.length : offset);
    const out = Buffer.allocUnsafe(Math.max(0, outEnd - offset));
    for (const w of want) {
      const data = got.get(w.ref.id)!;
      const from = Math.max(offset, w.start);
      const to = Math.min(outEnd, w.start + w.ref.length);
      out.set(data.subarray(from - w.start, to - w.start), from - offset);
    }
    for (const h of holds.values()) h.release();
    return out;
  }

  /**
   * The bytes of each chunk of `refs`, by id: from memory when a read or cache write of it is
   * running, else the cache, else in parallel from their packs (adjacent chunks of one pack in one
   * ranged GET). Throws NOT_FOUND / CORRUPT as `read` does, and CORRUPT when a chunk's length is
   * not the one its ref gives. With `keep: false` chunks fetched from packs are not written to the
   * cache: the caller keeps them elsewhere (a whole-file copy).
   *
   * The bytes may be views of a leased buffer (see buffer-lease.ts). With `holds`, the caller
   * gets a hold per chunk there (by id), to release once it no longer uses the chunk; the views
   * are good until the current task ends without one. Without `holds`, the buffers are pinned:
   * the bytes are the caller's for good.
   */
  async readChunks(refs: readonly ChunkRef[], opts: { keep?: boolean; holds?: Map<string, BufferHold> } = {}): Promise<Map<string, Uint8Array>> {
    const got = new Map<string, Uint8Array>();
    const holds = opts.holds;
    // Taken in the task the bytes arrive in, before their buffer could go back.
    const take = (id: string, data: Uint8Array): void => {
      got.set(id, data);
      if (!holds) return pin(data);
      const h = hold(data);
      if (h && !holds.has(id)) holds.set(id, h);
      else h?.release();
    };
    const missing: string[] = [];
    const waits: Promise<void>[] = [];
    for (const id of new Set(refs.map((r) => r.id))) {
      const running = this.running(id);
      if (running) waits.push(running.then((data) => take(id, data), () => void missing.push(id)));
      else missing.push(id);
    }
    try {
      await Promise.all(waits);
      if (missing.length > 0) {
        const loaded = this.load(missing, opts.keep !== false);
        for (const id of missing) this.track(id, loaded.then((l) => l.found.get(id)!));
        const l = await loaded;
        for (const [id, data] of l.found) take(id, data);
        l.release();
      }
      for (const r of refs) {
        const data = got.get(r.id)!;
        if (data.length !== r.length) throw VolumeError.CORRUPT(`chunk ${r.id}`, { op: "read chunk", details: { expected: r.length, got: data.length } });
      }
    } catch (err) {
      if (holds) for (const h of holds.values()) h.release();
      throw err;
    }
    return got;
  }

  /**
   * An encoded tree: from `meta.getTree`, else from its pack (then stored with `meta.putTrees`).
   * Throws NOT_FOUND for an unknown id, CORRUPT when the bytes do not hash to `id`.
   */
  async readTree(id: string): Promise<Uint8Array> {
    const local = await this.meta.getTree(id);
    if (local) {
      if (!verifyChunk(id, local)) throw VolumeError.CORRUPT(`tree ${id}`, { op: "read tree" });
      return local;
    }
    const loc = (await this.meta.getChunks([id])).get(id);
    if (!loc) throw VolumeError.NOT_FOUND(`tree ${id}`, { op: "read tree" });
    const {
      chunks: [got],
    } = await this.fetchRange({ pack: loc.pack, offset: loc.offset, length: loc.length, members: [loc] }, false);
    await this.meta.putTrees([{ id, data: got!.data }]);
    return got!.data;
  }
}
