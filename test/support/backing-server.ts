/**
 * A minimal FUSE server over the kernel protocol (volumefs/fuse/kernel.ts) that shows local files
 * under a mount, flat, for the tests and the benchmark of backing files (kernel passthrough):
 * with `passthrough`, each open registers the local file as the open's backing file, and the
 * kernel reads and writes it without asking; without, the server answers every READ and WRITE
 * itself (the way the Strata mount answers them today), with the page cache kept across opens.
 * It counts the READ and WRITE requests that reach it. It serves from this process: touch the
 * mount only from other processes.
 */
import { closeSync, openSync, readSync, statSync, writeSync, constants as FS } from "node:fs";
import { constants } from "node:os";
import { attrOut, cstring, entryOut, FOPEN_KEEP_CACHE, FOPEN_PASSTHROUGH, FuseDevice, Init, INIT_EXT, Init2, initOut, Op, openOut, sizeOut, u64, type KernelAttr, type Request } from "../../volumefs/fuse/kernel.js";

const E = constants.errno;
const ROOT = 1;
const LONG = 3600;

export interface BackingServerOptions {
  /** Register each opened file as the open's backing file. */
  passthrough: boolean;
}

export class BackingServer {
  /** READ and WRITE requests answered by this process. */
  readonly counts = { read: 0, write: 0 };
  /** Whether the kernel offered backing files at INIT (Linux 6.9+ built with FUSE passthrough). */
  offered = false;
  private readonly names: string[];
  private readonly open = new Map<number, { fd: number; backing: number }>();
  private nextFh = 1;
  private inited!: () => void;
  private readonly ready = new Promise<void>((res) => (this.inited = res));

  private constructor(
    private readonly dev: FuseDevice,
    private readonly files: Map<string, string>,
    private readonly opts: BackingServerOptions,
  ) {
    this.names = [...files.keys()];
  }

  /** Mounts at `dir` a directory holding `files` (name → local path); resolves once INIT is answered. */
  static async mount(dir: string, files: Map<string, string>, opts: BackingServerOptions): Promise<BackingServer> {
    const dev = await FuseDevice.mount(dir, { fsname: "strata-backing-test" });
    const s = new BackingServer(dev, files, opts);
    dev.start({ request: (req) => s.request(req) });
    await s.ready;
    return s;
  }

  async unmount(): Promise<void> {
    await this.dev.unmount();
    for (const { fd } of this.open.values()) closeSync(fd);
    this.open.clear();
  }

  private attr(node: number): KernelAttr {
    const now = Date.now();
    if (node === ROOT) return { ino: ROOT, size: 0, mode: 0o40755, nlink: 2, uid: 0, gid: 0, atime: now, mtime: now, ctime: now };
    const st = statSync(this.files.get(this.names[node - 2]!)!);
    return { ino: node, size: st.size, mode: 0o100644, nlink: 1, uid: 0, gid: 0, atime: st.atimeMs, mtime: st.mtimeMs, ctime: st.ctimeMs };
  }

  private request(req: Request): void {
    const b = req.body;
    const answer = (err: number, ...payload: Uint8Array[]) => this.dev.reply(req.unique, err, ...payload);
    switch (req.opcode) {
      case Op.INIT: {
        const flags = b.readUInt32LE(12);
        const flags2 = flags & INIT_EXT ? b.readUInt32LE(16) : 0;
        this.offered = (flags2 & Init2.PASSTHROUGH) !== 0;
        const take2 = this.opts.passthrough ? flags2 & Init2.PASSTHROUGH : 0;
        answer(
          0,
          initOut({
            minor: Math.min(b.readUInt32LE(4), 41),
            maxReadahead: b.readUInt32LE(8),
            flags: flags & (Init.ASYNC_READ | Init.BIG_WRITES | Init.MAX_PAGES | INIT_EXT),
            flags2: take2,
            maxStackDepth: take2 ? 1 : 0, // backing files on a plain file system
            maxBackground: 16,
            congestionThreshold: 12,
          }),
        );
        return this.inited();
      }
      case Op.LOOKUP: {
        const i = req.nodeid === ROOT ? this.names.indexOf(cstring(b, 0)[0]) : -1;
        if (i < 0) return answer(-E.ENOENT);
        return answer(0, entryOut(i + 2, this.attr(i + 2), LONG, LONG));
      }
      case Op.GETATTR:
        return answer(0, attrOut(this.attr(req.nodeid), LONG));
      case Op.OPEN: {
        if (req.nodeid === ROOT) return answer(-E.EISDIR);
        const flags = b.readUInt32LE(0);
        const fd = openSync(this.files.get(this.names[req.nodeid - 2]!)!, (flags & 3) === FS.O_RDONLY ? "r" : "r+");
        const fh = this.nextFh++;
        if (!this.opts.passthrough) {
          this.open.set(fh, { fd, backing: 0 });
          return answer(0, openOut(fh, FOPEN_KEEP_CACHE));
        }
        let backing: number;
        try {
          backing = this.dev.openBacking(fd);
        } catch {
          closeSync(fd);
          return answer(-E.EIO);
        }
        this.open.set(fh, { fd, backing });
        return answer(0, openOut(fh, FOPEN_PASSTHROUGH, backing));
      }
      case Op.READ: {
        this.counts.read++;
        const o = this.open.get(u64(b, 0));
        if (!o) return answer(-E.EBADF);
        const data = Buffer.allocUnsafe(b.readUInt32LE(16));
        return answer(0, data.subarray(0, readSync(o.fd, data, 0, data.length, u64(b, 8))));
      }
      case Op.WRITE: {
        this.counts.write++;
        const o = this.open.get(u64(b, 0));
        if (!o) return answer(-E.EBADF);
        const size = b.readUInt32LE(16);
        return answer(0, sizeOut(writeSync(o.fd, b, 40, size, u64(b, 8))));
      }
      case Op.RELEASE: {
        const fh = u64(b, 0);
        const o = this.open.get(fh);
        this.open.delete(fh);
        if (o) {
          if (o.backing) this.dev.closeBacking(o.backing);
          closeSync(o.fd);
        }
        return answer(0);
      }
      case Op.OPENDIR:
        return answer(0, openOut(0, 0));
      case Op.RELEASEDIR:
        return answer(0);
      case Op.FORGET:
      case Op.BATCH_FORGET:
      case Op.INTERRUPT:
        return;
      default:
        return answer(-E.ENOSYS);
    }
  }
}
