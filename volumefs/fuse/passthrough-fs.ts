/**
 * A `MountFs` that passes every call through to a local directory: the adapter's test double
 * that is a real file system, and the "minimal JS FUSE passthrough" line of the fs benchmark.
 * Local errors keep their Node `code` (ENOENT…), which `toErrno` maps one to one. No versions:
 * `sync` and `reload` do nothing, `status` reports nothing staged.
 */
import { constants, type Stats } from "node:fs";
import {
  chmod,
  chown,
  link,
  lstat,
  mkdir,
  open,
  readdir,
  readlink,
  rename,
  rmdir,
  statfs,
  symlink,
  truncate,
  unlink,
  lutimes,
  type FileHandle,
} from "node:fs/promises";
import { join } from "node:path";
import { VolumeError } from "../errors.js";
import type { FileAttr, MountFs, MountStatus, MountSyncResult } from "../vfs/mount-types.js";

/** Options of `PassthroughFs`. */
export interface PassthroughFsOptions {
  /** Refuse every change with READ_ONLY. Default false. */
  readOnly?: boolean;
}

/** A MountFs over the local directory `root`; paths never leave it. */
export class PassthroughFs implements MountFs {
  private readonly handles = new Map<number, FileHandle>();
  private nextFh = 1;

  constructor(
    readonly root: string,
    private readonly opts: PassthroughFsOptions = {},
  ) {}

  private real(path: string): string {
    if (path.split("/").includes("..")) throw VolumeError.INVALID_PATH(path, "escapes the root");
    return join(this.root, path);
  }

  private writable(path: string): string {
    if (this.opts.readOnly) throw VolumeError.READ_ONLY(JSON.stringify(path));
    return this.real(path);
  }

  private handle(fh: number): FileHandle {
    const h = this.handles.get(fh);
    if (!h) throw new VolumeError("BAD_HANDLE", `use handle ${fh}: not open`);
    return h;
  }

  private add(h: FileHandle): number {
    const fh = this.nextFh++;
    this.handles.set(fh, h);
    return fh;
  }

  async getattr(path: string): Promise<FileAttr> {
    return attrOf(await lstat(this.real(path)));
  }
  async fgetattr(fh: number): Promise<FileAttr> {
    return attrOf(await this.handle(fh).stat());
  }
  async readdir(path: string): Promise<string[]> {
    return readdir(this.real(path));
  }
  async readlink(path: string): Promise<string> {
    return readlink(this.real(path));
  }
  async open(path: string, flags: number): Promise<number> {
    const writes = (flags & 3) !== constants.O_RDONLY || (flags & constants.O_TRUNC) !== 0;
    return this.add(await open(writes ? this.writable(path) : this.real(path), flags & ~constants.O_CREAT));
  }
  async create(path: string, mode: number, flags: number): Promise<number> {
    return this.add(await open(this.writable(path), flags | constants.O_CREAT, mode));
  }
  async read(fh: number, length: number, position: number): Promise<Uint8Array> {
    const buf = Buffer.allocUnsafe(length);
    const { bytesRead } = await this.handle(fh).read(buf, 0, length, position);
    return buf.subarray(0, bytesRead);
  }
  async write(fh: number, data: Uint8Array, position: number): Promise<number> {
    const { bytesWritten } = await this.handle(fh).write(data, 0, data.length, position);
    return bytesWritten;
  }
  async truncate(path: string, size: number): Promise<void> {
    await truncate(this.writable(path), size);
  }
  async ftruncate(fh: number, size: number): Promise<void> {
    await this.handle(fh).truncate(size);
  }
  async flush(fh: number): Promise<void> {
    this.handle(fh);
  }
  async fsync(fh: number, datasync: boolean): Promise<void> {
    const h = this.handle(fh);
    await (datasync ? h.datasync() : h.sync());
  }
  async release(fh: number): Promise<void> {
    const h = this.handles.get(fh);
    this.handles.delete(fh);
    await h?.close();
  }
  async unlink(path: string): Promise<void> {
    await unlink(this.writable(path));
  }
  async mkdir(path: string, mode: number): Promise<void> {
    await mkdir(this.writable(path), { mode });
  }
  async rmdir(path: string): Promise<void> {
    await rmdir(this.writable(path));
  }
  async rename(src: string, dst: string): Promise<void> {
    await rename(this.writable(src), this.writable(dst));
  }
  async symlink(target: string, path: string): Promise<void> {
    await symlink(target, this.writable(path));
  }
  async link(src: string, dst: string): Promise<void> {
    await link(this.writable(src), this.writable(dst));
  }
  async chmod(path: string, mode: number): Promise<void> {
    await chmod(this.writable(path), mode);
  }
  async chown(path: string, uid: number, gid: number): Promise<void> {
    await chown(this.writable(path), uid, gid);
  }
  async utimens(path: string, atime: number, mtime: number): Promise<void> {
    await lutimes(this.writable(path), atime / 1000, mtime / 1000);
  }
  async setxattr(path: string): Promise<void> {
    throw new VolumeError("NOT_SUPPORTED", `set xattr of ${JSON.stringify(path)}: not supported by the pass-through`);
  }
  async getxattr(path: string): Promise<Uint8Array> {
    throw new VolumeError("NO_ATTRIBUTE", `get xattr of ${JSON.stringify(path)}: no such attribute`);
  }
  async listxattr(): Promise<string[]> {
    return [];
  }
  async removexattr(path: string): Promise<void> {
    throw new VolumeError("NO_ATTRIBUTE", `remove xattr of ${JSON.stringify(path)}: no such attribute`);
  }
  async statfs(): Promise<{ blocks: number; bfree: number; bavail: number; files: number; ffree: number; bsize: number; namemax: number }> {
    const s = await statfs(this.root);
    return { blocks: s.blocks, bfree: s.bfree, bavail: s.bavail, files: s.files, ffree: s.ffree, bsize: s.bsize, namemax: 255 };
  }
  async sync(): Promise<MountSyncResult> {
    return { version: null, changed: false, conflicts: [] };
  }
  async reload(): Promise<string | null> {
    return null;
  }
  async status(): Promise<MountStatus> {
    return { volume: this.root, base: null, readOnly: this.opts.readOnly === true, staged: { added: [], modified: [], removed: [] } };
  }
  async close(): Promise<void> {
    const hs = [...this.handles.values()];
    this.handles.clear();
    await Promise.all(hs.map((h) => h.close().catch(() => undefined)));
  }
}

function attrOf(st: Stats): FileAttr {
  return {
    kind: st.isDirectory() ? "dir" : st.isSymbolicLink() ? "symlink" : "file",
    mode: st.mode & 0o7777,
    size: st.size,
    mtime: st.mtimeMs,
    atime: st.atimeMs,
    ctime: st.ctimeMs,
    nlink: st.nlink,
    uid: st.uid,
    gid: st.gid,
    immutable: false,
  };
}
