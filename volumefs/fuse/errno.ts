/**
 * The one place where errors become errno values for the kernel. The mapping of VolumeError codes
 * is the one documented in vfs/mount-types.ts; Node's own errors (`err.code` like "ENOENT", from
 * a pass-through to local disk) keep their errno.
 */
import { constants } from "node:os";
import { StrataError } from "../../metadata/index.js";
import type { VolumeErrorCode } from "../errors.js";

const E = constants.errno;

const BY_CODE: Record<VolumeErrorCode, number> = {
  NOT_FOUND: E.ENOENT,
  ALREADY_EXISTS: E.EEXIST,
  NOT_A_DIRECTORY: E.ENOTDIR,
  IS_A_DIRECTORY: E.EISDIR,
  NOT_EMPTY: E.ENOTEMPTY,
  READ_ONLY: E.EROFS,
  INVALID_PATH: E.EINVAL,
  INVALID_NAME: E.EINVAL,
  INVALID_ARGUMENT: E.EINVAL,
  NO_ATTRIBUTE: E.ENODATA,
  NOT_SUPPORTED: E.ENOTSUP,
  PERMISSION: E.EPERM,
  ACCESS_DENIED: E.EACCES,
  CORRUPT: E.EIO,
  IO: E.EIO,
  STORE_UNREACHABLE: E.EIO,
  BAD_HANDLE: E.EBADF,
  UNKNOWN_VOLUME: E.ENOENT,
  UNKNOWN_VERSION: E.ENOENT,
  AMBIGUOUS_VERSION: E.EINVAL,
  CONFLICT: E.EBUSY,
  PRECONDITION_FAILED: E.EBUSY,
};

/** The marker a VolumeError INVALID_PATH carries in `details` when a name is over NAME_MAX bytes. */
export const NAME_TOO_LONG = "name-too-long";

function nameTooLong(details: unknown): boolean {
  if (details === NAME_TOO_LONG) return true;
  if (details && typeof details === "object") {
    const d = details as { reason?: unknown; kind?: unknown };
    return d.reason === NAME_TOO_LONG || d.kind === NAME_TOO_LONG;
  }
  return false;
}

/**
 * The negative errno fuse-native expects for `err`: a VolumeError by its code (INVALID_PATH with
 * "name-too-long" details → ENAMETOOLONG), a Node system error by its `code`, anything else EIO.
 */
export function toErrno(err: unknown): number {
  if (err instanceof StrataError) {
    if (err.code === "INVALID_PATH" && nameTooLong(err.details)) return -E.ENAMETOOLONG;
    const n = BY_CODE[err.code as VolumeErrorCode];
    return -(n ?? E.EIO);
  }
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  if (typeof code === "string") {
    const n = (E as Record<string, number>)[code];
    if (typeof n === "number") return -n;
  }
  return -E.EIO;
}
