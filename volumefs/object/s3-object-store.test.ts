import { createServer, type Server } from "node:net";
import { describe, it, expect, afterAll } from "vitest";
import { makeTestS3Store, s3Skipped, s3TestConfig } from "../../test/support/s3.js";
import { describeObjectStore } from "./conformance.js";
import { S3ObjectStore } from "./s3-object-store.js";

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

  it("rejects urls that are not s3://bucket/prefix", () => {
    expect(() => S3ObjectStore.fromUrl("http://x/y")).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
    expect(S3ObjectStore.fromUrl("s3://b/p").url).toBe("s3://b/p/");
    expect(S3ObjectStore.fromUrl("s3://b").url).toBe("s3://b/");
  });
});
