import { randomBytes } from "node:crypto";
import { hash } from "blake3";
import { createServer, type Server } from "node:net";
import { describe, it, expect, afterAll } from "vitest";
import { makeTestS3Store, s3Skipped, s3TestConfig } from "../../test/support/s3.js";
import { describeObjectStore } from "./conformance.js";
import { S3ObjectStore } from "./s3-object-store.js";
import type { HashedParts } from "./types.js";
import { hold, recycledBuffers, type BufferHold } from "./buffer-lease.js";

const maybe = s3Skipped() ? describe.skip : describe;

maybe("S3ObjectStore against Ceph RGW", () => {
  describeObjectStore("S3ObjectStore", async () => makeTestS3Store());
  describeObjectStore("S3ObjectStore under a prefix", async () => makeTestS3Store({ prefix: "some/prefix" }), {
    largeFileBytes: 17 * 2 ** 20,
  });

  it("maps wrong credentials to ACCESS_DENIED", async () => {
    const fx = await makeTestS3Store();
    try {
      const cfg = s3TestConfig();
      const bad = S3ObjectStore.fromUrl(`s3://${fx.bucket}/`, { ...cfg, secretAccessKey: "wrong-secret" });
      await expect(bad.put("x", new Uint8Array(1))).rejects.toMatchObject({ code: "ACCESS_DENIED", retryable: false });
      await expect(bad.get("x")).rejects.toMatchObject({ code: "ACCESS_DENIED" });
      const unknown = S3ObjectStore.fromUrl(`s3://${fx.bucket}/`, { ...cfg, accessKeyId: "NOSUCHKEY", secretAccessKey: "x" });
      await expect(unknown.head("x")).rejects.toMatchObject({ code: "ACCESS_DENIED" });
      bad.close();
      unknown.close();
    } finally {
      await fx.cleanup();
    }
  });

  it("maps a missing bucket to NOT_FOUND with a hint", async () => {
    const cfg = s3TestConfig();
    const s = S3ObjectStore.fromUrl("s3://strata-no-such-bucket-here/", cfg);
    const err = await s.get("x").catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "NOT_FOUND" });
    expect((err as { hint?: string }).hint).toMatch(/bucket/);
    await expect(s.put("x", new Uint8Array(1))).rejects.toMatchObject({ code: "NOT_FOUND" });
    s.close();
  });

  it("receives ranged GETs of 1 MiB and more on a worker thread, with the bytes and errors of the SDK's own GETs", async () => {
    const fx = await makeTestS3Store({ prefix: "worker gets" });
    const cfg = s3TestConfig();
    const s = S3ObjectStore.fromUrl(`s3://${fx.bucket}/worker gets`, cfg);
    const sdkOnly = S3ObjectStore.fromUrl(`s3://${fx.bucket}/worker gets`, { ...cfg, workerGetBytes: Infinity });
    try {
      const data = randomBytes(3 * 2 ** 20 + 17);
      const key = "odd names/a b!(c)*'.bin";
      await s.put(key, data);
      const ranges = [
        { offset: 0, length: data.length },
        { offset: 2 ** 20 + 3, length: 2 ** 20 },
        { offset: data.length - 2 ** 19, length: 2 ** 20 }, // runs past the end: the bytes there are
      ];
      for (const r of ranges) {
        const want = data.subarray(r.offset, r.offset + r.length);
        expect(Buffer.from(await s.get(key, r)).equals(want)).toBe(true);
        expect(Buffer.from(await sdkOnly.get(key, r)).equals(want)).toBe(true);
      }
      expect(s.fetcher!.served).toBe(ranges.length);
      expect(sdkOnly.fetcher).toBeUndefined();

      // The worker hashes parts of what it received when asked; a part past the bytes it got: none.
      const parts = [{ offset: 0, length: 1000 }, { offset: 1000, length: 2 ** 20 }, { offset: 2 ** 20 + 1000, length: 7 }];
      const asked: HashedParts = { parts };
      const got = Buffer.from(await s.get(key, { offset: 9, length: 2 ** 21 }, { blake3: asked }));
      expect(got.equals(data.subarray(9, 9 + 2 ** 21))).toBe(true);
      expect(asked.digests).toEqual(parts.map((p) => hash(got.subarray(p.offset, p.offset + p.length)).toString("hex")));
      const beyond: HashedParts = { parts: [{ offset: 2 ** 19, length: 2 ** 20 }] };
      await s.get(key, { offset: data.length - 2 ** 20, length: 2 ** 20 + 5 }, { blake3: beyond });
      expect(beyond.digests).toBeUndefined();
      const viaSdk: HashedParts = { parts };
      await sdkOnly.get(key, { offset: 9, length: 2 ** 21 }, { blake3: viaSdk });
      expect(viaSdk.digests).toBeUndefined();
      expect(s.fetcher!.served).toBe(ranges.length + 2);
      // Small ranges stay on the SDK.
      expect(Buffer.from(await s.get(key, { offset: 5, length: 100 })).equals(data.subarray(5, 105))).toBe(true);
      expect(s.fetcher!.served).toBe(ranges.length + 2);

      // What the worker cannot answer plainly goes through the SDK, errors included.
      await expect(s.get("no such key", { offset: 0, length: 2 ** 20 })).rejects.toMatchObject({ code: "NOT_FOUND" });
      const bad = S3ObjectStore.fromUrl(`s3://${fx.bucket}/worker gets`, { ...cfg, secretAccessKey: "wrong-secret" });
      await expect(bad.get(key, { offset: 0, length: 2 ** 20 })).rejects.toMatchObject({ code: "ACCESS_DENIED" });
      expect(bad.fetcher!.served).toBe(0);
      bad.close();

      // A worker gone (stopped here; a crash ends the same way) leaves the SDK to answer.
      await s.fetcher!.close();
      expect(Buffer.from(await s.get(key, ranges[1]!)).equals(data.subarray(ranges[1]!.offset, ranges[1]!.offset + 2 ** 20))).toBe(true);
      expect(s.fetcher!.served).toBe(ranges.length + 2);
    } finally {
      s.close();
      sdkOnly.close();
      await fx.cleanup();
    }
  });

  it("receives later bodies into the leased bodies given back, never into one still held", async () => {
    const fx = await makeTestS3Store({ prefix: "leased gets" });
    const s = fx.s3;
    const nextTask = (): Promise<void> => new Promise((r) => setImmediate(r));
    try {
      const data = randomBytes(8 * 2 ** 20);
      await s.put("big", data);
      const range = (k: number) => ({ offset: k * 2 ** 21, length: 2 ** 21 });
      const want = (k: number) => data.subarray(k * 2 ** 21, (k + 1) * 2 ** 21);
      const get = async (k: number) => {
        const lease: { hold?: BufferHold } = {};
        const bytes = await s.get("big", range(k), { lease });
        expect(Buffer.from(bytes).equals(want(k))).toBe(true);
        expect(lease.hold).toBeDefined();
        return { bytes, hold: lease.hold! };
      };
      const recycled = recycledBuffers();
      const a = await get(0);
      const kept = hold(a.bytes.subarray(1000, 3000))!;
      a.hold.release();
      const b = await get(1);
      b.hold.release();
      await nextTask();
      expect(recycledBuffers()).toBe(recycled + 1); // b's; a is still held
      expect(s.fetcher!.reusedBodies).toBe(0);

      const c = await get(2); // received into b's buffer
      expect(s.fetcher!.reusedBodies).toBe(1);
      const d = await get(3); // a new one: a's is held, c's not given back yet
      expect(s.fetcher!.reusedBodies).toBe(1);
      expect(Buffer.from(a.bytes.subarray(1000, 3000)).equals(want(0).subarray(1000, 3000))).toBe(true);
      kept.release();
      c.hold.release();
      d.hold.release();
      await nextTask();
      expect(recycledBuffers()).toBe(recycled + 4);
      for (const k of [0, 1, 2, 3]) await get(k).then((x) => x.hold.release());
      expect(s.fetcher!.reusedBodies).toBeGreaterThanOrEqual(4);

      // Without the option, the bytes are the caller's: nothing is leased, nothing goes back.
      const mine = await s.get("big", range(1));
      expect(hold(mine)).toBeUndefined();
      await nextTask();
      expect(Buffer.from(mine).equals(want(1))).toBe(true);
    } finally {
      await fx.cleanup();
    }
  });

  it("aborts a failed multipart upload and leaves nothing behind", async () => {
    const fx = await makeTestS3Store();
    try {
      await expect(fx.s3.putFile("mp/x", "/nonexistent/file")).rejects.toMatchObject({ code: "IO" });
      expect(await fx.s3.head("mp/x")).toBeUndefined();
    } finally {
      await fx.cleanup();
    }
  });
});

describe("S3ObjectStore without a server", () => {
  let server: Server | undefined;
  afterAll(() => server?.close());

  it("maps a closed port to retryable STORE_UNREACHABLE", async () => {
    const probe = createServer();
    const port = await new Promise<number>((r) => probe.listen(0, "127.0.0.1", () => r((probe.address() as { port: number }).port)));
    await new Promise((r) => probe.close(r));
    const s = S3ObjectStore.fromUrl("s3://b/", { endpoint: `http://127.0.0.1:${port}`, accessKeyId: "a", secretAccessKey: "b" });
    await expect(s.get("x")).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    await expect(s.put("x", new Uint8Array(1))).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    await expect(s.head("x")).rejects.toMatchObject({ code: "STORE_UNREACHABLE" });
    s.close();
  });

  it("maps a connection reset mid-request to retryable STORE_UNREACHABLE", async () => {
    server = createServer((sock) => sock.destroy());
    const port = await new Promise<number>((r) => server!.listen(0, "127.0.0.1", () => r((server!.address() as { port: number }).port)));
    const s = S3ObjectStore.fromUrl("s3://b/", { endpoint: `http://127.0.0.1:${port}`, accessKeyId: "a", secretAccessKey: "b" });
    await expect(s.get("x")).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    s.close();
  });

  it("fails a GET whose body ends before its content-length, rather than returning short bytes", async () => {
    const cut = createServer((sock) => {
      sock.once("data", () => {
        sock.write("HTTP/1.1 200 OK\r\nContent-Length: 100\r\nContent-Type: application/octet-stream\r\n\r\n" + "x".repeat(50));
        setTimeout(() => sock.destroy(), 20);
      });
    });
    const port = await new Promise<number>((r) => cut.listen(0, "127.0.0.1", () => r((cut.address() as { port: number }).port)));
    const s = S3ObjectStore.fromUrl("s3://b/", { endpoint: `http://127.0.0.1:${port}`, accessKeyId: "a", secretAccessKey: "b" });
    await expect(s.get("x")).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    await expect(s.get("x", { offset: 0, length: 100 })).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    s.close();
    cut.close();
  });

  it("fails a large ranged GET whose body ends early, whether the worker or the SDK receives it", async () => {
    let requests = 0;
    const cut = createServer((sock) => {
      sock.once("data", () => {
        requests++;
        sock.write("HTTP/1.1 206 Partial Content\r\nContent-Length: 2097152\r\nContent-Range: bytes 0-2097151/4194304\r\n\r\n" + "x".repeat(1000));
        setTimeout(() => sock.destroy(), 20);
      });
    });
    const port = await new Promise<number>((r) => cut.listen(0, "127.0.0.1", () => r((cut.address() as { port: number }).port)));
    const s = S3ObjectStore.fromUrl("s3://b/", { endpoint: `http://127.0.0.1:${port}`, accessKeyId: "a", secretAccessKey: "b" });
    await expect(s.get("x", { offset: 0, length: 2 ** 21 })).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    expect(requests).toBe(2); // the worker's, then the SDK's
    expect(s.fetcher!.served).toBe(0);
    s.close();
    cut.close();
  });

  it("the worker reads a response however it is cut, asks again when a kept connection was closed, and leaves other answers to the SDK", async () => {
    const byte = (i: number) => (i * 7 + (i >> 12)) & 255;
    const bodyOf = (a: number, b: number) => Buffer.from(Array.from({ length: b - a + 1 }, (_, k) => byte(a + k)));
    let chunked = false;
    let connections = 0;
    let requests = 0;
    const fake = createServer((sock) => {
      connections++;
      sock.on("error", () => undefined); // the worker and the SDK close connections their own way
      let seen = 0;
      let buf = "";
      sock.on("data", async (d: Buffer) => {
        buf += d.toString("latin1");
        const end = buf.indexOf("\r\n\r\n");
        if (end < 0) return;
        const head = buf.slice(0, end);
        buf = buf.slice(end + 4);
        requests++;
        // A server that timed out a kept connection: the next request on it finds it closed.
        if (++seen > 1) return void sock.destroy();
        const [, a, b] = /range: bytes=(\d+)-(\d+)/i.exec(head)!;
        const body = bodyOf(Number(a), Number(b));
        if (chunked) {
          sock.write(`HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\nContent-Range: bytes ${a}-${b}/${16 * 2 ** 20}\r\n\r\n`);
          sock.write(`${body.length.toString(16)}\r\n`);
          sock.write(body);
          sock.write("\r\n0\r\n\r\n");
          return;
        }
        // The header in pieces of 5 bytes, the body in odd pieces.
        const header = Buffer.from(`HTTP/1.1 206 Partial Content\r\nContent-Length: ${body.length}\r\nContent-Range: bytes ${a}-${b}/${16 * 2 ** 20}\r\n\r\n`);
        for (let i = 0; i < header.length; i += 5) {
          sock.write(header.subarray(i, i + 5));
          await new Promise((r) => setTimeout(r, 1));
        }
        for (const [x, y] of [[0, 1], [1, 4096], [4096, 70_001], [70_001, body.length]] as const) {
          sock.write(body.subarray(x, y));
          await new Promise((r) => setTimeout(r, 2));
        }
      });
    });
    const port = await new Promise<number>((r) => fake.listen(0, "127.0.0.1", () => r((fake.address() as { port: number }).port)));
    const s = S3ObjectStore.fromUrl("s3://b/", { endpoint: `http://127.0.0.1:${port}`, accessKeyId: "a", secretAccessKey: "b" });
    try {
      const r1 = { offset: 5, length: 2 ** 21 + 3 };
      expect(Buffer.from(await s.get("x", r1)).equals(bodyOf(r1.offset, r1.offset + r1.length - 1))).toBe(true);
      expect(s.fetcher!.served).toBe(1);
      // The kept connection is closed on the next request: the worker asks again on a new one.
      const r2 = { offset: 3 * 2 ** 20, length: 2 ** 20 };
      expect(Buffer.from(await s.get("x", r2)).equals(bodyOf(r2.offset, r2.offset + r2.length - 1))).toBe(true);
      expect(s.fetcher!.served).toBe(2);
      expect([connections, requests]).toEqual([2, 3]);

      // A chunked body is not one the worker takes: the SDK's own GET answers.
      chunked = true;
      const r3 = { offset: 11, length: 2 ** 20 };
      expect(Buffer.from(await s.get("x", r3)).equals(bodyOf(r3.offset, r3.offset + r3.length - 1))).toBe(true);
      expect(s.fetcher!.served).toBe(2);
    } finally {
      s.close();
      fake.close();
    }
  });

  it("rejects urls that are not s3://bucket/prefix", () => {
    expect(() => S3ObjectStore.fromUrl("http://x/y")).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
    expect(S3ObjectStore.fromUrl("s3://b/p").url).toBe("s3://b/p/");
    expect(S3ObjectStore.fromUrl("s3://b").url).toBe("s3://b/");
  });
});
