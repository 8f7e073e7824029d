import { StrataError, causeText, type StrataErrorContext } from "../metadata/index.js";

export type VolumeErrorCode =
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "INVALID_NAME"
  | "INVALID_PATH"
  | "INVALID_ARGUMENT"
  | "NOT_A_DIRECTORY"
  | "IS_A_DIRECTORY"
  | "NOT_EMPTY"
  | "UNKNOWN_VOLUME"
  | "UNKNOWN_VERSION"
  | "AMBIGUOUS_VERSION"
  | "CONFLICT"
  | "CORRUPT"
  | "READ_ONLY"
  | "STORE_UNREACHABLE"
  | "ACCESS_DENIED"
  | "PRECONDITION_FAILED"
  | "NO_ATTRIBUTE"
  | "NOT_SUPPORTED"
  | "PERMISSION"
  | "BAD_HANDLE"
  | "IO";

/** Errors of the volumefs layer: object stores, chunks, trees, sync, the mount. */
export class VolumeError extends StrataError {
  declare readonly code: VolumeErrorCode;

  constructor(code: VolumeErrorCode, message: string, ctx: StrataErrorContext = {}) {
    super(code, message, ctx);
  }

  static NOT_FOUND(what: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("NOT_FOUND", `${ctx.op ?? "find"} ${what}: not found`, ctx);
  }
  static ALREADY_EXISTS(what: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("ALREADY_EXISTS", `${ctx.op ?? "create"} ${what}: already exists`, ctx);
  }
  static INVALID_NAME(name: string, why: string): VolumeError {
    return new VolumeError("INVALID_NAME", `check volume name ${JSON.stringify(name)}: ${why}`, {
      hint: "use 1-255 bytes with no '/' and no control characters, other than '.' and '..'",
    });
  }
  static INVALID_PATH(path: string, why: string): VolumeError {
    return new VolumeError("INVALID_PATH", `check path ${JSON.stringify(path)}: ${why}`, {
      path,
      hint: "paths are relative to the volume root and may not leave it",
    });
  }
  static NOT_A_DIRECTORY(path: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("NOT_A_DIRECTORY", `${ctx.op ?? "open"} ${JSON.stringify(path)}: not a directory`, { path, ...ctx });
  }
  static IS_A_DIRECTORY(path: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("IS_A_DIRECTORY", `${ctx.op ?? "open"} ${JSON.stringify(path)}: is a directory`, { path, ...ctx });
  }
  static UNKNOWN_VOLUME(name: string): VolumeError {
    return new VolumeError("UNKNOWN_VOLUME", `open volume ${JSON.stringify(name)}: no such volume`, {
      volume: name,
      hint: "list volumes with `strata volume ls` or create one with `strata volume create NAME`",
    });
  }
  static UNKNOWN_VERSION(ref: string, volume?: string): VolumeError {
    return new VolumeError("UNKNOWN_VERSION", `resolve version ${JSON.stringify(ref)}: no such version${volume ? ` of volume ${JSON.stringify(volume)}` : ""}`, {
      volume,
      hint: "list versions with `strata log NAME`",
    });
  }
  static CORRUPT(what: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("CORRUPT", `${ctx.op ?? "read"} ${what}: content does not match its hash`, {
      hint: "run `strata fsck` to find damaged objects",
      ...ctx,
    });
  }
  static PRECONDITION_FAILED(what: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("PRECONDITION_FAILED", `${ctx.op ?? "put"} ${what}: precondition failed`, ctx);
  }
  static READ_ONLY(what: string, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("READ_ONLY", `${ctx.op ?? "write"} ${what}: read-only`, ctx);
  }
  static STORE_UNREACHABLE(op: string, cause: unknown, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("STORE_UNREACHABLE", `${op}: store unreachable: ${causeText(cause)}`, {
      op,
      cause,
      retryable: true,
      hint: "check STRATA_STORE and STRATA_S3_ENDPOINT, and that the server is running",
      ...ctx,
    });
  }
  static ACCESS_DENIED(op: string, cause: unknown, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("ACCESS_DENIED", `${op}: access denied: ${causeText(cause)}`, {
      op,
      cause,
      hint: "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
      ...ctx,
    });
  }
  static IO(op: string, cause: unknown, ctx: StrataErrorContext = {}): VolumeError {
    return new VolumeError("IO", `${op}: ${causeText(cause)}`, { op, cause, ...ctx });
  }
}
