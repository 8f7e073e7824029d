import { VolumeError } from "../errors.js";
import type { ByteRange } from "./types.js";

/**
 * Throws INVALID_ARGUMENT unless `key` is a legal object key: non-empty `/`-separated segments,
 * none empty, `.` or `..`, and no NUL byte.
 */
export function checkKey(key: string, op: string): void {
  let why: string | undefined;
  if (typeof key !== "string" || key.length === 0) why = "empty key";
  else if (key.includes("\0")) why = "key contains a NUL byte";
  else {
    for (const seg of key.split("/")) {
      if (seg === "" || seg === "." || seg === "..") {
        why = "key has an empty, '.' or '..' segment";
        break;
      }
    }
  }
  if (why !== undefined) {
    throw new VolumeError("INVALID_ARGUMENT", `${op} ${JSON.stringify(key)}: ${why}`, {
      op,
      path: key,
      hint: "object keys are non-empty '/'-separated segments, none empty, '.' or '..'",
    });
  }
}

/** Throws INVALID_ARGUMENT unless `range` has a non-negative integer offset and length. */
export function checkRange(range: ByteRange, key: string, op: string): void {
  const ok =
    Number.isSafeInteger(range.offset) && range.offset >= 0 && Number.isSafeInteger(range.length) && range.length >= 0;
  if (!ok) {
    throw new VolumeError(
      "INVALID_ARGUMENT",
      `${op} ${JSON.stringify(key)}: bad range offset=${range.offset} length=${range.length}`,
      { op, path: key },
    );
  }
}

/** The HTTP Range header of a non-empty range: `bytes=first-last`. */
export function rangeHeader(offset: number, length: number): string {
  return `bytes=${offset}-${offset + length - 1}`;
}
