/**
 * Translation of better-sqlite3 errors into MetadataError, for the SQLite adapter only.
 */
import { MetadataError } from "./errors.js";

/** The SQLite result code of a thrown value (e.g. "SQLITE_BUSY_SNAPSHOT"), or undefined. */
export function sqliteCode(err: unknown): string | undefined {
  const code: unknown = err instanceof Error ? (err as Error & { code?: unknown }).code : undefined;
  if (typeof code === "string" && code.startsWith("SQLITE_")) return code;
  return undefined;
}

/** True for SQLITE_BUSY* and SQLITE_LOCKED*: another connection holds a lock; retrying may succeed. */
export function isBusy(err: unknown): boolean {
  const code = sqliteCode(err);
  return code !== undefined && (code.startsWith("SQLITE_BUSY") || code.startsWith("SQLITE_LOCKED"));
}

/**
 * A MetadataError for any value thrown while running `op`: MetadataErrors pass through,
 * busy/locked become BUSY, corrupt or non-database files become CORRUPT, the rest IO.
 */
export function toMetadataError(op: string, err: unknown): MetadataError {
  if (err instanceof MetadataError) return err;
  if (isBusy(err)) return MetadataError.BUSY(op, err);
  const code = sqliteCode(err);
  if (code === "SQLITE_CORRUPT" || code === "SQLITE_NOTADB" || code?.startsWith("SQLITE_CORRUPT")) {
    return new MetadataError("CORRUPT", `${op}: database corrupt: ${(err as Error).message}`, {
      op,
      cause: err,
      hint: "rebuild the metadata from the bucket with `strata fsck --rebuild`",
    });
  }
  return MetadataError.IO(op, err);
}
