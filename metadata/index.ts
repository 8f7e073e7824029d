/**
 * metadata: version metadata in SQLite — volumes, the version DAG, trees, the chunk index, packs.
 *
 * ```ts
 * import { SqliteMetadataStore } from "../metadata/index.js";
 * const meta = SqliteMetadataStore.open({ path: "/root/.strata/meta.db" });
 * await meta.createVolume({ env: "main", name: "data", head: null, forkedFrom: null, createdAt: Date.now() });
 * ```
 *
 * The bottom layer: imports nothing of ours. It also holds `StrataError`, the base of every
 * layer's error class.
 */
export * from "./errors.js";
export * from "./types.js";
export { loadSqlite, SqliteMetadataStore, type SqliteMetadataStoreOptions } from "./sqlite-metadata-store.js";
export { MIGRATIONS, LATEST_SCHEMA_VERSION, migrate, schemaVersion, type Migration } from "./migrations.js";
