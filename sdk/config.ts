import { homedir } from "node:os";
import { join, resolve } from "node:path";
import { StrataError } from "../metadata/index.js";

/** Strata's configuration: one typed object, read from `STRATA_*` and `AWS_*` variables here only. */
export interface StrataConfig {
  /** Where metadata, the local object directory and the chunk cache live. `STRATA_HOME`, default `~/.strata`. */
  home: string;
  /** The object store: `file:///abs/path` (default `<home>/objects`) or `s3://bucket/prefix`. `STRATA_STORE`. */
  store: string;
  /** The environment (tenant). `STRATA_ENV`, default "main". */
  env: string;
  /** S3 settings, used when `store` is `s3://…`. */
  s3: {
    /** `STRATA_S3_ENDPOINT` (or `AWS_ENDPOINT_URL`), e.g. http://127.0.0.1:7480. */
    endpoint?: string;
    /** `AWS_REGION`, default us-east-1. */
    region?: string;
    /** `AWS_ACCESS_KEY_ID`. */
    accessKeyId?: string;
    /** `AWS_SECRET_ACCESS_KEY`. */
    secretAccessKey?: string;
  };
  /** The host-wide chunk cache directory. `STRATA_CACHE_DIR`, default `<home>/cache`. */
  cacheDir: string;
  /** The chunk cache bound in bytes. `STRATA_CACHE_SIZE` (e.g. 10G, 512M), default 10 GiB. */
  cacheBytes: number;
}

/** Parses a size like "10G", "512M", "1Gi", "4096" into bytes. Throws INVALID_ARGUMENT. */
export function parseSize(text: string, what = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$/i.exec(text);
  if (!m) throw new StrataError("INVALID_ARGUMENT", `parse ${what} ${JSON.stringify(text)}: not a size`, { hint: "use a number with an optional K, M, G or T suffix, e.g. 10G" });
  const mult = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[m[2]!.toLowerCase() as "" | "k" | "m" | "g" | "t"];
  return Math.floor(Number(m[1]) * mult);
}

/** Reads the configuration from environment variables (and explicit overrides). */
export function loadConfig(env: NodeJS.ProcessEnv = process.env, overrides: Partial<StrataConfig> = {}): StrataConfig {
  const home = resolve(overrides.home ?? env.STRATA_HOME ?? join(homedir(), ".strata"));
  let store = overrides.store ?? env.STRATA_STORE ?? `file://${join(home, "objects")}`;
  if (!/^[a-z0-9]+:\/\//.test(store)) store = `file://${resolve(store)}`;
  if (!store.startsWith("file://") && !store.startsWith("s3://")) {
    throw new StrataError("INVALID_ARGUMENT", `read STRATA_STORE ${JSON.stringify(store)}: unknown scheme`, { hint: "use s3://BUCKET/PREFIX or a local directory" });
  }
  return {
    home,
    store,
    env: overrides.env ?? env.STRATA_ENV ?? "main",
    s3: {
      endpoint: env.STRATA_S3_ENDPOINT ?? env.AWS_ENDPOINT_URL,
      region: env.AWS_REGION ?? env.AWS_DEFAULT_REGION,
      accessKeyId: env.AWS_ACCESS_KEY_ID,
      secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
      ...(overrides.s3 ?? {}),
    },
    cacheDir: resolve(overrides.cacheDir ?? env.STRATA_CACHE_DIR ?? join(home, "cache")),
    cacheBytes: overrides.cacheBytes ?? (env.STRATA_CACHE_SIZE ? parseSize(env.STRATA_CACHE_SIZE, "STRATA_CACHE_SIZE") : 10 * 1024 ** 3),
  };
}
