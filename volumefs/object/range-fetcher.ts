/**
 * `RangeFetcher`: large ranged GETs of an S3 server received on a worker thread.
 *
 * A cold read of a mounted volume moves every byte through an HTTP response. Received on the main
 * thread, each socket read is a new buffer of the main isolate, and each body another: the
 * garbage collector then marks the main heap (tens of MB of modules) every few tens of MB read,
 * and the main thread, which also answers the kernel, spends most of its time receiving. A worker
 * with a small heap receives instead, and hands each body over without a copy (the buffer is
 * transferred). The main thread only signs: the worker sends a presigned URL with the same Range
 * header, so credentials never leave the main thread.
 *
 * The fetcher answers only what it can answer plainly: a 206 whose body has the length its
 * Content-Length announced. Anything else (another status, a network error, a dead worker)
 * resolves undefined, and the caller makes the same request through the SDK, which gives the
 * error its usual translation and retry flags.
 */
import { createHash, createHmac, type Hash, type Hmac } from "node:crypto";
import { Worker } from "node:worker_threads";
import { SignatureV4 } from "@smithy/signature-v4";
import { packagePath } from "../native.js";
import { lease, type BufferHold } from "./buffer-lease.js";
import { rangeHeader } from "./keys.js";
import type { ByteRange } from "./types.js";

/**
 * What the worker runs: plain JavaScript, so that it loads nothing but node's net.
 *
 * It speaks just enough HTTP/1.1 for one kind of exchange: a GET with a Range header, answered
 * by a 206 with a Content-Length. node's http client would hand the body over as a new buffer
 * per socket read, to be copied into the body (a third of the worker's time, and garbage to
 * collect); a net socket with `onread` reads straight into the memory it is offered, so the
 * worker offers the rest of the body's own buffer and each read (up to a MiB or more) lands in
 * place. Anything else (another status, chunked encoding, an oversized header, a short body, a
 * closed or silent connection) answers a status or an error and the caller asks the SDK instead.
 * Connections are kept alive per origin; a request whose kept connection turns out to be closed
 * before any byte came back is sent once more on a new one.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads");
const net = require("node:net");
let blake3;
try {
  blake3 = workerData.blake3 ? require(workerData.blake3) : undefined;
} catch {
  blake3 = undefined; // the caller checks the bytes itself
}
const HEAD_MAX = 16384;
const pools = new Map();
/** Bodies the main thread gave back (see buffer-lease.ts), to receive the next ones into. */
const spare = [];
let spareBytes = 0;

const fromSpare = new WeakSet();

/** Whether \`body\` was received into a buffer given back. */
function spareTaken(body) {
  return fromSpare.has(body.buffer);
}

/** A buffer of \`length\` bytes for a body: a spare one not much larger, else a new one. */
function bodyOf(length) {
  if (length >= workerData.pooledBytes) {
    let best = -1;
    for (let i = 0; i < spare.length; i++) {
      const n = spare[i].byteLength;
      if (n >= length && n <= length + (length >> 2) + (1 << 20) && (best < 0 || n < spare[best].byteLength)) best = i;
    }
    if (best >= 0) {
      const ab = spare.splice(best, 1)[0];
      spareBytes -= ab.byteLength;
      fromSpare.add(ab);
      return Buffer.from(ab, 0, length);
    }
    // Rounded up to a MiB, so that bodies of nearby lengths can take each other's buffers.
    return Buffer.from(new ArrayBuffer(Math.ceil(length / (1 << 20)) * (1 << 20)), 0, length);
  }
  return Buffer.allocUnsafeSlow(length);
}

function keepSpare(ab) {
  spare.push(ab);
  spareBytes += ab.byteLength;
  while (spareBytes > workerData.spareBytes) spareBytes -= spare.shift().byteLength;
}

function pool(host, port, maxSockets) {
  const key = host + ":" + port;
  let p = pools.get(key);
  if (!p) pools.set(key, (p = { host, port, maxSockets, idle: [], open: 0, queue: [] }));
  return p;
}

function send(p, job) {
  const c = p.idle.pop();
  if (c) return c.start(job, true);
  if (p.open < p.maxSockets) return new Conn(p).start(job, false);
  p.queue.push(job);
}

class Conn {
  constructor(p) {
    this.p = p;
    this.head = Buffer.allocUnsafe(HEAD_MAX);
    this.job = undefined;
    p.open++;
    this.sock = net.connect({
      host: p.host,
      port: p.port,
      noDelay: true,
      onread: { buffer: () => this.space(), callback: (n, buf) => this.got(n, buf) },
    });
    this.sock.on("error", (err) => this.fail(err.message));
    this.sock.on("close", () => this.closed());
    this.sock.on("timeout", () => this.sock.destroy(new Error("timed out")));
  }
  start(job, reused) {
    this.job = job;
    this.reused = reused;
    this.received = 0;
    this.headLen = 0;
    this.body = undefined;
    this.at = 0;
    this.sock.setTimeout(job.timeoutMs);
    this.sock.write(job.request);
  }
  /**
   * Where the next socket read goes: the rest of the body, else the header buffer. net asks
   * right after each read, before a request may start or end, so \`got\` checks where the bytes
   * actually landed.
   */
  space() {
    if (!this.job) return this.head;
    if (this.body) return this.body.subarray(this.at);
    return this.head.subarray(Math.min(this.headLen, HEAD_MAX - 1));
  }
  got(n, buf) {
    this.received += n;
    if (!this.job) return this.abort("bytes while idle");
    if (this.body) {
      if (this.at + n > this.body.length) return this.abort("body longer than its content-length");
      this.place(buf, n, this.body, this.at);
      this.at += n;
      if (this.at === this.body.length) this.done();
      return;
    }
    if (this.headLen + n > HEAD_MAX) return this.abort("header too long");
    this.place(buf, n, this.head, this.headLen);
    this.headLen += n;
    const end = this.head.subarray(0, this.headLen).indexOf("\\r\\n\\r\\n");
    if (end < 0) return;
    const lines = this.head.toString("latin1", 0, end).split("\\r\\n");
    const status = /^HTTP\\/1\\.[01] (\\d{3})/.exec(lines[0]);
    const headers = {};
    for (const l of lines.slice(1)) {
      const i = l.indexOf(":");
      if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    const length = Number(headers["content-length"]);
    this.keep = (headers.connection || "").toLowerCase() !== "close";
    if (!status || status[1] !== "206" || headers["transfer-encoding"] || !/^\\d+$/.test(headers["content-length"] || "") || length > this.job.length) {
      return this.abort(undefined, status ? Number(status[1]) : undefined);
    }
    const extra = this.headLen - end - 4;
    if (extra > length) return this.abort("body longer than its content-length");
    this.body = bodyOf(length);
    this.spared = spareTaken(this.body);
    this.head.copy(this.body, 0, end + 4, this.headLen);
    this.at = extra;
    if (this.at === length) this.done();
  }
  /** Moves \`n\` bytes read into \`buf\` to \`at\` of \`dest\`, unless they were read there. */
  place(buf, n, dest, at) {
    if (buf.buffer !== dest.buffer || buf.byteOffset !== dest.byteOffset + at) dest.set(buf.subarray(0, n), at);
  }
  done() {
    const job = this.job;
    const body = this.body;
    this.job = this.body = undefined;
    this.sock.setTimeout(0);
    job.answer({ buffer: body.buffer, length: body.length, spare: this.spared, digests: digestsOf(body, job.parts) }, [body.buffer]);
    if (!this.keep) return this.sock.destroy();
    const next = this.p.queue.shift();
    if (next) this.start(next, true);
    else this.p.idle.push(this);
  }
  /** Ends the request in flight (if any) with an error or a status, and the connection with it. */
  abort(error, status) {
    const job = this.job;
    this.job = undefined;
    this.sock.destroy();
    if (job) job.answer(status !== undefined ? { status } : { error: error || "bad response" });
  }
  fail(message) {
    const job = this.job;
    this.job = undefined;
    if (!job) return;
    // A kept connection the server had closed: nothing was answered, so ask again on a new one.
    if (this.reused && this.received === 0 && !job.retried) {
      job.retried = true;
      return send(this.p, job);
    }
    job.answer({ error: message });
  }
  closed() {
    this.p.open--;
    const i = this.p.idle.indexOf(this);
    if (i >= 0) this.p.idle.splice(i, 1);
    this.fail("connection closed");
    const next = this.p.queue.shift();
    if (next) send(this.p, next);
  }
}

/** blake3 hex of each part of the body, while it is in the cache; undefined unless every part is in it. */
function digestsOf(body, parts) {
  if (!blake3 || !parts || parts.some((p) => p.offset + p.length > body.length)) return undefined;
  return parts.map((p) => blake3.hash(body.subarray(p.offset, p.offset + p.length)).toString("hex"));
}

parentPort.on("message", (m) => {
  if (m.recycle) return keepSpare(m.recycle);
  const u = new URL(m.url);
  const p = pool(u.hostname, Number(u.port || 80), m.maxSockets);
  let answered = false;
  const answer = (msg, transfer) => {
    if (answered) return;
    answered = true;
    parentPort.postMessage({ id: m.id, ...msg }, transfer);
  };
  const request = "GET " + u.pathname + u.search + " HTTP/1.1\\r\\nHost: " + u.host + "\\r\\nRange: " + m.range + "\\r\\n\\r\\n";
  send(p, { request, length: m.length, parts: m.parts, timeoutMs: m.timeoutMs, answer, retried: false });
});
`;


/** The hash SignatureV4 asks for, over node's crypto. */
class Sha256 {
  private h: Hash | Hmac;
  constructor(private readonly secret?: string | ArrayBuffer | ArrayBufferView) {
    this.h = this.fresh();
  }
  private fresh(): Hash | Hmac {
    return this.secret === undefined ? createHash("sha256") : createHmac("sha256", toBytes(this.secret));
  }
  update(data: string | ArrayBuffer | ArrayBufferView): void {
    this.h.update(toBytes(data));
  }
  async digest(): Promise<Uint8Array> {
    return this.h.digest();
  }
  reset(): void {
    this.h = this.fresh();
  }
}

function toBytes(d: string | ArrayBuffer | ArrayBufferView): string | Uint8Array {
  if (typeof d === "string") return d;
  return ArrayBuffer.isView(d) ? new Uint8Array(d.buffer, d.byteOffset, d.byteLength) : new Uint8Array(d);
}

/** RFC 3986 escaping, as SigV4 canonicalises a path. */
function uriEscape(seg: string): string {
  return encodeURIComponent(seg).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** Credentials as the SDK's resolved config provides them. */
export type CredentialProvider = () => Promise<{ accessKeyId: string; secretAccessKey: string; sessionToken?: string }>;

/** Options of a RangeFetcher. */
export interface RangeFetcherOptions {
  /** The server, e.g. "http://127.0.0.1:7480" (plain HTTP; path-style requests go to `<endpoint>/<bucket>/<key>`). */
  endpoint: string;
  region: string;
  credentials: CredentialProvider;
  /** Open sockets of the worker; default 32. */
  maxSockets?: number;
  /** Time a request may sit without socket activity, in ms; default 60 000. */
  timeoutMs?: number;
}

interface Reply {
  id: number;
  buffer?: ArrayBuffer;
  /** The body's length: its first bytes of `buffer`. */
  length?: number;
  /** The body was received into a buffer given back. */
  spare?: boolean;
  digests?: string[];
  status?: number;
  error?: string;
}

/** Bodies this large are received into buffers the worker takes back when leased (see buffer-lease.ts). */
const POOLED_BYTES = 1 << 20;
/** Bytes of given-back bodies the worker keeps for the next ones. */
const SPARE_BYTES = 96 << 20;

/** Seconds a presigned request stays valid: it is sent at once. */
const PRESIGN_SECONDS = 900;

export class RangeFetcher {
  private readonly endpoint: URL;
  private readonly signer: SignatureV4;
  private readonly maxSockets: number;
  private readonly timeoutMs: number;
  private worker: Worker | undefined;
  private readonly pending = new Map<number, (r: Reply) => void>();
  private nextId = 1;
  private broken = false;
  /** Requests the worker answered with a body (for tests and diagnostics). */
  served = 0;
  /** Bodies the worker received into a buffer given back (for tests and diagnostics). */
  reusedBodies = 0;

  constructor(opts: RangeFetcherOptions) {
    this.endpoint = new URL(opts.endpoint);
    this.signer = new SignatureV4({ service: "s3", region: opts.region, credentials: opts.credentials, sha256: Sha256, uriEscapePath: false });
    this.maxSockets = opts.maxSockets ?? 32;
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  /**
   * Bytes [offset, offset + length) of `bucket`/`key` (fewer when the object ends first), or
   * undefined when the caller should make the request itself. With `parts` (offsets from
   * `offset`), also the blake3 hex digest of each, computed by the worker right after it received
   * the bytes, when it could. With `leased`, a large body's buffer is leased (see buffer-lease.ts):
   * `hold` is then the caller's hold on it, to release when done, and the buffer goes back to the
   * worker for a later body once no other holder is left.
   */
  async get(
    bucket: string,
    key: string,
    offset: number,
    length: number,
    parts?: readonly ByteRange[],
    leased = false,
  ): Promise<{ bytes: Uint8Array; digests?: string[]; hold?: BufferHold } | undefined> {
    if (this.broken || length <= 0) return undefined;
    const path = `${this.endpoint.pathname.replace(/\/$/, "")}/${bucket}/${key}`.split("/").map(uriEscape).join("/");
    const range = rangeHeader(offset, length);
    // Credentials that cannot be had fail the SDK's request the same way, with its translation.
    const signed = await this.signer.presign(
      {
        method: "GET",
        protocol: this.endpoint.protocol,
        hostname: this.endpoint.hostname,
        port: this.endpoint.port === "" ? undefined : Number(this.endpoint.port),
        path,
        query: {},
        // UNSIGNED-PAYLOAD is what S3 expects of a presigned request; the signer moves it to the query.
        headers: { host: this.endpoint.host, range, "x-amz-content-sha256": "UNSIGNED-PAYLOAD" },
      },
      { expiresIn: PRESIGN_SECONDS },
    ).catch(() => undefined);
    if (!signed) return undefined;
    const query = new URLSearchParams(signed.query as Record<string, string>).toString().replace(/\+/g, "%20");
    const worker = this.start();
    if (!worker) return undefined;
    const id = this.nextId++;
    const reply = await new Promise<Reply>((resolve) => {
      this.pending.set(id, resolve);
      if (this.pending.size === 1) worker.ref();
      worker.postMessage({ id, url: `${this.endpoint.origin}${path}?${query}`, range, length, parts, maxSockets: this.maxSockets, timeoutMs: this.timeoutMs });
    });
    if (!reply.buffer) return undefined;
    this.served++;
    if (reply.spare) this.reusedBodies++;
    const got: { bytes: Uint8Array; digests?: string[]; hold?: BufferHold } = { bytes: Buffer.from(reply.buffer, 0, reply.length ?? reply.buffer.byteLength) };
    if (reply.digests?.length === parts?.length) got.digests = reply.digests;
    if (leased && reply.buffer.byteLength >= POOLED_BYTES) got.hold = lease(reply.buffer, this.giveBack);
    return got;
  }

  /** Buffers given back: the worker receives later bodies into them. */
  private readonly giveBack = (buffer: ArrayBuffer): void => {
    if (this.worker && !this.broken) this.worker.postMessage({ recycle: buffer }, [buffer]);
  }

  private start(): Worker | undefined {
    if (this.worker || this.broken) return this.worker;
    let w: Worker;
    try {
      w = new Worker(WORKER_SOURCE, { eval: true, workerData: { blake3: packagePath("blake3"), pooledBytes: POOLED_BYTES, spareBytes: SPARE_BYTES } });
    } catch {
      this.broken = true;
      return undefined;
    }
    w.unref();
    w.on("message", (r: Reply) => {
      const resolve = this.pending.get(r.id);
      if (!resolve) return;
      this.pending.delete(r.id);
      if (this.pending.size === 0) w.unref();
      resolve(r);
    });
    const fail = (): void => {
      this.broken = true;
      this.worker = undefined;
      for (const resolve of this.pending.values()) resolve({ id: 0, error: "worker gone" });
      this.pending.clear();
    };
    w.on("error", fail);
    w.on("exit", fail);
    this.worker = w;
    return w;
  }

  /** Stops the worker; later calls resolve undefined (the caller makes them itself). */
  async close(): Promise<void> {
    const w = this.worker;
    this.broken = true;
    if (w) await w.terminate();
  }
}
