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
import { rangeHeader } from "./keys.js";

/** What the worker runs: plain JavaScript, so that it loads nothing but node's http. */
const WORKER_SOURCE = `
const { parentPort } = require("node:worker_threads");
const http = require("node:http");
const https = require("node:https");
const agents = {};
parentPort.on("message", (m) => {
  const u = new URL(m.url);
  const lib = u.protocol === "https:" ? https : http;
  agents[u.protocol] ??= new lib.Agent({ keepAlive: true, maxSockets: m.maxSockets });
  let done = false;
  const answer = (msg, transfer) => {
    if (done) return;
    done = true;
    parentPort.postMessage({ id: m.id, ...msg }, transfer);
  };
  const req = lib.get(u, { agent: agents[u.protocol], headers: m.headers, timeout: m.timeoutMs }, (res) => {
    const length = Number(res.headers["content-length"]);
    if (res.statusCode !== 206 || !Number.isSafeInteger(length) || length > m.length) {
      res.resume();
      return answer({ status: res.statusCode });
    }
    const out = Buffer.allocUnsafeSlow(length);
    let at = 0;
    res.on("data", (part) => {
      if (at + part.length > length) return req.destroy(new Error("body longer than its content-length"));
      out.set(part, at);
      at += part.length;
    });
    res.on("end", () => (at === length ? answer({ buffer: out.buffer }, [out.buffer]) : answer({ error: "short body" })));
    res.on("error", (err) => answer({ error: err.message }));
    res.on("close", () => answer({ error: "connection closed" }));
  });
  req.on("timeout", () => req.destroy(new Error("timed out")));
  req.on("error", (err) => answer({ error: err.message }));
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
  /** The server, e.g. "http://127.0.0.1:7480" (path-style requests go to `<endpoint>/<bucket>/<key>`). */
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
  status?: number;
  error?: string;
}

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

  constructor(opts: RangeFetcherOptions) {
    this.endpoint = new URL(opts.endpoint);
    this.signer = new SignatureV4({ service: "s3", region: opts.region, credentials: opts.credentials, sha256: Sha256, uriEscapePath: false });
    this.maxSockets = opts.maxSockets ?? 32;
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  /**
   * Bytes [offset, offset + length) of `bucket`/`key` (fewer when the object ends first), or
   * undefined when the caller should make the request itself.
   */
  async get(bucket: string, key: string, offset: number, length: number): Promise<Uint8Array | undefined> {
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
      worker.postMessage({ id, url: `${this.endpoint.origin}${path}?${query}`, headers: { range }, length, maxSockets: this.maxSockets, timeoutMs: this.timeoutMs });
    });
    if (!reply.buffer) return undefined;
    this.served++;
    return Buffer.from(reply.buffer);
  }

  private start(): Worker | undefined {
    if (this.worker || this.broken) return this.worker;
    let w: Worker;
    try {
      w = new Worker(WORKER_SOURCE, { eval: true });
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
