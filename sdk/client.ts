import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { SqliteMetadataStore } from "../metadata/index.js";
import {
  blake3Hex,
  DiskChunkCache,
  FileCopyCache,
  FileObjectStore,
  Repository,
  S3ObjectStore,
  StagingDir,
  withRetry,
  type ObjectStore,
} from "../volumefs/index.js";
import { loadConfig, type StrataConfig } from "./config.js";

/**
 * A connection to one Strata store: the metadata database, the object store and the host-wide
 * chunk cache, per the configuration. Construction is explicit; `Strata.default()` is the one
 * built from the environment, shared by `Volume.open` and friends.
 */
export class Strata {
  private static shared: Strata | undefined;

  private constructor(
    readonly config: StrataConfig,
    readonly repo: Repository,
    private readonly cache: DiskChunkCache,
    /**
     * Whole-file copies that mounts let the kernel read directly, in `<cacheDir>/files`: a
     * quarter of the cache size, the chunk cache the rest.
     */
    readonly copies: FileCopyCache,
  ) {}

  /** Opens the store described by `config` (default: from the environment). */
  static connect(config: StrataConfig = loadConfig(), opts: { labels?: Record<string, string> } = {}): Strata {
    mkdirSync(config.home, { recursive: true });
    const objects = openObjectStore(config);
    const meta = SqliteMetadataStore.open({ path: metadataPath(config) });
    // One budget for the cache directory: copies a quarter, chunks the rest.
    const copyBytes = Math.floor(config.cacheBytes / 4);
    const cache = new DiskChunkCache({ dir: config.cacheDir, maxBytes: config.cacheBytes - copyBytes });
    const repo = new Repository({ meta, objects, cache, env: config.env, labels: opts.labels });
    const copies = new FileCopyCache({ dir: join(config.cacheDir, "files"), maxBytes: copyBytes });
    return new Strata(config, repo, cache, copies);
  }

  /** The client configured from the environment, made on first use. */
  static default(): Strata {
    Strata.shared ??= Strata.connect();
    return Strata.shared;
  }

  /** Closes the default client, if one was made. */
  static async closeDefault(): Promise<void> {
    const s = Strata.shared;
    Strata.shared = undefined;
    await s?.close();
  }

  /** Where this host keeps the staged changes of writable mounts: `<home>/staging`. */
  get stagingRoot(): string {
    return join(this.config.home, "staging");
  }

  /**
   * Removes volume `name` (its versions stay reachable from forks) and its staged changes on
   * this host, so that a later volume of the same name starts without them. Throws
   * UNKNOWN_VOLUME; ALREADY_EXISTS while it is mounted on this host; CONFLICT while changes are
   * staged for it here, unless `discard`.
   */
  async deleteVolume(name: string, opts: { discard?: boolean } = {}): Promise<void> {
    await this.repo.volume(name);
    StagingDir.remove(this.stagingRoot, this.repo.env, name, opts.discard === true);
    await this.repo.deleteVolume(name);
  }

  /** Closes the metadata database and the cache; idempotent. */
  async close(): Promise<void> {
    await this.repo.close();
    await this.cache.close();
  }
}

/**
 * The metadata database of a store: `<home>/meta.db` for the default local store, and one file
 * per other store URL (`<home>/meta-<hash>.db`), so that pointing STRATA_STORE elsewhere never
 * mixes two stores' metadata.
 */
export function metadataPath(config: StrataConfig): string {
  const local = `file://${join(config.home, "objects")}`;
  if (config.store === local) return join(config.home, "meta.db");
  return join(config.home, `meta-${blake3Hex(Buffer.from(config.store)).slice(0, 16)}.db`);
}

/** The object store a configuration names, with retries on transient failures. */
export function openObjectStore(config: StrataConfig): ObjectStore {
  if (config.store.startsWith("s3://")) {
    return withRetry(
      S3ObjectStore.fromUrl(config.store, {
        endpoint: config.s3.endpoint,
        region: config.s3.region,
        accessKeyId: config.s3.accessKeyId,
        secretAccessKey: config.s3.secretAccessKey,
      }),
    );
  }
  return new FileObjectStore(fileURLToPath(config.store));
}
