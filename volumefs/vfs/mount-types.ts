/**
 * The seam between a mounted volume (vfs) and the FUSE adapter (fuse): a path-based POSIX file
 * system over one volume at a base version plus a durable local staging layer.
 *
 * Paths are absolute inside the mount ("/", "/a/b"). Every method is async and fails with a
 * VolumeError whose code the adapter maps to an errno in one place (`toErrno` in fuse/):
 * NOT_FOUND→ENOENT, ALREADY_EXISTS→EEXIST, NOT_A_DIRECTORY→ENOTDIR, IS_A_DIRECTORY→EISDIR,
 * NOT_EMPTY→ENOTEMPTY, READ_ONLY→EROFS, INVALID_PATH→EINVAL (ENAMETOOLONG when `details` says
 * "name-too-long"), INVALID_ARGUMENT→EINVAL, NO_ATTRIBUTE→ENODATA, NOT_SUPPORTED→ENOTSUP,
 * PERMISSION→EPERM, CORRUPT/IO/STORE_UNREACHABLE→EIO, BAD_HANDLE→EBADF.
 */
import { constants } from "node:fs";
import type { ConflictPolicy } from "./build.js";

/** Attributes of one file, as stat(2) wants them. Times are ms since the epoch. */
export interface FileAttr {
  kind: "file" | "dir" | "symlink";
  /** Permission bits (0o7777), without the file type. */
  mode: number;
  size: number;
  mtime: number;
  atime: number;
  ctime: number;
  nlink: number;
  uid: number;
  gid: number;
  /** True when the file's bytes and attributes come from the immutable base version. */
  immutable: boolean;
  /** Names the content: equal tags mean equal bytes. Absent when unknown. */
  tag?: string;
  /** Whether the entry has extended attributes. Absent when unknown. */
  xattrs?: boolean;
  /**
   * True when another name shares the file's bytes (a hard link not yet synced): a change
   * through that name changes this file too, so its attributes and pages must not be cached.
   */
  shared?: boolean;
}

/** What `status` reports. */
export interface MountStatus {
  volume: string;
  /** The base version id (null for an empty volume). */
  base: string | null;
  readOnly: boolean;
  staged: { added: string[]; modified: string[]; removed: string[] };
}

/** Options of a sync from the mount. */
export interface MountSyncOptions {
  message?: string;
  onConflict?: ConflictPolicy;
  labels?: Record<string, string>;
}

/** Result of a sync from the mount. */
export interface MountSyncResult {
  /** The new base (and head) version id. */
  version: string | null;
  changed: boolean;
  conflicts: string[];
}

/**
 * True when an open(2) with `flags` may change the file: write access, or O_TRUNC, which
 * truncates a regular file even when it is opened for reading only (and needs write permission,
 * as on Linux).
 */
export function opensToChange(flags: number): boolean {
  return (flags & 3) !== constants.O_RDONLY || (flags & constants.O_TRUNC) !== 0;
}

/** A POSIX file system over a volume; what the FUSE adapter calls. */
export interface MountFs {
  getattr(path: string): Promise<FileAttr>;
  /** Attributes of a path, or undefined when nothing is there (what getattr would fail NOT_FOUND for). Optional; cheaper than a thrown error on hot paths. */
  lookup?(path: string): Promise<FileAttr | undefined>;
  /** Attributes of an open file, also after its name was removed. Optional. */
  fgetattr?(fh: number): Promise<FileAttr>;
  /** Names in a directory (without "." and ".."). */
  readdir(path: string): Promise<string[]>;
  readlink(path: string): Promise<string>;
  /** Opens an existing file; returns a handle. `flags` are open(2) flags (O_TRUNC, O_APPEND, O_WRONLY…); O_TRUNC truncates whatever the access mode. */
  open(path: string, flags: number): Promise<number>;
  /** Creates and opens a file (EEXIST with O_EXCL when it exists; an existing file is opened as `open` does). */
  create(path: string, mode: number, flags: number): Promise<number>;
  /** Up to `length` bytes at `position`; fewer at end of file. */
  read(fh: number, length: number, position: number): Promise<Uint8Array>;
  /**
   * The bytes `read` gives, as consecutive pieces (the adapter writes them without joining them),
   * good only until the current task ends: the adapter writes them out at once. Optional.
   */
  readv?(fh: number, length: number, position: number): Promise<Uint8Array[]>;
  /**
   * Writes `data` at `position` (at the end with O_APPEND); returns bytes written. `data` is
   * lent: the caller reuses its memory once the promise settles, so nothing may keep it.
   */
  write(fh: number, data: Uint8Array, position: number): Promise<number>;
  truncate(path: string, size: number): Promise<void>;
  ftruncate(fh: number, size: number): Promise<void>;
  /** close(2) of a descriptor. Must need no work: adapters may tell the kernel to skip it (durability is `fsync`'s). */
  flush(fh: number): Promise<void>;
  fsync(fh: number, datasync: boolean): Promise<void>;
  /** Optional: fsync(2) of a directory, which forces its names (their journal lines) to the disk. */
  fsyncdir?(): Promise<void>;
  release(fh: number): Promise<void>;
  /**
   * Optional: a descriptor of a local file holding exactly the bytes of open file `fh`, which
   * the kernel may then read directly for this open (a backing file), or undefined when the open
   * must be served. The caller owns the descriptor. Asked only while no other open of the file
   * is served. For an open that may write, the descriptor (read-write) is the file's own bytes:
   * the kernel writes through it without asking, and the file system learns of it from the file
   * (its attributes are then asked for as usual). Otherwise a change to the file's bytes while
   * backed opens remain goes to a new node.
   */
  backingFd?(fh: number): Promise<number | undefined>;
  /** Optional: the kernel refused the backing file of open `fh` (which is served); no more are asked for (copies made for them can stop). */
  backingRefused?(fh: number): void;
  /** Optional: the kernel takes backing files for opens that write; new files should be made so that `backingFd` can give one. */
  kernelWrites?(): void;
  unlink(path: string): Promise<void>;
  mkdir(path: string, mode: number): Promise<void>;
  rmdir(path: string): Promise<void>;
  /** rename(2): atomic, replaces a file or an empty directory at `dst`. */
  rename(src: string, dst: string): Promise<void>;
  symlink(target: string, path: string): Promise<void>;
  /** A hard link: a second name for the same content. */
  link(src: string, dst: string): Promise<void>;
  chmod(path: string, mode: number): Promise<void>;
  chown(path: string, uid: number, gid: number): Promise<void>;
  utimens(path: string, atime: number, mtime: number): Promise<void>;
  setxattr(path: string, name: string, value: Uint8Array, flags: number): Promise<void>;
  getxattr(path: string, name: string): Promise<Uint8Array>;
  /** The value of an extended attribute, or undefined when it has none by that name (what getxattr would fail NO_ATTRIBUTE for). Optional. */
  xattr?(path: string, name: string): Promise<Uint8Array | undefined>;
  listxattr(path: string): Promise<string[]>;
  removexattr(path: string, name: string): Promise<void>;
  statfs(): Promise<{ blocks: number; bfree: number; bavail: number; files: number; ffree: number; bsize: number; namemax: number }>;

  /** Commits the staged changes as one version (CAS + rebase) and moves the base to it. */
  sync(opts?: MountSyncOptions): Promise<MountSyncResult>;
  /** Moves the base to the volume's newest head; refuses (CONFLICT-free error) while changes are staged unless `discard`. */
  reload(opts?: { discard?: boolean }): Promise<string | null>;
  status(): Promise<MountStatus>;
  /**
   * Registers `listener`, called after the tree changed other than through this file system's
   * own calls (a reload, or a sync that took in other writers' versions), so that an adapter can
   * drop what the kernel cached. The base move resolves only after the listener's promise.
   * Optional.
   */
  onExternalChange?(listener: () => Promise<void>): void;
  /**
   * Whether a file whose tag (FileAttr.tag) was `before` and is now `after` has the same bytes:
   * a staged file that the last sync stored as it was. An adapter then keeps what it cached of
   * the file across that sync's base move. Optional.
   */
  sameBytes?(before: string, after: string): boolean;
  /** Flushes staging to disk and releases resources; idempotent. */
  close(): Promise<void>;
}
