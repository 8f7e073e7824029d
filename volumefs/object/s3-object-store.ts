/**
 * `S3ObjectStore`: the `ObjectStore` seam over any S3-compatible server (AWS S3, Ceph RGW).
 *
 * Layout: object `key` lives at `<prefix><key>` in the bucket; `prefix` is "" or ends in "/".
 * Every backend error is translated here into a VolumeError (see `translateS3Error`).
 * The SDK never retries (`maxAttempts: 1`): retries belong to `withRetry`, which sees the
 * `retryable` flag. Multipart parts are the exception: each part is retried a few times in place
 * so that one lost part does not restart a large upload.
 */
import { Agent as HttpAgent } from "node:http";
import { Agent as HttpsAgent } from "node:https";
import { open, type FileHandle } from "node:fs/promises";
import { Readable } from "node:stream";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateBucketCommand,
  CreateMultipartUploadCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  UploadPartCommand,
  type CompletedPart,
} from "@aws-sdk/client-s3";
import { VolumeError } from "../errors.js";
import { RangeFetcher } from "./range-fetcher.js";
import { checkKey, checkRange, rangeHeader } from "./keys.js";
import type { ByteRange, GetOptions, ObjectInfo, ObjectStore, PutOptions } from "./types.js";

const MAX_SINGLE_PUT = 5 * 2 ** 30;

/** Options of `S3ObjectStore.fromUrl`. */
export interface S3ObjectStoreOptions {
  /** Server URL, e.g. "http://127.0.0.1:7480"; default the SDK's (AWS, or AWS_ENDPOINT_URL). */
  endpoint?: string;
  /** Signing region; default "us-east-1". */
  region?: string;
  /** Access key; default the SDK's credential chain (AWS_ACCESS_KEY_ID, profiles, …). Needs `secretAccessKey`. */
  accessKeyId?: string;
  /** Secret key paired with `accessKeyId`. */
  secretAccessKey?: string;
  /** Session token for temporary credentials. */
  sessionToken?: string;
  /** Files above this size go up by multipart, in bytes; default 16 MiB. */
  multipartThreshold?: number;
  /** Multipart part size in bytes (>= 5 MiB); default 8 MiB. */
  partSize?: number;
  /** Parts in flight per putFile; default 4. */
  partConcurrency?: number;
  /** Attempts per multipart part on retryable errors; default 3. */
  partAttempts?: number;
  /** Open sockets per store, the bound on parallel requests; default 32. */
  maxSockets?: number;
  /** Time to establish a connection, in ms; default 5 000. */
  connectionTimeoutMs?: number;
  /**
   * Sign requests without hashing their bodies (x-amz-content-sha256: UNSIGNED-PAYLOAD). Default
   * true: callers verify content by its own hash. Set false for a server that refuses it.
   */
  unsignedPayload?: boolean;
  /** Time a request may sit without socket activity, in ms; default 60 000. */
  requestTimeoutMs?: number;
  /**
   * Ranged GETs of at least this many bytes are received on a worker thread (`RangeFetcher`);
   * default 1 MiB, Infinity for never. Only with an explicit `endpoint`.
   */
  workerGetBytes?: number;
}

interface S3ErrorShape {
  name?: string;
  code?: string;
  Code?: string;
  message?: string;
  $metadata?: { httpStatusCode?: number };
  $retryable?: unknown;
}

const NETWORK_CODES = new Set([
  "ECONNREFUSED",
  "ECONNRESET",
  "ETIMEDOUT",
  "EPIPE",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ENOTFOUND",
  "EAI_AGAIN",
  "ECONNABORTED",
]);
const THROTTLE_NAMES = new Set([
  "SlowDown",
  "Throttling",
  "ThrottlingException",
  "RequestLimitExceeded",
  "TooManyRequests",
  "ServiceUnavailable",
  "InternalError",
  "RequestTimeout",
  "TimeoutError",
  "RequestTimeTooSkewed",
]);
const DENIED_NAMES = new Set(["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "ExpiredToken", "InvalidToken"]);

/**
 * Turns any error thrown by the S3 SDK into a VolumeError: NOT_FOUND (missing key or bucket),
 * ACCESS_DENIED, PRECONDITION_FAILED (412), STORE_UNREACHABLE with `retryable` (network, 5xx,
 * throttling), IO otherwise. VolumeErrors pass through unchanged.
 */
export function translateS3Error(err: unknown, op: string, key: string | undefined, url: string): VolumeError {
  if (err instanceof VolumeError) return err;
  const e = (err ?? {}) as S3ErrorShape;
  const name = e.name ?? e.Code ?? "";
  const status = e.$metadata?.httpStatusCode;
  const what = key === undefined ? url : JSON.stringify(key);
  const ctx = { op, path: key, cause: err };
  const netCode = e.code ?? (err as { cause?: { code?: string } })?.cause?.code;
  if (name === "NoSuchBucket") {
    return new VolumeError("NOT_FOUND", `${op} ${what}: bucket of ${url} does not exist`, {
      ...ctx,
      hint: "create the bucket first (S3ObjectStore.ensureBucket or your provider's console)",
    });
  }
  if (name === "NoSuchKey" || name === "NotFound" || status === 404) return VolumeError.NOT_FOUND(what, ctx);
  if (name === "PreconditionFailed" || status === 412) return VolumeError.PRECONDITION_FAILED(what, ctx);
  if (name === "ConditionalRequestConflict" || (status === 409 && name !== "BucketAlreadyExists")) {
    return new VolumeError("PRECONDITION_FAILED", `${op} ${what}: conflicting conditional write`, { ...ctx, retryable: true });
  }
  if (DENIED_NAMES.has(name) || status === 403 || status === 401) return VolumeError.ACCESS_DENIED(`${op} ${what}`, err, ctx);
  const message = e.message ?? "";
  if (
    (netCode !== undefined && NETWORK_CODES.has(netCode)) ||
    THROTTLE_NAMES.has(name) ||
    (status !== undefined && (status >= 500 || status === 429 || status === 408)) ||
    /socket hang up|ECONNRESET|ECONNREFUSED|ETIMEDOUT|timed? ?out|EPIPE/i.test(message) ||
    name === "AbortError"
  ) {
    return VolumeError.STORE_UNREACHABLE(`${op} ${what}`, err, { path: key });
  }
  return VolumeError.IO(`${op} ${what}`, err, { path: key });
}

const quietLogger = {
  trace: () => undefined,
  debug: () => undefined,
  info: () => undefined,
  warn: (...args: unknown[]) => {
    if (typeof args[0] === "string" && args[0].includes("non-retryable streaming request")) return;
    console.warn(...args);
  },
  error: () => undefined,
};

/**
 * A response body read into one buffer of the announced length (the SDK's own reader collects the
 * pieces and then concatenates them: a second copy of every byte read). A Node stream is read
 * through its 'data' events: async iteration costs a promise per socket read, about a quarter of
 * a cold read's CPU spent here.
 */
async function readBody(body: AsyncIterable<Uint8Array>, length: number | undefined): Promise<Uint8Array> {
  if (length === undefined) {
    const parts: Uint8Array[] = [];
    for await (const part of body) parts.push(part);
    return Buffer.concat(parts);
  }
  const out = Buffer.allocUnsafe(length);
  if (!(body instanceof Readable)) {
    let at = 0;
    for await (const part of body) {
      if (at + part.length > length) throw new Error(`body longer than its content-length ${length}`);
      out.set(part, at);
      at += part.length;
    }
    return at === length ? out : out.subarray(0, at);
  }
  return new Promise<Uint8Array>((resolve, reject) => {
    let at = 0;
    const done = (err?: Error): void => {
      body.off("data", onData).off("end", onEnd).off("error", done).off("close", onClose);
      if (err) {
        body.destroy();
        reject(err);
      } else resolve(at === length ? out : out.subarray(0, at));
    };
    const onData = (part: Uint8Array): void => {
      if (at + part.length > length) return done(new Error(`body longer than its content-length ${length}`));
      out.set(part, at);
      at += part.length;
    };
    const onEnd = (): void => done();
    const onClose = (): void => done(new Error(`connection closed after ${at} of ${length} body bytes`));
    body.on("data", onData).on("end", onEnd).on("error", done).on("close", onClose);
  });
}

/** An `ObjectStore` on an S3 bucket (and optional key prefix). Create with `S3ObjectStore.fromUrl`. */
export class S3ObjectStore implements ObjectStore {
  readonly url: string;
  /** The SDK client, for callers that need raw access (tests, tools). */
  readonly client: S3Client;
  readonly bucket: string;
  /** "" or ends in "/". */
  readonly prefix: string;
  private readonly threshold: number;
  private readonly partSize: number;
  private readonly partConcurrency: number;
  private readonly partAttempts: number;
  /** Receives large ranged GETs off the main thread; undefined without an explicit http: endpoint. */
  readonly fetcher: RangeFetcher | undefined;
  private readonly workerGetBytes: number;

  private constructor(bucket: string, prefix: string, opts: S3ObjectStoreOptions) {
    this.bucket = bucket;
    this.prefix = prefix;
    this.url = `s3://${bucket}/${prefix}`;
    this.threshold = opts.multipartThreshold ?? 16 * 2 ** 20;
    this.partSize = Math.max(opts.partSize ?? 8 * 2 ** 20, 5 * 2 ** 20);
    this.partConcurrency = Math.max(1, opts.partConcurrency ?? 4);
    this.partAttempts = Math.max(1, opts.partAttempts ?? 3);
    const maxSockets = opts.maxSockets ?? 32;
    const credentials =
      opts.accessKeyId !== undefined && opts.secretAccessKey !== undefined
        ? { accessKeyId: opts.accessKeyId, secretAccessKey: opts.secretAccessKey, sessionToken: opts.sessionToken }
        : undefined;
    this.client = new S3Client({
      endpoint: opts.endpoint,
      region: opts.region ?? "us-east-1",
      credentials,
      forcePathStyle: true,
      maxAttempts: 1,
      logger: quietLogger,
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
      requestHandler: {
        httpAgent: new HttpAgent({ keepAlive: true, maxSockets }),
        httpsAgent: new HttpsAgent({ keepAlive: true, maxSockets }),
        connectionTimeout: opts.connectionTimeoutMs ?? 5_000,
        requestTimeout: opts.requestTimeoutMs ?? 60_000,
      },
    });
    this.workerGetBytes = opts.workerGetBytes ?? 2 ** 20;
    // The worker speaks plain HTTP only: an https endpoint's GETs all go through the SDK.
    if (opts.endpoint?.startsWith("http:") && this.workerGetBytes !== Infinity) {
      const client = this.client;
      this.fetcher = new RangeFetcher({
        endpoint: opts.endpoint,
        region: opts.region ?? "us-east-1",
        credentials: () => client.config.credentials(),
        maxSockets,
        timeoutMs: opts.requestTimeoutMs,
      });
    }
    if (opts.unsignedPayload !== false) {
      // SigV4 over plain HTTP hashes every body with SHA-256 on the calling thread (~2 s of CPU per
      // GiB here). Strata names every pack, tree and version by the blake3 hash of its bytes and
      // verifies it on read, so the signature need not cover the payload.
      this.client.middlewareStack.add(
        (next) => async (args) => {
          const req = args.request as { headers?: Record<string, string> };
          if (req.headers) req.headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD";
          return next(args);
        },
        { step: "build", name: "strataUnsignedPayload" },
      );
    }
  }

  /**
   * A store for "s3://bucket" or "s3://bucket/prefix" (a trailing "/" is added to a non-empty
   * prefix). Throws INVALID_ARGUMENT on any other URL. Does not contact the server.
   */
  static fromUrl(url: string, opts: S3ObjectStoreOptions = {}): S3ObjectStore {
    const m = /^s3:\/\/([^/]+)\/?(.*)$/.exec(url);
    if (m === null || m[1] === undefined) {
      throw new VolumeError("INVALID_ARGUMENT", `open store ${JSON.stringify(url)}: not an s3://bucket/prefix url`, {
        hint: "use STRATA_STORE=s3://bucket or s3://bucket/prefix",
      });
    }
    let prefix = (m[2] ?? "").replace(/^\/+/, "");
    if (prefix !== "" && !prefix.endsWith("/")) prefix += "/";
    return new S3ObjectStore(m[1], prefix, opts);
  }

  /** Creates the bucket if missing; a bucket this account already owns is fine. */
  async ensureBucket(): Promise<void> {
    try {
      await this.client.send(new CreateBucketCommand({ Bucket: this.bucket }));
    } catch (err) {
      const name = (err as S3ErrorShape).name;
      if (name === "BucketAlreadyOwnedByYou") return;
      if (name === "BucketAlreadyExists") {
        try {
          await this.client.send(new HeadBucketCommand({ Bucket: this.bucket }));
          return;
        } catch (headErr) {
          throw translateS3Error(headErr, "create bucket", undefined, this.url);
        }
      }
      throw translateS3Error(err, "create bucket", undefined, this.url);
    }
  }

  /** Closes the client's sockets; the store must not be used afterwards. */
  close(): void {
    this.client.destroy();
    void this.fetcher?.close();
  }

  /** PutObject; with `ifNoneMatch` sends If-None-Match: * (412 → PRECONDITION_FAILED). */
  async put(key: string, body: Uint8Array, opts: PutOptions = {}): Promise<void> {
    checkKey(key, "put object");
    try {
      await this.client.send(
        new PutObjectCommand({
          Bucket: this.bucket,
          Key: this.prefix + key,
          Body: body,
          ContentLength: body.byteLength,
          IfNoneMatch: opts.ifNoneMatch,
        }),
      );
    } catch (err) {
      throw translateS3Error(err, "put object", key, this.url);
    }
  }

  /**
   * A plain put up to the multipart threshold; above it a multipart upload of `partSize` parts,
   * `partConcurrency` in flight, aborted on failure. Create-only puts (`ifNoneMatch`) of up to
   * 5 GiB go as one streamed PutObject instead, because servers such as Ceph RGW 16 ignore
   * If-None-Match on CompleteMultipartUpload; above 5 GiB the condition rides on the completion
   * (honoured by AWS S3, not by every server).
   */
  async putFile(key: string, path: string, opts: PutOptions = {}): Promise<void> {
    checkKey(key, "put object");
    let fh;
    try {
      fh = await open(path, "r");
    } catch (err) {
      throw VolumeError.IO(`put object ${JSON.stringify(key)}: open ${path}`, err, { path: key });
    }
    try {
      const size = (await fh.stat()).size;
      if (size <= this.threshold) {
        const buf = Buffer.allocUnsafe(size);
        await readFully(fh, buf, 0);
        await this.put(key, buf, opts);
        return;
      }
      if (opts.ifNoneMatch !== undefined && size <= MAX_SINGLE_PUT) {
        await this.putStream(key, fh, size, opts);
        return;
      }
      await this.multipart(key, fh, size, opts);
    } catch (err) {
      if (err instanceof VolumeError) throw err;
      throw VolumeError.IO(`put object ${JSON.stringify(key)}: read ${path}`, err, { path: key });
    } finally {
      await fh.close();
    }
  }

  private async putStream(key: string, fh: FileHandle, size: number, opts: PutOptions): Promise<void> {
    const body = fh.createReadStream({ start: 0, end: size - 1, autoClose: false });
    try {
      await this.client.send(
        new PutObjectCommand({ Bucket: this.bucket, Key: this.prefix + key, Body: body, ContentLength: size, IfNoneMatch: opts.ifNoneMatch }),
      );
    } catch (err) {
      throw translateS3Error(err, "put object", key, this.url);
    } finally {
      body.destroy();
    }
  }

  private async multipart(key: string, fh: FileHandle, size: number, opts: PutOptions): Promise<void> {
    const Key = this.prefix + key;
    let uploadId: string | undefined;
    try {
      const created = await this.client.send(new CreateMultipartUploadCommand({ Bucket: this.bucket, Key }));
      uploadId = created.UploadId;
    } catch (err) {
      throw translateS3Error(err, "put object", key, this.url);
    }
    if (uploadId === undefined) throw VolumeError.IO(`put object ${JSON.stringify(key)}`, "server returned no upload id");
    const count = Math.ceil(size / this.partSize);
    const parts: CompletedPart[] = new Array(count);
    let next = 0;
    let failed = false;
    const worker = async (): Promise<void> => {
      const buf = Buffer.allocUnsafe(this.partSize);
      while (!failed && next < count) {
        const i = next++;
        const offset = i * this.partSize;
        const len = Math.min(this.partSize, size - offset);
        const body = buf.subarray(0, len);
        await readFully(fh, body, offset);
        for (let attempt = 1; ; attempt++) {
          try {
            const res = await this.client.send(
              new UploadPartCommand({ Bucket: this.bucket, Key, UploadId: uploadId, PartNumber: i + 1, Body: body, ContentLength: len }),
            );
            parts[i] = { PartNumber: i + 1, ETag: res.ETag };
            break;
          } catch (err) {
            const ve = translateS3Error(err, "put object part", key, this.url);
            if (!ve.retryable || attempt >= this.partAttempts) throw ve;
            await new Promise((r) => setTimeout(r, 100 * 2 ** attempt));
          }
        }
      }
    };
    try {
      const workers = Array.from({ length: Math.min(this.partConcurrency, count) }, () =>
        worker().catch((err: unknown) => {
          failed = true;
          throw err;
        }),
      );
      const results = await Promise.allSettled(workers);
      const bad = results.find((r): r is PromiseRejectedResult => r.status === "rejected");
      if (bad !== undefined) throw bad.reason;
      try {
        await this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: this.bucket,
            Key,
            UploadId: uploadId,
            MultipartUpload: { Parts: parts },
            IfNoneMatch: opts.ifNoneMatch,
          }),
        );
      } catch (err) {
        throw translateS3Error(err, "put object", key, this.url);
      }
    } catch (err) {
      await this.client
        .send(new AbortMultipartUploadCommand({ Bucket: this.bucket, Key, UploadId: uploadId }))
        .catch(() => undefined);
      throw err;
    }
  }

  /** GetObject, ranged when asked; a range starting at or past the end gives empty bytes. */
  async get(key: string, range?: ByteRange, opts?: GetOptions): Promise<Uint8Array> {
    checkKey(key, "get object");
    let Range: string | undefined;
    if (range !== undefined) {
      checkRange(range, key, "get object");
      if (range.length === 0) {
        if ((await this.head(key)) === undefined) throw VolumeError.NOT_FOUND(JSON.stringify(key), { op: "get object", path: key });
        return new Uint8Array(0);
      }
      Range = rangeHeader(range.offset, range.length);
      if (this.fetcher && range.length >= this.workerGetBytes) {
        const got = await this.fetcher.get(this.bucket, this.prefix + key, range.offset, range.length, opts?.blake3?.parts, opts?.lease !== undefined);
        if (got) {
          if (got.digests && opts?.blake3) opts.blake3.digests = got.digests;
          if (got.hold && opts?.lease) opts.lease.hold = got.hold;
          return got.bytes;
        }
      }
    }
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.prefix + key, Range }));
      if (res.Body === undefined) return new Uint8Array(0);
      return await readBody(res.Body as AsyncIterable<Uint8Array>, res.ContentLength);
    } catch (err) {
      const e = err as S3ErrorShape;
      if (range !== undefined && (e.$metadata?.httpStatusCode === 416 || e.name === "InvalidRange")) return new Uint8Array(0);
      throw translateS3Error(err, "get object", key, this.url);
    }
  }

  /** HeadObject; undefined on 404. */
  async head(key: string): Promise<{ size: number } | undefined> {
    checkKey(key, "head object");
    try {
      const res = await this.client.send(new HeadObjectCommand({ Bucket: this.bucket, Key: this.prefix + key }));
      return { size: res.ContentLength ?? 0 };
    } catch (err) {
      const ve = translateS3Error(err, "head object", key, this.url);
      if (ve.code === "NOT_FOUND" && (err as S3ErrorShape).name !== "NoSuchBucket") return undefined;
      throw ve;
    }
  }

  /** ListObjectsV2 pages (1000 keys each) followed through continuation tokens. */
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    let token: string | undefined;
    do {
      let res;
      try {
        res = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.prefix + prefix, ContinuationToken: token }),
        );
      } catch (err) {
        throw translateS3Error(err, "list objects", prefix === "" ? undefined : prefix, this.url);
      }
      for (const o of res.Contents ?? []) {
        if (o.Key === undefined) continue;
        yield { key: o.Key.slice(this.prefix.length), size: o.Size ?? 0 };
      }
      token = res.IsTruncated === true ? res.NextContinuationToken : undefined;
    } while (token !== undefined);
  }

  /** DeleteObjects in batches of 1000, up to 4 batches in flight; missing keys are ignored. */
  async delete(keys: readonly string[]): Promise<void> {
    for (const key of keys) checkKey(key, "delete object");
    const batches: string[][] = [];
    for (let i = 0; i < keys.length; i += 1000) batches.push(keys.slice(i, i + 1000));
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < batches.length) {
        const batch = batches[next++]!;
        let res;
        try {
          res = await this.client.send(
            new DeleteObjectsCommand({
              Bucket: this.bucket,
              Delete: { Objects: batch.map((k) => ({ Key: this.prefix + k })), Quiet: true },
            }),
          );
        } catch (err) {
          throw translateS3Error(err, "delete objects", batch[0], this.url);
        }
        const bad = (res.Errors ?? []).filter((e) => e.Code !== "NoSuchKey");
        if (bad.length > 0) {
          const first = bad[0]!;
          const key = first.Key?.slice(this.prefix.length);
          throw translateS3Error({ name: first.Code, message: first.Message ?? first.Code }, "delete object", key, this.url);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(4, batches.length) }, worker));
  }
}

async function readFully(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fh.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) throw new Error(`file shrank while reading at byte ${position + done}`);
    done += bytesRead;
  }
}
