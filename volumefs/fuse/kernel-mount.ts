/**
 * Serves a path-based `MountFs` over the kernel FUSE protocol (kernel.ts): the node table that
 * turns the kernel's node ids into paths, the cache policy, and one handler per request.
 *
 * Cache policy. Every change to a mounted volume passes through this mount, except a base move
 * (a reload, or a sync that took in other writers' versions), which the MountFs announces through
 * `onExternalChange`. So names and attributes are cached by the kernel for a day, page cache is
 * kept across opens (FOPEN_KEEP_CACHE), and missing names are cached for a minute; after a base
 * move the session asks again for every node the kernel knows and invalidates exactly the
 * entries and inodes whose content changed, and every missing name it had let the kernel cache.
 * Control files under `/.strata/` (except the immutable `versions/` tree) are never cached:
 * their attributes expire at once and they are opened with direct I/O. A file whose bytes a
 * staged hard link shares with another name (FileAttr.shared) is not cached either: another
 * name's writes change it behind the kernel's back, so its attributes expire at once and its
 * pages are dropped at each open. The attribute replies the kernel keeps long are also kept in
 * the device's attribute table, for the reader thread's GETATTR answers (see attrsTouched).
 * For the same reason a directory made through this mount holds only names made by requests
 * since: the session puts each such name in the device's name filter before carrying the request
 * out, so the reader thread can answer the kernel's LOOKUP of any other name there (ENOENT, not
 * cached) without waking this thread (see namesMade). A base move forgets every made directory.
 *
 * Backing files. The MountFs may hold a local file with exactly a stored file's bytes
 * (`backingFd`: a whole-file copy); a read-only open of it then names that file, and the kernel
 * reads it without asking (see openReply). A change to the bytes of such a file while it is open
 * (a write open, a truncate, a link, a base move) gives its name a new node, so that the change
 * and new opens go to it while open ones keep the old bytes (see restale). A base move does so
 * also for a file it changes that is open for reading only: the opens keep their inode and pages.
 * A new file's bytes may be a local file too (MountFs.kernelWrites): its create, and later opens
 * that write it, name that file, and the kernel writes it without WRITE requests. While such an
 * open lasts (`backing.writers`), the node's attributes are never kept in the attribute table:
 * the kernel's writes change the size, and its GETATTR must reach the MountFs, which reads it from
 * the file.
 *
 * Node ids are never reused while the mount lives; a forgotten node keeps its id (and so its
 * inode number) for when the kernel looks the name up again.
 */
import { closeSync, constants as fsConstants } from "node:fs";
import { constants } from "node:os";
import { VolumeError } from "../errors.js";
import { NAME_MAX, RESERVED_NAME } from "../vfs/paths.js";
import { opensToChange, type FileAttr, type MountFs } from "../vfs/mount-types.js";
import { NAME_TOO_LONG, toErrno } from "./errno.js";
import {
  attrOut,
  cstring,
  direntSize,
  entryOut,
  Fattr,
  FOPEN_DIRECT_IO,
  FOPEN_KEEP_CACHE,
  FOPEN_PASSTHROUGH,
  FuseDevice,
  GETATTR_FH,
  Init,
  INIT_EXT,
  Init2,
  initOut,
  MAX_IO,
  negativeEntryOut,
  NOTIFY_INVAL_ENTRY,
  NOTIFY_INVAL_INODE,
  Op,
  FATTR_KILL_SUIDGID,
  OPEN_KILL_SUIDGID,
  WRITE_KILL_SUIDGID,
  openOut,
  sizeOut,
  u64,
  writeDirent,
  type KernelAttr,
  type Request,
} from "./kernel.js";

const E = constants.errno;
const O = fsConstants;
const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;
const ROOT = 1;

/**
 * WRITE bodies of at least this many bytes are copied out of the request slot into buffers the
 * session keeps and reuses (MountFs.write does not keep `data`), not into new ones: each new
 * buffer of a large write is memory outside the JS heap, and V8 collects garbage after every
 * 64 MiB of those, which a sequential write of a large file made many times a second.
 */
const KEPT_WRITE_MIN = 64 * 1024;
/** At most this many kept WRITE buffers (MAX_IO each). */
const KEPT_WRITE_BUFS = 16;

/** Cache time of names and attributes the mount itself keeps coherent, in seconds. */
const LONG = 86400;
/** Cache time of a missing name, in seconds. */
const NEGATIVE = 60;
/** Missing names tracked for invalidation at most; beyond it they are not cached. */
const MAX_NEGATIVE = 65536;
/** Forgotten nodes kept for their ids before the oldest leaves are dropped. */
const MAX_FORGOTTEN = 200_000;
const FOPEN_CACHE_DIR = 1 << 3;
/** close(2) sends no FLUSH: MountFs.flush needs no work by contract. */
const FOPEN_NOFLUSH = 1 << 5;
const RENAME_NOREPLACE = 1;
const DT_DIR = 4;

interface Node {
  id: number;
  /** null for the root and for a node whose name was removed. */
  parent: Node | null;
  name: string;
  /** Lookups the kernel holds. */
  lookups: number;
  children?: Map<string, Node>;
  /** Open file handles through this node (getattr of an unlinked open file uses one). */
  fhs?: Set<number>;
  /** What the kernel was last told: kind, size, mtime, mode, owner and content tag. */
  sig?: string;
  /** Permission bits last told to the kernel. */
  mode?: number;
  /** Another name shares the file's bytes (FileAttr.shared, or a LINK made here): nothing of it is cached. */
  shared?: boolean;
  /**
   * The backing file all its open handles share (`fhs`; let go with the last of them): the
   * kernel takes one backing file per inode at a time, and fails (EIO) an open that names
   * another, or none, while one is open (see openReply).
   */
  backing?: {
    id: number;
    /** Open handles that may write through it (the file's own bytes, not a copy): see openReply. */
    writers: number;
  };
  /** The kernel wrote the file through a backing file, past its page cache: served opens drop the cache. */
  wroteThrough?: boolean;
}

/** Options of `serveKernel`. */
export interface KernelServeOptions {
  /** Refuse every change (EROFS) except writes to the control files. */
  readOnly: boolean;
  /** The content never changes while mounted: cache directory listings too. */
  immutable: boolean;
  /** Log each failed call on stderr. */
  debug: boolean;
  /** Count calls and time them per operation, in `stats`. */
  stats?: boolean;
}

/** The S_IF* type bits of a kind. */
export function typeBits(kind: FileAttr["kind"]): number {
  return kind === "dir" ? S_IFDIR : kind === "symlink" ? S_IFLNK : S_IFREG;
}

/** Change counters read before attributes are fetched, so that a reply computed across a change marks and stores nothing (see kattr). */
interface Epochs {
  xattrs: number;
  attrs: number;
}

/** A node's attributes as the kernel wants them. */
function kernelAttr(id: number, a: FileAttr): KernelAttr {
  return { ino: id, size: a.size, mode: typeBits(a.kind) | (a.mode & 0o7777), nlink: a.nlink, uid: a.uid, gid: a.gid, atime: a.atime, mtime: a.mtime, ctime: a.ctime };
}

/**
 * The (directory, name) pairs a request names, as it will make or remove them: the one name of
 * a CREATE, MKNOD, MKDIR, SYMLINK, LINK, UNLINK or RMDIR; a rename's source, then its target.
 */
function namedIn(req: Request): [number, string][] | undefined {
  const b = req.body;
  switch (req.opcode) {
    case Op.CREATE:
    case Op.MKNOD:
      return [[req.nodeid, cstring(b, 16)[0]]];
    case Op.MKDIR:
    case Op.LINK:
      return [[req.nodeid, cstring(b, 8)[0]]];
    case Op.SYMLINK:
    case Op.UNLINK:
    case Op.RMDIR:
      return [[req.nodeid, cstring(b, 0)[0]]];
    case Op.RENAME:
    case Op.RENAME2: {
      const [from, at] = cstring(b, req.opcode === Op.RENAME2 ? 16 : 8);
      return [[req.nodeid, from], [u64(b, 0), cstring(b, at)[0]]];
    }
    default:
      return undefined;
  }
}

function signature(a: FileAttr): string {
  return `${a.kind}:${a.size}:${a.mtime}:${a.mode}:${a.uid}:${a.gid}:${a.tag ?? ""}`;
}

function tooLong(name: string): boolean {
  return name.length > NAME_MAX / 4 && Buffer.byteLength(name) > NAME_MAX;
}

/** True for `/.strata` and everything under it. */
export function isControl(path: string): boolean {
  return path === `/${RESERVED_NAME}` || path.startsWith(`/${RESERVED_NAME}/`);
}

/** Control paths whose content changes behind the kernel (all but the immutable versions tree). */
function isLiveControl(path: string): boolean {
  return isControl(path) && !path.startsWith(`/${RESERVED_NAME}/versions/`);
}

/** The session: one per mount. */
export class KernelSession {
  private readonly nodes = new Map<number, Node>();
  private nextId = ROOT + 1;
  private forgotten = 0;
  private readonly dirs = new Map<number, { node: Node; names?: string[] }>();
  private nextDir = 1;
  /** Counts changes of extended attributes (see xattrsChanged). */
  private xattrEpoch = 0;
  /** Counts drops from the attribute table (see dropAttrs). */
  private attrEpoch = 0;
  private readonly fhNode = new Map<number, Node>();
  /** Buffers of large WRITE bodies, reused (see KEPT_WRITE_MIN). */
  private readonly writeBufs: Buffer[] = [];
  /** Open handles that may write (MountFs handles follow their path across a base move). */
  private readonly writeFhs = new Set<number>();
  /** The session took backing files at INIT (a read-only mount, Linux 6.9+, MountFs.backingFd). */
  private passthrough = false;
  private readonly negatives = new Map<string, { parent: Node; name: string; at: number }>();
  private resolveInit!: () => void;
  /** Resolves once the kernel's INIT has been answered. */
  readonly initialized = new Promise<void>((res) => (this.resolveInit = res));

  constructor(
    private readonly fs: MountFs,
    private readonly dev: FuseDevice,
    private readonly opts: KernelServeOptions,
  ) {
    this.nodes.set(ROOT, { id: ROOT, parent: null, name: "", lookups: 1, children: new Map() });
    fs.onExternalChange?.(() => this.revalidate());
    // Only a file system that reports every change not made through this mount (a base move) may
    // let the reader thread say a name is missing (a pass-through directory can change under us).
    this.madeDirsOn = fs.onExternalChange !== undefined && !opts.readOnly && !opts.immutable;
  }

  /** The reader thread answers missing names in directories made through this mount (FuseDevice.madeDirs). */
  private readonly madeDirsOn: boolean;

  /**
   * Puts the names a request may make (`named`, see namedIn; the last one: a rename's target) into
   * the name filter, before the request is carried out, so that a LOOKUP the kernel sends after
   * the answer never finds them missing. A full filter starts over, and with it the set of made
   * directories (cleared first: the reader thread reads the filter first).
   */
  private namesMade(op: number, named: [number, string][]): void {
    if (op === Op.UNLINK || op === Op.RMDIR) return;
    const [parent, name] = named[named.length - 1]!;
    if (parent > 0x7fffffff || this.dev.names.add(parent, name)) return;
    this.dev.madeDirs.clear();
    this.dev.names.clear();
    this.dev.names.add(parent, name);
  }

  // ---- nodes ----

  private node(id: number): Node {
    const n = this.nodes.get(id);
    if (!n) throw new VolumeError("BAD_HANDLE", `node ${id}: unknown`);
    return n;
  }

  /** The node's path, or null when its name was removed. */
  private pathOf(n: Node): string | null {
    if (n.id === ROOT) return "/";
    const parts: string[] = [];
    for (let c: Node | null = n; c && c.id !== ROOT; c = c.parent) {
      if (!c.parent) return null;
      parts.push(c.name);
    }
    return "/" + parts.reverse().join("/");
  }

  private mustPath(n: Node): string {
    const p = this.pathOf(n);
    if (p === null) throw VolumeError.NOT_FOUND("a removed file", { op: "resolve" });
    return p;
  }

  private childPath(parent: Node, name: string): string {
    if (tooLong(name)) {
      throw new VolumeError("INVALID_PATH", `check name ${JSON.stringify(name.slice(0, 32))}…: longer than ${NAME_MAX} bytes`, { details: NAME_TOO_LONG });
    }
    const p = this.mustPath(parent);
    return p === "/" ? "/" + name : p + "/" + name;
  }

  /** The child node for `name` (made on first sight), with one more kernel lookup. */
  private lookedUp(parent: Node, name: string): Node {
    parent.children ??= new Map();
    let c = parent.children.get(name);
    if (!c) {
      c = { id: this.nextId++, parent, name, lookups: 0 };
      parent.children.set(name, c);
      this.nodes.set(c.id, c);
    } else if (c.lookups === 0) this.forgotten--;
    c.lookups++;
    return c;
  }

  private detach(parent: Node, name: string): void {
    const c = parent.children?.get(name);
    if (!c) return;
    parent.children!.delete(name);
    c.parent = null;
    this.dropIfUnused(c);
  }

  private dropIfUnused(n: Node): void {
    if (n.lookups > 0 || n.fhs?.size || n.children?.size || n.id === ROOT) return;
    if (n.parent) return; // still named: kept for its id until the table is pruned
    this.nodes.delete(n.id);
  }

  private forget(id: number, count: number): void {
    const n = this.nodes.get(id);
    if (!n || id === ROOT) return;
    n.lookups = Math.max(0, n.lookups - count);
    if (n.lookups > 0) return;
    if (!n.parent) return this.dropIfUnused(n);
    if (++this.forgotten > MAX_FORGOTTEN) this.prune();
  }

  /** Drops forgotten leaf nodes (their ids are then given anew on the next lookup). */
  private prune(): void {
    for (const n of this.nodes.values()) {
      if (n.lookups === 0 && n.parent && !n.children?.size && !n.fhs?.size) {
        n.parent.children!.delete(n.name);
        this.nodes.delete(n.id);
        this.forgotten--;
      }
    }
  }

  // ---- attributes and cache times ----

  private epochs(): Epochs {
    return { xattrs: this.xattrEpoch, attrs: this.attrEpoch };
  }

  /**
   * The kernel's attributes for a node, cached by the kernel for `timeout` seconds. With `epoch`
   * (read before `a` was asked for), also tells the reader thread what it may answer itself:
   * that the node has no extended attributes, when no xattr changed since; and, for attributes
   * the kernel keeps long, the GETATTR reply, when no attribute table drop happened since.
   */
  private kattr(n: Node, a: FileAttr, epoch?: Epochs, timeout = 0): KernelAttr {
    n.sig = signature(a);
    n.mode = a.mode;
    n.shared = a.shared === true;
    if (a.xattrs === false && epoch?.xattrs === this.xattrEpoch) this.dev.noXattrs.add(n.id);
    else if (a.xattrs !== false) this.dev.noXattrs.delete(n.id);
    const k = kernelAttr(n.id, a);
    if (timeout === LONG && epoch?.attrs === this.attrEpoch && !n.backing?.writers) this.dev.attrs.put(n.id, attrOut(k, LONG));
    return k;
  }

  /**
   * Nodes whose attributes a request may change (its node, the parent directories, a linked,
   * removed, moved or replaced node): their GETATTR replies leave the attribute table when the
   * request arrives and again before it is answered, so that a GETATTR the kernel sends after
   * the answer never gets the attributes from before the change.
   */
  private attrsTouched(req: Request, named: [number, string][] | undefined): number[] | undefined {
    const child = ([dir, name]: [number, string]) => this.nodes.get(dir)?.children?.get(name)?.id ?? 0;
    switch (req.opcode) {
      case Op.OPEN:
        return opensToChange(req.body.readUInt32LE(0)) ? [req.nodeid] : undefined;
      case Op.SETATTR:
      case Op.WRITE:
      case Op.SETXATTR:
      case Op.REMOVEXATTR:
      case Op.CREATE:
      case Op.MKNOD:
      case Op.MKDIR:
      case Op.SYMLINK:
        return [req.nodeid];
      case Op.LINK:
        return [req.nodeid, u64(req.body, 0)];
      case Op.UNLINK:
      case Op.RMDIR:
        return [req.nodeid, child(named![0]!)];
      case Op.RENAME:
      case Op.RENAME2:
        return [req.nodeid, named![1]![0], child(named![0]!), child(named![1]!)];
      default:
        return undefined;
    }
  }

  private dropAttrs(ids: number[]): void {
    this.attrEpoch++;
    for (const id of ids) this.dev.attrs.drop(id);
  }

  /**
   * Puts a changed node's new attributes in the attribute table (after a write, which the
   * kernel follows with a GETATTR, and after a SETATTR). Never fails.
   */
  private async attrsAfter(id: number, fh?: number): Promise<void> {
    const n = this.nodes.get(id);
    if (!n || n.backing?.writers || this.attrTimeout(this.pathOf(n) ?? "") !== LONG) return;
    const epoch = this.attrEpoch;
    const a = await this.attrOfNode(n, fh).catch(() => undefined);
    if (a && epoch === this.attrEpoch && this.attrTimeout("", a) === LONG) {
      this.dev.attrs.put(id, attrOut(kernelAttr(id, a), LONG));
      // What the reader thread now tells the kernel (see revalidate).
      n.sig = signature(a);
    }
  }

  /** How long the kernel may keep attributes: not at all for live control files and for bytes another name shares. */
  private attrTimeout(path: string, a?: FileAttr): number {
    return isLiveControl(path) || a?.shared ? 0 : LONG;
  }

  /** open_flags of an open or create reply: page cache kept across opens unless something else may change the bytes. */
  private openFlags(n: Node, path: string): number {
    if (isLiveControl(path)) return FOPEN_DIRECT_IO;
    return n.shared || n.wroteThrough ? FOPEN_NOFLUSH : FOPEN_KEEP_CACHE | FOPEN_NOFLUSH;
  }

  private async attrOfNode(n: Node, fh?: number): Promise<FileAttr> {
    const path = this.pathOf(n);
    if (fh !== undefined && this.fs.fgetattr) return this.fs.fgetattr(fh);
    if (path !== null) return this.fs.getattr(path);
    const open = n.fhs?.values().next().value;
    if (open !== undefined && this.fs.fgetattr) return this.fs.fgetattr(open);
    throw VolumeError.NOT_FOUND("a removed file", { op: "stat" });
  }

  /** The entry reply for a name that exists (made by the caller when `owner` is given: owned by the caller). */
  private async entry(parent: Node, name: string, path: string, owner?: { uid: number; gid: number }): Promise<{ out: Buffer; node: Node }> {
    if (owner && (owner.uid !== 0 || owner.gid !== 0)) await this.fs.chown(path, owner.uid, owner.gid);
    const epoch = this.epochs();
    const a = await this.fs.getattr(path);
    const node = this.lookedUp(parent, name);
    const timeout = this.attrTimeout(path, a);
    return { out: entryOut(node.id, this.kattr(node, a, epoch, timeout), LONG, timeout), node };
  }

  private guard(path: string): void {
    if (this.opts.readOnly && !isControl(path)) throw VolumeError.READ_ONLY(JSON.stringify(path), { op: "change" });
  }

  // ---- the request loop ----

  /** Handles one request (called by the device with a body valid only during the call). */
  request(req: Request): void {
    const b = req.body;
    const op = req.opcode;
    switch (op) {
      case Op.INIT:
        return this.init(req);
      case Op.FORGET:
        return this.forget(req.nodeid, u64(b, 0));
      case Op.BATCH_FORGET: {
        const count = b.readUInt32LE(0);
        for (let i = 0; i < count; i++) this.forget(u64(b, 8 + i * 16), u64(b, 16 + i * 16));
        return;
      }
      case Op.INTERRUPT:
        return;
      case Op.DESTROY:
        return this.dev.reply(req.unique, 0);
      case Op.ACCESS:
        // No permission checks beyond the kernel's: ENOSYS makes it stop asking.
        return this.dev.reply(req.unique, -E.ENOSYS);
      case Op.LOOKUP: {
        const [name] = cstring(b, 0);
        return this.run(req, "lookup", () => this.lookup(req.nodeid, name));
      }
      case Op.GETATTR: {
        const flags = b.readUInt32LE(0);
        const fh = flags & GETATTR_FH ? u64(b, 8) : undefined;
        return this.run(req, "getattr", async () => {
          const n = this.node(req.nodeid);
          const epoch = this.epochs();
          const a = await this.attrOfNode(n, fh);
          const timeout = this.attrTimeout(this.pathOf(n) ?? "", a);
          return [attrOut(this.kattr(n, a, epoch, timeout), timeout)];
        });
      }
      case Op.SETATTR: {
        const valid = b.readUInt32LE(0);
        const set = {
          valid,
          fh: u64(b, 8),
          size: u64(b, 16),
          atime: u64(b, 32) * 1000 + Math.floor(b.readUInt32LE(56) / 1e6),
          mtime: u64(b, 40) * 1000 + Math.floor(b.readUInt32LE(60) / 1e6),
          mode: b.readUInt32LE(68),
          uid: b.readUInt32LE(76),
          gid: b.readUInt32LE(80),
        };
        return this.run(
          req,
          "setattr",
          () => {
            const n = this.nodes.get(req.nodeid);
            // A backing file that opens write is the file's own: it is truncated in place.
            return valid & Fattr.SIZE && n?.backing && !n.backing.writers ? Promise.resolve(this.restale(n)) : this.setattr(req.nodeid, set);
          },
          () => this.attrsAfter(req.nodeid, valid & Fattr.FH ? set.fh : undefined),
        );
      }
      case Op.READLINK:
        return this.run(req, "readlink", async () => [Buffer.from(await this.fs.readlink(this.mustPath(this.node(req.nodeid))))]);
      case Op.SYMLINK: {
        const [name, at] = cstring(b, 0);
        const [target] = cstring(b, at);
        return this.run(req, "symlink", async () => {
          const parent = this.node(req.nodeid);
          const path = this.childPath(parent, name);
          this.guard(path);
          await this.fs.symlink(target, path);
          return [(await this.entry(parent, name, path, req)).out];
        });
      }
      case Op.MKNOD: {
        const mode = b.readUInt32LE(0);
        const [name] = cstring(b, 16);
        return this.run(req, "mknod", async () => {
          const parent = this.node(req.nodeid);
          const path = this.childPath(parent, name);
          this.guard(path);
          if ((mode & S_IFMT) !== S_IFREG) throw new VolumeError("PERMISSION", `make node ${JSON.stringify(path)}: only regular files`);
          await this.fs.release(await this.fs.create(path, mode & 0o7777, O.O_CREAT | O.O_EXCL | O.O_WRONLY));
          return [(await this.entry(parent, name, path, req)).out];
        });
      }
      case Op.MKDIR: {
        const mode = b.readUInt32LE(0);
        const [name] = cstring(b, 8);
        return this.run(req, "mkdir", async () => {
          const parent = this.node(req.nodeid);
          const path = this.childPath(parent, name);
          this.guard(path);
          await this.fs.mkdir(path, mode & 0o7777);
          const { out, node } = await this.entry(parent, name, path, req);
          if (this.madeDirsOn) this.dev.madeDirs.add(node.id);
          return [out];
        });
      }
      case Op.UNLINK:
      case Op.RMDIR: {
        const [name] = cstring(b, 0);
        return this.run(req, op === Op.UNLINK ? "unlink" : "rmdir", async () => {
          const parent = this.node(req.nodeid);
          const path = this.childPath(parent, name);
          this.guard(path);
          await (op === Op.UNLINK ? this.fs.unlink(path) : this.fs.rmdir(path));
          this.detach(parent, name);
          return [];
        });
      }
      case Op.RENAME:
      case Op.RENAME2: {
        const newdir = u64(b, 0);
        const flags = op === Op.RENAME2 ? b.readUInt32LE(8) : 0;
        const [from, at] = cstring(b, op === Op.RENAME2 ? 16 : 8);
        const [to] = cstring(b, at);
        return this.run(req, "rename", () => this.rename(req.nodeid, from, newdir, to, flags));
      }
      case Op.LINK: {
        const old = u64(b, 0);
        const [name] = cstring(b, 8);
        return this.run(req, "link", async () => {
          const parent = this.node(req.nodeid);
          const path = this.childPath(parent, name);
          this.guard(path);
          const src = this.node(old);
          if (src.backing) return this.restale(src);
          await this.fs.link(this.mustPath(src), path);
          // Both names now share the bytes (until a sync): the kernel must not cache them, and
          // drops what it has of the source (a successful LINK only updates its ctime).
          src.shared = true;
          this.invalAttrs(src.id);
          return [(await this.entry(parent, name, path)).out];
        });
      }
      case Op.OPEN: {
        const flags = b.readUInt32LE(0);
        const kill = (b.readUInt32LE(4) & OPEN_KILL_SUIDGID) !== 0;
        return this.run(req, "open", async () => {
          const n = this.node(req.nodeid);
          const path = this.mustPath(n);
          const write = opensToChange(flags);
          if (write) this.guard(path);
          if (write && n.backing) return this.restale(n);
          const fh = await this.fs.open(path, flags);
          if (kill) await this.killSuid(n);
          const out = await this.openReply(n, fh, path, write);
          this.opened(n, fh, write);
          return [out];
        });
      }
      case Op.CREATE: {
        const flags = b.readUInt32LE(0);
        const mode = b.readUInt32LE(4);
        const [name] = cstring(b, 16);
        return this.run(req, "create", async () => {
          const parent = this.node(req.nodeid);
          const path = this.childPath(parent, name);
          this.guard(path);
          // An existing file opened with backing files gets a new node (see restale).
          const existing = parent.children?.get(name);
          if (existing?.backing) this.renode(existing);
          const fh = await this.fs.create(path, mode & 0o7777, flags);
          try {
            const { out, node } = await this.entry(parent, name, path, req);
            const write = opensToChange(flags);
            const open = await this.openReply(node, fh, path, write);
            this.opened(node, fh, write);
            return [out, open];
          } catch (err) {
            await this.fs.release(fh).catch(() => undefined);
            throw err;
          }
        });
      }
      case Op.READ: {
        const fh = u64(b, 0);
        const offset = u64(b, 8);
        const size = b.readUInt32LE(16);
        const n = Math.min(size, MAX_IO);
        return this.run(req, "read", async () => (this.fs.readv ? this.fs.readv(fh, n, offset) : [await this.fs.read(fh, n, offset)]));
      }
      case Op.WRITE: {
        const fh = u64(b, 0);
        const offset = u64(b, 8);
        const size = b.readUInt32LE(16);
        const kill = (b.readUInt32LE(20) & WRITE_KILL_SUIDGID) !== 0;
        // The slot is reused once this returns: the bytes are copied, large ones into a kept buffer.
        const kept = size >= KEPT_WRITE_MIN ? this.writeBufs.pop() ?? Buffer.allocUnsafeSlow(MAX_IO) : undefined;
        const data = kept ? kept.subarray(0, b.copy(kept, 0, 40, 40 + size)) : Buffer.from(b.subarray(40, 40 + size));
        return this.run(req, "write", async () => {
          try {
            const n = this.fhNode.get(fh);
            if (this.opts.readOnly && !(n && isControl(this.pathOf(n) ?? ""))) throw VolumeError.READ_ONLY("a file", { op: "write" });
            const written = await this.fs.write(fh, data, offset);
            if (kill && n) await this.killSuid(n);
            return [sizeOut(written)];
          } finally {
            if (kept && this.writeBufs.length < KEPT_WRITE_BUFS) this.writeBufs.push(kept);
          }
        }, () => this.attrsAfter(req.nodeid, fh));
      }
      case Op.STATFS:
        return this.run(req, "statfs", async () => {
          const s = await this.fs.statfs();
          const out = Buffer.alloc(80);
          [s.blocks, s.bfree, s.bavail, s.files, s.ffree].forEach((v, i) => out.writeBigUInt64LE(BigInt(Math.max(0, Math.floor(v))), i * 8));
          out.writeUInt32LE(s.bsize, 40);
          out.writeUInt32LE(s.namemax, 44);
          out.writeUInt32LE(s.bsize, 48);
          return [out];
        });
      case Op.RELEASE: {
        const fh = u64(b, 0);
        let wroteThrough: Node | undefined;
        return this.run(
          req,
          "release",
          async () => {
            const n = this.fhNode.get(fh);
            this.fhNode.delete(fh);
            const wrote = this.writeFhs.delete(fh);
            if (n) {
              n.fhs?.delete(fh);
              if (n.backing && wrote) {
                n.backing.writers--;
                wroteThrough = n;
              }
              if (n.backing && !n.fhs?.size) {
                this.dev.closeBacking(n.backing.id);
                n.backing = undefined;
              }
              this.dropIfUnused(n);
            }
            await this.fs.release(fh);
            return [];
          },
          async () => {
            // The last open the kernel wrote through is gone: the node's attributes (read from
            // the file by the release) may go back into the attribute table.
            if (wroteThrough && !wroteThrough.backing?.writers) await this.attrsAfter(wroteThrough.id);
          },
        );
      }
      case Op.FLUSH:
        return this.run(req, "flush", async () => (await this.fs.flush(u64(b, 0)), []));
      case Op.FSYNC: {
        const fh = u64(b, 0);
        const datasync = (b.readUInt32LE(8) & 1) !== 0;
        return this.run(req, "fsync", async () => (await this.fs.fsync(fh, datasync), []));
      }
      case Op.SETXATTR: {
        const size = b.readUInt32LE(0);
        const flags = b.readUInt32LE(4);
        const [name, at] = cstring(b, 8);
        const value = Buffer.from(b.subarray(at, at + size));
        return this.run(req, "setxattr", async () => {
          const path = this.mustPath(this.node(req.nodeid));
          this.guard(path);
          try {
            await this.fs.setxattr(path, name, value, flags);
          } finally {
            this.xattrsChanged();
          }
          return [];
        });
      }
      case Op.GETXATTR: {
        const size = b.readUInt32LE(0);
        const [name] = cstring(b, 8);
        return this.run(req, "getxattr", async () => {
          const path = this.mustPath(this.node(req.nodeid));
          if (!this.fs.xattr) return sized(await this.fs.getxattr(path, name), size);
          // The kernel asks for security.capability before each write: usually there is none.
          const v = await this.fs.xattr(path, name);
          return v ? sized(v, size) : -E.ENODATA;
        });
      }
      case Op.LISTXATTR: {
        const size = b.readUInt32LE(0);
        return this.run(req, "listxattr", async () => {
          const names = await this.fs.listxattr(this.mustPath(this.node(req.nodeid)));
          return sized(Buffer.from(names.map((n) => n + "\0").join("")), size);
        });
      }
      case Op.REMOVEXATTR: {
        const [name] = cstring(b, 0);
        return this.run(req, "removexattr", async () => {
          const path = this.mustPath(this.node(req.nodeid));
          this.guard(path);
          try {
            await this.fs.removexattr(path, name);
          } finally {
            this.xattrsChanged();
          }
          return [];
        });
      }
      case Op.OPENDIR:
        return this.run(req, "opendir", async () => {
          const n = this.node(req.nodeid);
          const dfh = this.nextDir++;
          this.dirs.set(dfh, { node: n });
          return [openOut(dfh, this.opts.immutable ? FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE : 0)];
        });
      case Op.READDIR: {
        const dfh = u64(b, 0);
        const offset = u64(b, 8);
        const size = b.readUInt32LE(16);
        return this.run(req, "readdir", () => this.readdir(dfh, offset, size));
      }
      case Op.RELEASEDIR:
        this.dirs.delete(u64(b, 0));
        return this.dev.reply(req.unique, 0);
      case Op.FSYNCDIR:
        return this.run(req, "fsyncdir", async () => (await this.fs.fsyncdir?.(), []));
      default:
        return this.dev.reply(req.unique, -E.ENOSYS);
    }
  }

  /** Per operation: calls and total milliseconds from request to reply (STRATA_FUSE_STATS=1 prints them at unmount). */
  readonly stats = new Map<string, { n: number; ms: number }>();

  /**
   * Runs `fn` and answers the request with its payload, or with its errno when it returns one.
   * Nodes whose attributes the request may change leave the attribute table before and after
   * (see attrsTouched); `after` runs after that, before a successful answer.
   */
  private run(req: Request, op: string, fn: () => Promise<Uint8Array[] | number>, after?: () => Promise<void>): void {
    const t0 = this.opts.stats ? performance.now() : 0;
    const named = namedIn(req);
    if (named && this.madeDirsOn) this.namesMade(req.opcode, named);
    const touched = this.attrsTouched(req, named);
    if (touched) this.dropAttrs(touched);
    const done = () => {
      if (!this.opts.stats) return;
      const s = this.stats.get(op) ?? { n: 0, ms: 0 };
      s.n++;
      s.ms += performance.now() - t0;
      this.stats.set(op, s);
    };
    fn().then(
      async (payload) => {
        if (touched) this.dropAttrs(touched);
        if (after) await after().catch(() => undefined);
        if (typeof payload === "number") this.dev.reply(req.unique, payload);
        else this.dev.reply(req.unique, 0, ...payload);
        done();
      },
      (err) => {
        if (touched) this.dropAttrs(touched);
        done();
        const errno = toErrno(err);
        if (this.opts.debug && errno !== -E.ENOENT) process.stderr.write(`strata fuse: ${op} (node ${req.nodeid}): ${(err as Error)?.message ?? String(err)} (${errno})\n`);
        this.dev.reply(req.unique, errno);
      },
    );
  }

  /** Drops setuid/setgid bits (a write or truncation by a user without CAP_FSETID). */
  private async killSuid(n: Node): Promise<void> {
    if (n.mode === undefined || (n.mode & 0o6000) === 0) return;
    const path = this.pathOf(n);
    if (path === null) return;
    await this.fs.chmod(path, n.mode & ~0o6000 & 0o7777);
    n.mode &= ~0o6000;
    n.sig = undefined;
  }

  /**
   * `struct fuse_open_out` of a new open: with a backing file when the file system has one (the
   * kernel then reads, and for an open that `write`s writes, the file without asking), else
   * served with `openFlags`. Every open of a node with a backing file open must name that file,
   * and none may while the node has served opens (the kernel fails either with EIO), so a served
   * open keeps later ones served until it is released, and a backed one makes later ones share
   * its file. A backing file that opens write is the file's own bytes: while one is open, the
   * node's attributes stay out of the attribute table (the kernel's writes change them).
   */
  private async openReply(n: Node, fh: number, path: string, write: boolean): Promise<Buffer> {
    if (!this.passthrough || isControl(path) || (n.shared && !n.backing)) return openOut(fh, this.openFlags(n, path));
    if (!n.backing) {
      if (n.fhs && n.fhs.size > 0) return openOut(fh, this.openFlags(n, path));
      const fd = await this.fs.backingFd!(fh);
      if (fd === undefined) return openOut(fh, this.openFlags(n, path));
      try {
        n.backing = { id: this.dev.openBacking(fd), writers: 0 };
      } catch (err) {
        // E.g. copies on an overlay file system (a container's root): the kernel takes backing
        // files one stack level deep only. Every later open is served; this one is too.
        this.passthrough = false;
        this.fs.backingRefused?.(fh);
        process.stderr.write(`strata fuse: the kernel refused a backing file (${(err as Error).message}); this mount serves every read and write itself\n`);
        return openOut(fh, this.openFlags(n, path));
      } finally {
        closeSync(fd);
      }
    } else if (write) {
      // Opens that write are given a node of their own when one with a backing file is open
      // (see restale); only the open that made the backing file writes through it.
      throw new VolumeError("BAD_HANDLE", "open for writing: the node has a backing file open");
    }
    if (write) {
      n.backing.writers++;
      n.wroteThrough = true;
      this.dropAttrs([n.id]);
    }
    // No FLUSH at close: the kernel's writes are in the file already (see MountFs.flush).
    return openOut(fh, FOPEN_PASSTHROUGH | FOPEN_NOFLUSH, n.backing.id);
  }

  /**
   * Answers a change to the bytes of a node whose opens have a backing file (a copy of its
   * bytes before the change, which every open of the inode must name while one is open): the
   * name gets a new node, and ESTALE makes the kernel look the name up again and retry the call
   * once, on that node. The open files keep the old bytes, as after a rename over them.
   */
  private restale(n: Node): number {
    this.renode(n);
    return -E.ESTALE;
  }

  /**
   * Gives a node's name a new node: the kernel's entry is dropped, and the next LOOKUP makes a
   * node. The invalidation is sent at once, not queued: it waits for the directory's lock, which
   * the request being answered (and its retry, whose handler may wait for queued notifications)
   * holds.
   */
  private renode(n: Node): void {
    if (!n.parent) return;
    void this.invalEntry(n.parent, n.name, true);
    this.detach(n.parent, n.name);
  }

  private opened(n: Node, fh: number, write: boolean): void {
    (n.fhs ??= new Set()).add(fh);
    this.fhNode.set(fh, n);
    if (write) this.writeFhs.add(fh);
  }

  /** Whether `n` is open, and only for reading. */
  private onlyRead(n: Node): boolean {
    return !!n.fhs?.size && [...n.fhs].every((fh) => !this.writeFhs.has(fh));
  }

  private init(req: Request): void {
    const b = req.body;
    const major = b.readUInt32LE(0);
    const maxReadahead = b.readUInt32LE(8);
    const offered = b.readUInt32LE(12);
    const offered2 = offered & INIT_EXT ? b.readUInt32LE(16) : 0;
    if (major !== 7) {
      this.dev.reply(req.unique, -E.EPROTO);
      return;
    }
    const want = Init.ASYNC_READ | Init.ATOMIC_O_TRUNC | Init.BIG_WRITES | Init.PARALLEL_DIROPS | Init.MAX_PAGES | Init.CACHE_SYMLINKS | Init.HANDLE_KILLPRIV_V2;
    // Backing files (protocol 7.40, with a stack depth: they live on a plain file system).
    // STRATA_FUSE_BACKING=0 turns them off.
    this.passthrough = (offered2 & Init2.PASSTHROUGH) !== 0 && this.fs.backingFd !== undefined && process.env.STRATA_FUSE_BACKING !== "0";
    const pt = this.passthrough;
    // New files can then be written by the kernel too (a writable mount only).
    if (pt && !this.opts.readOnly) this.fs.kernelWrites?.();
    const out = initOut({
      minor: pt ? 41 : 31,
      maxReadahead,
      flags: (offered & want) | (pt ? INIT_EXT : 0),
      flags2: pt ? Init2.PASSTHROUGH : 0,
      maxStackDepth: pt ? 1 : 0,
      maxBackground: 64,
      congestionThreshold: 48,
    });
    this.dev.reply(req.unique, 0, out);
    this.resolveInit();
  }

  private async lookup(parentId: number, name: string): Promise<Uint8Array[]> {
    const parent = this.node(parentId);
    const path = this.childPath(parent, name);
    const epoch = this.epochs();
    const a = this.fs.lookup ? await this.fs.lookup(path) : await this.fs.getattr(path).catch((err) => (toErrno(err) === -E.ENOENT ? undefined : Promise.reject(err)));
    if (a) {
      const node = this.lookedUp(parent, name);
      const timeout = this.attrTimeout(path, a);
      return [entryOut(node.id, this.kattr(node, a, epoch, timeout), LONG, timeout)];
    }
    if (this.opts.immutable) return [negativeEntryOut(LONG)];
    if (isControl(path) || !this.trackNegative(parent, name)) return [negativeEntryOut(0)];
    return [negativeEntryOut(NEGATIVE)];
  }

  /** Remembers a missing name the kernel may cache; false when too many are tracked already. */
  private trackNegative(parent: Node, name: string): boolean {
    const now = Date.now();
    if (this.negatives.size >= MAX_NEGATIVE) {
      for (const [k, v] of this.negatives) if (now - v.at > NEGATIVE * 1000) this.negatives.delete(k);
      if (this.negatives.size >= MAX_NEGATIVE) return false;
    }
    this.negatives.set(`${parent.id}/${name}`, { parent, name, at: now });
    return true;
  }

  private async setattr(id: number, s: { valid: number; fh: number; size: number; atime: number; mtime: number; mode: number; uid: number; gid: number }): Promise<Uint8Array[]> {
    const n = this.node(id);
    const path = this.pathOf(n);
    const fh = s.valid & Fattr.FH ? s.fh : undefined;
    if (path !== null) this.guard(path);
    else if (this.opts.readOnly) throw VolumeError.READ_ONLY("a removed file", { op: "change" });
    if (s.valid & Fattr.SIZE) {
      if (fh !== undefined) await this.fs.ftruncate(fh, s.size);
      else await this.fs.truncate(this.mustPath(n), s.size);
    }
    if (s.valid & Fattr.MODE) await this.fs.chmod(this.mustPath(n), s.mode & 0o7777);
    else if (s.valid & FATTR_KILL_SUIDGID) await this.killSuid(n);
    if (s.valid & (Fattr.UID | Fattr.GID)) {
      const cur = await this.attrOfNode(n, fh);
      await this.fs.chown(this.mustPath(n), s.valid & Fattr.UID ? s.uid : cur.uid, s.valid & Fattr.GID ? s.gid : cur.gid);
    }
    if (s.valid & (Fattr.ATIME | Fattr.MTIME | Fattr.ATIME_NOW | Fattr.MTIME_NOW)) {
      const cur = await this.attrOfNode(n, fh);
      const now = Date.now();
      const atime = s.valid & Fattr.ATIME_NOW ? now : s.valid & Fattr.ATIME ? s.atime : cur.atime;
      const mtime = s.valid & Fattr.MTIME_NOW ? now : s.valid & Fattr.MTIME ? s.mtime : cur.mtime;
      await this.fs.utimens(this.mustPath(n), atime, mtime);
    }
    const a = await this.attrOfNode(n, fh);
    return [attrOut(this.kattr(n, a), this.attrTimeout(path ?? "", a))];
  }

  private async rename(fromDir: number, from: string, toDir: number, to: string, flags: number): Promise<Uint8Array[]> {
    if (flags & ~RENAME_NOREPLACE) throw new VolumeError("INVALID_ARGUMENT", "rename: only RENAME_NOREPLACE is supported");
    const src = this.node(fromDir);
    const dst = this.node(toDir);
    const srcPath = this.childPath(src, from);
    const dstPath = this.childPath(dst, to);
    this.guard(srcPath);
    this.guard(dstPath);
    if (flags & RENAME_NOREPLACE) {
      const exists = await this.fs.getattr(dstPath).then(
        () => true,
        () => false,
      );
      if (exists) throw VolumeError.ALREADY_EXISTS(JSON.stringify(dstPath), { op: "rename" });
    }
    await this.fs.rename(srcPath, dstPath);
    const moving = src.children?.get(from);
    if (srcPath === dstPath) return [];
    this.detach(dst, to);
    if (moving) {
      src.children!.delete(from);
      moving.parent = dst;
      moving.name = to;
      (dst.children ??= new Map()).set(to, moving);
    }
    return [];
  }

  private async readdir(dfh: number, offset: number, size: number): Promise<Uint8Array[]> {
    const d = this.dirs.get(dfh);
    if (!d) throw new VolumeError("BAD_HANDLE", `read directory handle ${dfh}: not open`);
    if (!d.names || offset === 0) d.names = [".", "..", ...(await this.fs.readdir(this.mustPath(d.node)))];
    const out = Buffer.alloc(Math.min(size, 128 * 1024));
    let used = 0;
    for (let i = offset; i < d.names.length; i++) {
      const name = d.names[i]!;
      if (used + direntSize(name) > out.length) break;
      const child = i === 0 ? d.node : i === 1 ? (d.node.parent ?? d.node) : d.node.children?.get(name);
      used += writeDirent(out, used, child?.id ?? 0xffffffff, i + 1, name, i < 2 ? DT_DIR : 0);
    }
    return [out.subarray(0, used)];
  }

  /**
   * Some node's extended attributes may have changed (a set, a remove, a base move): no node is
   * known to have none any more, and attributes read before now mark none (see kattr). Called
   * before the change is answered, so every later GETXATTR reaches the main thread.
   */
  private xattrsChanged(): void {
    this.xattrEpoch++;
    this.dev.noXattrs.clear();
  }

  /**
   * After a base move: asks again for every node the kernel knows and invalidates the ones whose
   * content or attributes changed (dropping the names that are gone), and every missing name the
   * kernel may cache; the attribute table is emptied first. Resolves when the kernel has been told.
   */
  private async revalidate(): Promise<void> {
    this.dev.madeDirs.clear();
    this.xattrsChanged();
    this.attrEpoch++;
    this.dev.attrs.clear();
    const sends: Promise<void>[] = [];
    for (const n of [...this.nodes.values()]) {
      if (n.id === ROOT && !n.sig) continue;
      if (n.lookups === 0 && n.id !== ROOT) continue;
      const path = this.pathOf(n);
      if (path === null || isLiveControl(path)) continue;
      let a: FileAttr | undefined;
      try {
        a = await this.fs.getattr(path);
      } catch {
        a = undefined;
      }
      if (a && signature(a) === n.sig) continue;
      if (a && n.sig && this.sameBytes(n.sig, a)) {
        // A staged file the sync stored as it was: the same file, under its stored tag.
        n.sig = signature(a);
        continue;
      }
      if ((n.backing || this.onlyRead(n)) && n.parent) {
        // Open with a backing file of the old bytes (which every open of this inode must name
        // while one is open), or served for reading only (MountFs read-only handles read on what
        // they opened): the name gets a new node (the kernel looks it up again), and the open
        // files keep the old inode and bytes, as after a rename over them.
        sends.push(this.invalEntry(n.parent, n.name));
        this.detach(n.parent, n.name);
        continue;
      }
      if (!a || (n.sig && !n.sig.startsWith(a.kind + ":"))) {
        if (n.parent) sends.push(this.invalEntry(n.parent, n.name));
      }
      sends.push(this.invalInode(n.id, a?.kind === "dir" ? -1 : 0));
      n.sig = undefined;
    }
    for (const { parent, name } of this.negatives.values()) sends.push(this.invalEntry(parent, name));
    this.negatives.clear();
    await Promise.all(sends);
  }

  /** Whether `sig` and `a` differ in their tags only, and the MountFs says the bytes are the same (MountFs.sameBytes). */
  private sameBytes(sig: string, a: FileAttr): boolean {
    const head = signature({ ...a, tag: undefined });
    return a.tag !== undefined && sig.startsWith(head) && this.fs.sameBytes?.(sig.slice(head.length), a.tag) === true;
  }

  /** Drops a node's cached attributes, and its cached pages from `offset` on when offset ≥ 0. */
  private invalInode(id: number, offset: number): Promise<void> {
    return this.dev.notify(NOTIFY_INVAL_INODE, invalInodeOut(id, offset));
  }

  /** Drops the kernel's attributes of node `id` (not its pages), before the reply being made. */
  private invalAttrs(id: number): void {
    this.dev.notifySync(NOTIFY_INVAL_INODE, invalInodeOut(id, -1));
  }

  /** Drops the kernel's entry of `name` in `parent`; `now`: not queued behind other notifications (see restale). */
  private invalEntry(parent: Node, name: string, now = false): Promise<void> {
    const nameBuf = Buffer.from(name + "\0");
    const b = Buffer.alloc(16);
    b.writeBigUInt64LE(BigInt(parent.id), 0);
    b.writeUInt32LE(nameBuf.length - 1, 8);
    return now ? this.dev.notifyNow(NOTIFY_INVAL_ENTRY, b, nameBuf) : this.dev.notify(NOTIFY_INVAL_ENTRY, b, nameBuf);
  }
}

/** An xattr value or name list answered the getxattr way: its size when asked with 0, ERANGE when too small. */
function sized(v: Uint8Array, size: number): Uint8Array[] {
  if (size === 0) return [sizeOut(v.length)];
  if (v.length > size) throw Object.assign(new Error("buffer too small"), { code: "ERANGE" });
  return [v];
}

/** `struct fuse_notify_inval_inode_out`: the node, and the offset its pages are dropped from (−1: none, attributes only); length 0 (to the end). */
function invalInodeOut(id: number, offset: number): Buffer {
  const b = Buffer.alloc(24);
  b.writeBigUInt64LE(BigInt(id), 0);
  b.writeBigInt64LE(BigInt(offset), 8);
  return b;
}
