import { VolumeError } from "../errors.js";

/** Longest name of one path segment or volume name, in UTF-8 bytes (as NAME_MAX). */
export const NAME_MAX = 255;
/** Longest whole path inside a volume, in UTF-8 bytes (as PATH_MAX). */
export const PATH_MAX = 4096;
/** The top-level name reserved for the mount's control directory. */
export const RESERVED_NAME = ".strata";

/**
 * Checks a volume name: 1–255 bytes, no `/`, no NUL or control characters, not `.` or `..`.
 * Throws VolumeError INVALID_NAME.
 */
export function checkVolumeName(name: string): string {
  if (typeof name !== "string" || name.length === 0) throw VolumeError.INVALID_NAME(String(name ?? ""), "empty");
  if (Buffer.byteLength(name) > NAME_MAX) throw VolumeError.INVALID_NAME(name, `longer than ${NAME_MAX} bytes`);
  if (name === "." || name === "..") throw VolumeError.INVALID_NAME(name, "reserved name");
  if (name.includes("/")) throw VolumeError.INVALID_NAME(name, "contains '/'");
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(name)) throw VolumeError.INVALID_NAME(name, "contains a control character");
  return name;
}

/**
 * Normalizes a path inside a volume to its segments: leading `/`, `.` and repeated slashes are
 * dropped, `..` goes up one level. Throws INVALID_PATH for a path that leaves the root, has a
 * NUL byte, a segment over NAME_MAX bytes, or is over PATH_MAX bytes. The root is `[]`.
 */
export function splitPath(path: string): string[] {
  if (typeof path !== "string") throw VolumeError.INVALID_PATH(String(path), "not a string");
  if (path.includes("\u0000")) throw VolumeError.INVALID_PATH(path, "contains a NUL byte");
  if (Buffer.byteLength(path) > PATH_MAX) throw VolumeError.INVALID_PATH(path, `longer than ${PATH_MAX} bytes`);
  const out: string[] = [];
  for (const seg of path.split("/")) {
    if (seg === "" || seg === ".") continue;
    if (seg === "..") {
      if (out.length === 0) throw VolumeError.INVALID_PATH(path, "escapes the volume root");
      out.pop();
      continue;
    }
    if (Buffer.byteLength(seg) > NAME_MAX) throw VolumeError.INVALID_PATH(path, `a name is longer than ${NAME_MAX} bytes`);
    out.push(seg);
  }
  return out;
}

/** The canonical form of a path: segments joined by `/`, no leading slash; "" is the root. */
export function normalizePath(path: string): string {
  return splitPath(path).join("/");
}

/** Like splitPath, and refuses the root and the reserved `.strata` name at the top: for writes. */
export function splitWritablePath(path: string): string[] {
  const segs = splitPath(path);
  if (segs.length === 0) throw VolumeError.INVALID_PATH(path, "is the volume root");
  if (segs[0] === RESERVED_NAME) throw VolumeError.INVALID_PATH(path, `${RESERVED_NAME} is reserved for the mount's control files`);
  return segs;
}

/** Joins normalized path segments; "" for the root. */
export function joinPath(parent: string, name: string): string {
  return parent === "" ? name : `${parent}/${name}`;
}
