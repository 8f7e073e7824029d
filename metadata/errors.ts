/**
 * The error base of every Strata layer.
 *
 * Each layer has one subclass (`MetadataError`, `VolumeError`, …) with a string-literal `code`
 * union and a static factory per code. Callers branch on `err.code`, never on the message.
 * Messages are lowercase "verb noun: cause"; `hint` tells a user what to do about it.
 */
export interface StrataErrorContext {
  /** The operation that failed, e.g. "sync volume" or "get object". */
  op?: string;
  /** The volume concerned, if any. */
  volume?: string;
  /** The path inside a volume, or an object key, concerned. */
  path?: string;
  /** One line telling the user how to recover. */
  hint?: string;
  /** The underlying error. */
  cause?: unknown;
  /** True when retrying the same call may succeed (timeouts, resets, 5xx, throttling). */
  retryable?: boolean;
  /** Extra structured detail (e.g. the list of conflicting paths). */
  details?: unknown;
}

export class StrataError extends Error {
  readonly code: string;
  readonly op: string | undefined;
  readonly volume: string | undefined;
  readonly path: string | undefined;
  readonly hint: string | undefined;
  readonly retryable: boolean;
  readonly details: unknown;

  constructor(code: string, message: string, ctx: StrataErrorContext = {}) {
    super(message, ctx.cause === undefined ? undefined : { cause: ctx.cause });
    this.name = new.target.name;
    this.code = code;
    this.op = ctx.op;
    this.volume = ctx.volume;
    this.path = ctx.path;
    this.hint = ctx.hint;
    this.retryable = ctx.retryable ?? false;
    this.details = ctx.details;
  }

  /** A one-line rendering for users: "message (CODE)"; the hint is separate. */
  oneLine(): string {
    return `${this.message} (${this.code})`;
  }
}

/** True when `err` is a StrataError with the given code. */
export function isCode(err: unknown, code: string): boolean {
  return err instanceof StrataError && err.code === code;
}

/** A short text for any thrown value, for "verb noun: cause" messages. */
export function causeText(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

export type MetadataErrorCode =
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "CONFLICT"
  | "BUSY"
  | "CORRUPT"
  | "SCHEMA_TOO_NEW"
  | "IO";

/** Errors of the metadata layer (SQLite). */
export class MetadataError extends StrataError {
  declare readonly code: MetadataErrorCode;

  constructor(code: MetadataErrorCode, message: string, ctx: StrataErrorContext = {}) {
    super(code, message, ctx);
  }

  static NOT_FOUND(what: string, ctx: StrataErrorContext = {}): MetadataError {
    return new MetadataError("NOT_FOUND", `find ${what}: not found`, ctx);
  }
  static ALREADY_EXISTS(what: string, ctx: StrataErrorContext = {}): MetadataError {
    return new MetadataError("ALREADY_EXISTS", `create ${what}: already exists`, ctx);
  }
  static BUSY(op: string, cause: unknown): MetadataError {
    return new MetadataError("BUSY", `${op}: database busy: ${causeText(cause)}`, {
      op,
      cause,
      retryable: true,
      hint: "another process holds the metadata database; retry",
    });
  }
  static SCHEMA_TOO_NEW(found: number, known: number): MetadataError {
    return new MetadataError(
      "SCHEMA_TOO_NEW",
      `open metadata: schema version ${found} is newer than this strata (${known})`,
      { hint: "upgrade strata to open this database" },
    );
  }
  static IO(op: string, cause: unknown): MetadataError {
    return new MetadataError("IO", `${op}: ${causeText(cause)}`, { op, cause });
  }
}
