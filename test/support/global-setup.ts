/**
 * vitest globalSetup: one real S3 server (Ceph RGW, see ./rgw.ts) for the whole run.
 *
 * Unless STRATA_TEST_S3_ENDPOINT is set (use that server) or STRATA_SKIP_S3=1, starts or reuses
 * an RGW on 127.0.0.1:7480 (STRATA_TEST_RGW_PORT to change) and hands its config to tests with
 * `provide("strataS3", …)` and to child processes with STRATA_TEST_S3_* variables. A failed start
 * does not abort the run: it is handed on as `error`, and `s3TestConfig()` throws it, so exactly
 * the S3 tests fail, loudly. At teardown the server is released (killed if this run started it
 * and no other run uses it).
 */
import type { TestProject } from "vitest/node";
import { startRgw, type RgwHandle } from "./rgw.js";

/** What tests receive through `inject("strataS3")`. */
export interface S3TestProvided {
  endpoint?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  region?: string;
  /** Why no server is available (start failure); tests must fail with it. */
  error?: string;
  /** True when STRATA_SKIP_S3=1: S3 tests may skip. */
  skip?: boolean;
}

declare module "vitest" {
  export interface ProvidedContext {
    strataS3: S3TestProvided;
  }
}

export default async function setup(project: TestProject): Promise<() => Promise<void>> {
  process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
  let handle: RgwHandle | undefined;
  let provided: S3TestProvided;
  const env = process.env;
  if (env.STRATA_SKIP_S3 === "1") {
    provided = { skip: true };
  } else if (env.STRATA_TEST_S3_ENDPOINT) {
    provided = {
      endpoint: env.STRATA_TEST_S3_ENDPOINT,
      accessKeyId: env.STRATA_TEST_S3_ACCESS_KEY_ID ?? env.AWS_ACCESS_KEY_ID,
      secretAccessKey: env.STRATA_TEST_S3_SECRET_ACCESS_KEY ?? env.AWS_SECRET_ACCESS_KEY,
      region: env.STRATA_TEST_S3_REGION ?? env.AWS_REGION ?? "us-east-1",
    };
  } else {
    try {
      handle = await startRgw({ port: Number(env.STRATA_TEST_RGW_PORT ?? 7480) });
      provided = {
        endpoint: handle.endpoint,
        accessKeyId: handle.accessKeyId,
        secretAccessKey: handle.secretAccessKey,
        region: handle.region,
      };
    } catch (err) {
      provided = { error: err instanceof Error ? err.message : String(err) };
    }
  }
  if (provided.endpoint !== undefined) {
    env.STRATA_TEST_S3_ENDPOINT = provided.endpoint;
    env.STRATA_TEST_S3_ACCESS_KEY_ID = provided.accessKeyId ?? "";
    env.STRATA_TEST_S3_SECRET_ACCESS_KEY = provided.secretAccessKey ?? "";
    env.STRATA_TEST_S3_REGION = provided.region ?? "us-east-1";
  }
  if (provided.error !== undefined) env.STRATA_TEST_S3_ERROR = provided.error;
  project.provide("strataS3", provided);
  return async () => {
    await handle?.stop();
  };
}
