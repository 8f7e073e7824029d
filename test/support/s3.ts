/**
 * S3 for tests: the server the global setup started (or STRATA_TEST_S3_ENDPOINT), and fresh
 * buckets on it.
 *
 * ```ts
 * const { store, cleanup } = await makeTestS3Store();
 * afterAll(cleanup);
 * ```
 */
import { randomBytes } from "node:crypto";
import { DeleteBucketCommand } from "@aws-sdk/client-s3";
import { inject } from "vitest";
import { S3ObjectStore, withRetry, type ObjectStore, type S3ObjectStoreOptions } from "../../volumefs/object/index.js";
import type { S3TestProvided } from "./global-setup.js";

/** Connection settings of the test S3 server. */
export interface S3TestConfig {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
}

function provided(): S3TestProvided {
  try {
    return inject("strataS3");
  } catch {
    return {};
  }
}

/** True only when STRATA_SKIP_S3=1 was set explicitly: then (and only then) S3 tests may skip. */
export function s3Skipped(): boolean {
  return process.env.STRATA_SKIP_S3 === "1";
}

/**
 * The test server's settings. Throws (so the calling test fails) when the global setup could not
 * start a server, with the failing step and its log tail.
 */
export function s3TestConfig(): S3TestConfig {
  const p = provided();
  const env = process.env;
  const endpoint = p.endpoint ?? env.STRATA_TEST_S3_ENDPOINT;
  if (endpoint === undefined || endpoint === "") {
    const why = p.error ?? env.STRATA_TEST_S3_ERROR ?? (s3Skipped() ? "STRATA_SKIP_S3=1 is set" : "the global setup did not run");
    throw new Error(`get test s3 server: none available: ${why}`);
  }
  return {
    endpoint,
    accessKeyId: p.accessKeyId ?? env.STRATA_TEST_S3_ACCESS_KEY_ID ?? "",
    secretAccessKey: p.secretAccessKey ?? env.STRATA_TEST_S3_SECRET_ACCESS_KEY ?? "",
    region: p.region ?? env.STRATA_TEST_S3_REGION ?? "us-east-1",
  };
}

/** A fresh bucket on the test server. */
export interface TestS3Store {
  /** The raw store (no retries), for checks of error translation. */
  s3: S3ObjectStore;
  /** `s3` wrapped in `withRetry`. */
  store: ObjectStore;
  bucket: string;
  config: S3TestConfig;
  /** Empties and deletes the bucket, closes the client. Idempotent. */
  cleanup(): Promise<void>;
}

/** Creates a uniquely named bucket and a store on it (optionally under `prefix`). */
export async function makeTestS3Store(opts: { prefix?: string } & S3ObjectStoreOptions = {}): Promise<TestS3Store> {
  const config = s3TestConfig();
  const bucket = `strata-test-${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;
  const { prefix, ...s3opts } = opts;
  const s3 = S3ObjectStore.fromUrl(`s3://${bucket}/${prefix ?? ""}`, { ...config, ...s3opts });
  await s3.ensureBucket();
  let done = false;
  return {
    s3,
    store: withRetry(s3),
    bucket,
    config,
    async cleanup() {
      if (done) return;
      done = true;
      const root = S3ObjectStore.fromUrl(`s3://${bucket}`, config);
      try {
        const keys: string[] = [];
        for await (const o of root.list("")) keys.push(o.key);
        await root.delete(keys);
        await root.client.send(new DeleteBucketCommand({ Bucket: bucket }));
      } finally {
        root.close();
        s3.close();
      }
    },
  };
}
