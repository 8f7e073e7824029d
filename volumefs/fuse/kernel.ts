/**
 * The FUSE kernel protocol spoken directly over /dev/fuse: the device, the mount, the request
 * loop, replies and notifications. No libfuse: the kernel ABI (linux/fuse.h, protocol 7.31 as
 * negotiated here) is small, stable and documented, and speaking it ourselves gives what the
 * high-level libfuse 2.9 API of fuse-native cannot: inode-based requests, per-entry cache
 * timeouts, cache invalidation notifications, per-open direct I/O or kept page cache, 1 MiB
 * requests, and no thread hop per request beyond the read of the device.
 *
 * Reads of the device block, so a worker thread does them into slots of shared memory and wakes
 * the main thread only when it is idle; after each batch the main thread polls the slots for a
 * moment first (SPIN_NS), so that a busy program's next request needs no wake-up. The worker
 * answers three kinds of request itself, from shared tables the main thread keeps exact: GETATTR
 * (AttrTable), the xattr questions of nodes that have none (NodeBits), and LOOKUP of a name never
 * made in a directory made through this mount (NameFilter and FuseDevice.madeDirs). Replies are
 * written synchronously: the kernel never blocks a reply. Notifications can block (an entry
 * invalidation takes the directory's lock, which a request we have not answered yet may hold), so
 * they are written from the pool, one at a time.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import { getSystemErrorName } from "node:util";
import { constants } from "node:os";
import { Worker } from "node:worker_threads";
import { VolumeError } from "../errors.js";
import { koffi, packagePath } from "../native.js";

const E = constants.errno;

/** Request opcodes (enum fuse_opcode). */
export const Op = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  RENAME2: 45,
} as const;

/** INIT flags we ask for (when the kernel offers them). */
export const Init = {
  ASYNC_READ: 1 << 0,
  ATOMIC_O_TRUNC: 1 << 3,
  BIG_WRITES: 1 << 5,
  PARALLEL_DIROPS: 1 << 18,
  MAX_PAGES: 1 << 22,
  CACHE_SYMLINKS: 1 << 23,
  /** We drop setuid/setgid bits on write, truncate and O_TRUNC when the kernel says so (FUSE_*_KILL_SUIDGID). */
  HANDLE_KILLPRIV_V2: 1 << 28,
} as const;

/** write_flags, open_flags and setattr bits that ask us to drop setuid/setgid bits. */
export const WRITE_KILL_SUIDGID = 1 << 2;
export const OPEN_KILL_SUIDGID = 1 << 0;
export const FATTR_KILL_SUIDGID = 1 << 11;

/** open_flags of an open or create reply. */
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;
/** The kernel reads and writes the open file's backing file itself (`FuseDevice.openBacking`; protocol 7.40). */
export const FOPEN_PASSTHROUGH = 1 << 7;

/** INIT flags: the second word of flags (flags2) is present (protocol 7.36). */
export const INIT_EXT = 1 << 30;
/** INIT flags2 bits (flag bit 32 + n). */
export const Init2 = {
  /** Backing files (flag bit 37): see `FuseDevice.openBacking`. */
  PASSTHROUGH: 1 << 5,
} as const;

/** setattr `valid` bits. */
export const Fattr = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  FH: 1 << 6,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
} as const;

export const GETATTR_FH = 1 << 0;
export const NOTIFY_INVAL_INODE = 2;
export const NOTIFY_INVAL_ENTRY = 3;

/** The protocol version we speak. */
const MAJOR = 7;
const MINOR = 31;
/** Largest READ/WRITE payload: 256 pages. */
export const MAX_IO = 1024 * 1024;
const IN_HEADER = 40;
const OUT_HEADER = 16;
/** Size of `struct fuse_attr`. */
export const ATTR_SIZE = 88;
/** Size of `struct fuse_entry_out`. */
export const ENTRY_SIZE = 40 + ATTR_SIZE;

/** One request from the kernel; `body` is only valid until the handler returns (its buffer is reused). */
export interface Request {
  opcode: number;
  unique: bigint;
  nodeid: number;
  uid: number;
  gid: number;
  pid: number;
  body: Buffer;
}

/** Attributes as the kernel wants them. Times in ms since the epoch. */
export interface KernelAttr {
  ino: number;
  size: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  atime: number;
  mtime: number;
  ctime: number;
}

/** Writes a non-negative integer below 2^53 as a little-endian u64. */
function w64(b: Buffer, v: number, off: number): void {
  b.writeUInt32LE(v >>> 0, off);
  b.writeUInt32LE(Math.floor(v / 0x1_0000_0000) >>> 0, off + 4);
}

/** Writes `struct fuse_attr` at `off`. */
export function writeAttr(b: Buffer, off: number, a: KernelAttr): void {
  w64(b, a.ino, off);
  w64(b, a.size, off + 8);
  w64(b, Math.ceil(a.size / 512), off + 16);
  const t = (ms: number, at: number, nsAt: number) => {
    const s = Math.max(0, Math.floor(ms / 1000));
    w64(b, s, off + at);
    b.writeUInt32LE(Math.round((ms - s * 1000) * 1e6) % 1e9, off + nsAt);
  };
  t(a.atime, 24, 48);
  t(a.mtime, 32, 52);
  t(a.ctime, 40, 56);
  b.writeUInt32LE(a.mode >>> 0, off + 60);
  b.writeUInt32LE(a.nlink, off + 64);
  b.writeUInt32LE(a.uid >>> 0, off + 68);
  b.writeUInt32LE(a.gid >>> 0, off + 72);
  b.writeUInt32LE(0, off + 76);
  b.writeUInt32LE(MAX_IO, off + 80);
  b.writeUInt32LE(0, off + 84);
}

/** Writes a cache timeout (seconds, may be fractional) as u64 seconds at `secAt` and u32 ns at `nsAt`. */
export function writeTimeout(b: Buffer, seconds: number, secAt: number, nsAt: number): void {
  const s = Math.floor(seconds);
  w64(b, s, secAt);
  b.writeUInt32LE(Math.round((seconds - s) * 1e9), nsAt);
}

/** `struct fuse_entry_out`. */
export function entryOut(nodeid: number, attr: KernelAttr, entryTimeout: number, attrTimeout: number): Buffer {
  const b = Buffer.alloc(ENTRY_SIZE);
  w64(b, nodeid, 0);
  writeTimeout(b, entryTimeout, 16, 32);
  writeTimeout(b, attrTimeout, 24, 36);
  writeAttr(b, 40, attr);
  return b;
}

/** A negative entry: "no such name", cached for `timeout` seconds. */
export function negativeEntryOut(timeout: number): Buffer {
  const b = Buffer.alloc(ENTRY_SIZE);
  writeTimeout(b, timeout, 16, 32);
  return b;
}

/** `struct fuse_attr_out`. */
export function attrOut(attr: KernelAttr, attrTimeout: number): Buffer {
  const b = Buffer.alloc(16 + ATTR_SIZE);
  writeTimeout(b, attrTimeout, 0, 8);
  writeAttr(b, 16, attr);
  return b;
}

/** `struct fuse_open_out`; `backingId` with FOPEN_PASSTHROUGH. */
export function openOut(fh: number, flags: number, backingId = 0): Buffer {
  const b = Buffer.alloc(16);
  w64(b, fh, 0);
  b.writeUInt32LE(flags, 8);
  b.writeInt32LE(backingId, 12);
  return b;
}

/** What an INIT reply says (`initOut`). */
export interface InitReply {
  minor: number;
  maxReadahead: number;
  /** INIT flags (the first word). */
  flags: number;
  /** INIT flags2 (with INIT_EXT in `flags`). */
  flags2?: number;
  /** Stack depth of backing files (with Init2.PASSTHROUGH). */
  maxStackDepth?: number;
  maxBackground: number;
  congestionThreshold: number;
}

/** `struct fuse_init_out`: writes of up to MAX_IO, nanosecond times. */
export function initOut(r: InitReply): Buffer {
  const b = Buffer.alloc(64);
  b.writeUInt32LE(MAJOR, 0);
  b.writeUInt32LE(r.minor, 4);
  b.writeUInt32LE(r.maxReadahead, 8);
  b.writeUInt32LE(r.flags >>> 0, 12);
  b.writeUInt16LE(r.maxBackground, 16);
  b.writeUInt16LE(r.congestionThreshold, 18);
  b.writeUInt32LE(MAX_IO, 20); // max_write
  b.writeUInt32LE(1, 24); // time_gran: nanoseconds
  b.writeUInt16LE(MAX_IO / 4096, 28); // max_pages
  b.writeUInt32LE(r.flags2 ?? 0, 32);
  b.writeUInt32LE(r.maxStackDepth ?? 0, 36);
  return b;
}

/** A u32 then padding: write_out, getxattr_out. */
export function sizeOut(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(n, 0);
  return b;
}

/** Reads a NUL-terminated name at `off`; returns it and the offset after the NUL. */
export function cstring(b: Buffer, off: number): [string, number] {
  let end = b.indexOf(0, off);
  if (end < 0) end = b.length;
  return [b.toString("utf8", off, end), end + 1];
}

/** Reads a u64 as a number (node ids, handles and offsets stay far below 2^53). */
export function u64(b: Buffer, off: number): number {
  return b.readUInt32LE(off) + b.readUInt32LE(off + 4) * 0x1_0000_0000;
}

/** One `struct fuse_dirent` (d_off is the offset of the next entry). */
export function direntSize(name: string): number {
  return (24 + Buffer.byteLength(name) + 7) & ~7;
}

export function writeDirent(b: Buffer, off: number, ino: number, next: number, name: string, type: number): number {
  const len = b.write(name, off + 24, "utf8");
  w64(b, ino, off);
  w64(b, next, off + 8);
  b.writeUInt32LE(len, off + 16);
  b.writeUInt32LE(type, off + 20);
  const size = (24 + len + 7) & ~7;
  b.fill(0, off + 24 + len, off + size);
  return size;
}

/** What the device delivers to its owner. */
export interface DeviceHandler {
  /** Handles one request; must copy what it needs from `req.body` before returning. */
  request(req: Request): void;
}

/** Options of `FuseDevice.mount`. */
export interface DeviceMountOptions {
  /** Shown as the source in /proc/mounts. */
  fsname: string;
}

/** Atomics.waitAsync (Node 16+; typed in lib es2024, newer than this project's target). */
const waitAsync = (Atomics as unknown as { waitAsync(ta: Int32Array, index: number, value: number): { async: boolean; value: Promise<unknown> | string } }).waitAsync;

/** Request slots shared with the reader thread. */
const SLOTS = 8;

/**
 * How long the main thread polls for a device's next request after answering a batch, and the
 * reader thread after answering one itself, before it sleeps (STRATA_FUSE_SPIN_US, microseconds;
 * 0 turns polling off). A program working through a mount sends its next request a few
 * microseconds after our reply; found by polling, it costs no wake-up of a sleeping thread,
 * which on a virtual machine whose idle vCPUs halt is the largest cost of a small request. The
 * bound keeps the loop's other work (thread pool completions, sockets) waiting at most this
 * long, and the CPU spent at most this much per batch.
 */
const SPIN_NS = BigInt(Math.round(Math.max(0, Number(process.env.STRATA_FUSE_SPIN_US ?? 100) || 0) * 1000));

/** A started device's side of the poll: whether a request is waiting, take it, or go to sleep. */
interface Poller {
  ready(): boolean;
  take(): void;
  sleep(): void;
}

/** Devices polling for their next request; one loop polls them all (one process may serve many mounts). */
const polling = new Set<Poller>();
let pollScheduled = false;
/**
 * Requests of this process's devices whose handler has not replied yet when the poll starts: it
 * waits for the thread pool, a socket or a timer, whose completion the poll would delay. So no
 * poll runs while there are any (the devices sleep and are woken as before).
 */
let unanswered = 0;

function pollLater(p: Poller): void {
  polling.add(p);
  schedulePoll();
}

function schedulePoll(): void {
  if (pollScheduled) return;
  pollScheduled = true;
  // After the replies of this batch: its handlers' continuations run first (microtasks).
  setImmediate(pollDevices);
}

/**
 * Takes the first device with a request, or, after SPIN_NS with none, puts every polled device
 * to sleep. A polled device gets no wake-up from its reader, so whoever leaves devices in
 * `polling` must make sure a poll is scheduled: a device taken here may end instead of asking
 * to be polled again, and the others must not be stranded.
 */
function pollDevices(): void {
  pollScheduled = false;
  const until = unanswered > 0 ? 0n : process.hrtime.bigint() + SPIN_NS;
  let taken: Poller | undefined;
  do {
    for (const p of polling) {
      if (p.ready()) {
        taken = p;
        break;
      }
    }
  } while (!taken && process.hrtime.bigint() < until);
  if (taken) {
    polling.delete(taken);
    try {
      taken.take();
    } finally {
      if (polling.size > 0) schedulePoll();
    }
    return;
  }
  const idle = [...polling];
  polling.clear();
  for (const p of idle) p.sleep();
}

/** Node ids the no-xattrs bitmap covers (512 KiB); larger ids are answered by the main thread. */
const NO_XATTR_NODES = 1 << 22;

/** A set of node ids below a bound, shared with the reader thread (Atomics on 32-bit words). */
export class NodeBits {
  readonly sab: SharedArrayBuffer;
  private readonly words: Int32Array;

  constructor(readonly size: number) {
    this.sab = new SharedArrayBuffer(Math.ceil(size / 32) * 4);
    this.words = new Int32Array(this.sab);
  }

  add(id: number): void {
    if (id < this.size) Atomics.or(this.words, id >>> 5, 1 << (id & 31));
  }

  delete(id: number): void {
    if (id < this.size) Atomics.and(this.words, id >>> 5, ~(1 << (id & 31)));
  }

  clear(): void {
    for (let i = 0; i < this.words.length; i++) Atomics.store(this.words, i, 0);
  }
}

/** Bits of the name filter (2 MiB of shared memory). */
const NAME_BITS = 1 << 24;
/** Names the filter takes before it starts over (about 1.4% false positives at two bits each). */
const NAME_LIMIT = 1 << 20;
/** Node ids the made-directories bitmap covers; larger ids are answered by the main thread. */
const MADE_DIR_NODES = 1 << 22;

/**
 * The two 24-bit filter positions of name bytes [from, to) of `b` under directory `parent` (FNV-1a
 * with two offsets, then a finalizer). A function expression with literals only: the reader
 * thread's source embeds its text.
 */
export const nameBits = function (parent: number, b: Uint8Array, from: number, to: number): [number, number] {
  let h1 = Math.imul(0x811c9dc5 ^ parent, 0x01000193);
  let h2 = Math.imul(0x9747b28c ^ parent, 0x01000193);
  for (let i = from; i < to; i++) {
    h1 = Math.imul(h1 ^ b[i]!, 0x01000193);
    h2 = Math.imul(h2 ^ b[i]!, 0x01000193);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 0x85ebca6b);
  h2 = Math.imul(h2 ^ (h2 >>> 13), 0xc2b2ae35);
  return [(h1 ^ (h1 >>> 15)) >>> 8, (h2 ^ (h2 >>> 16)) >>> 8];
};

/**
 * Names that may exist, per directory node: a Bloom filter the main thread adds to (before a
 * request that makes a name is carried out) and the reader thread reads. It never forgets a name
 * (a removed one only costs a trip to the main thread), so "not in the filter" means "was never
 * made through this mount". Full, it starts over, and so must every use of it (see FuseDevice.madeDirs).
 */
export class NameFilter {
  readonly sab = new SharedArrayBuffer(NAME_BITS / 8);
  private readonly words = new Int32Array(this.sab);
  private count = 0;

  /** Adds `name` under `parent`; false when the filter is full (the caller starts it over). */
  add(parent: number, name: string): boolean {
    if (this.count >= NAME_LIMIT) return false;
    this.count++;
    const b = Buffer.from(name);
    for (const bit of nameBits(parent, b, 0, b.length)) Atomics.or(this.words, bit >>> 5, 1 << (bit & 31));
    return true;
  }

  clear(): void {
    for (let i = 0; i < this.words.length; i++) Atomics.store(this.words, i, 0);
    this.count = 0;
  }
}

/** Slots of the attribute table (a power of two; node ids share a slot modulo this). */
const ATTR_SLOTS = 1 << 17;
/** Size of `struct fuse_attr_out`. */
const ATTR_OUT_SIZE = 16 + ATTR_SIZE;

/**
 * Attribute replies the reader thread may give without waking the main thread: one
 * `struct fuse_attr_out` per slot, the slot chosen by node id. The main thread is the only
 * writer; each slot has a sequence word (odd while being written) and the node id it holds, so a
 * reader that sees the sequence change under it, or another node, leaves the request to the main
 * thread.
 */
export class AttrTable {
  /** Per slot: [sequence, node id (0: empty)]. */
  readonly ctrlSab = new SharedArrayBuffer(ATTR_SLOTS * 8);
  readonly dataSab = new SharedArrayBuffer(ATTR_SLOTS * ATTR_OUT_SIZE);
  private readonly ctrl = new Int32Array(this.ctrlSab);
  private readonly data = new Uint8Array(this.dataSab);

  /** Stores the reply for `node` (`out`: a `struct fuse_attr_out`). */
  put(node: number, out: Uint8Array): void {
    if (node > 0x7fffffff) return;
    const s = (node & (ATTR_SLOTS - 1)) * 2;
    const q = Atomics.load(this.ctrl, s);
    Atomics.store(this.ctrl, s, (q + 1) | 0);
    this.data.set(out.subarray(0, ATTR_OUT_SIZE), (s / 2) * ATTR_OUT_SIZE);
    Atomics.store(this.ctrl, s + 1, node);
    Atomics.store(this.ctrl, s, (q + 2) | 0);
  }

  /** Forgets the reply for `node`: its next GETATTR reaches the main thread. */
  drop(node: number): void {
    const s = (node & (ATTR_SLOTS - 1)) * 2;
    if (Atomics.load(this.ctrl, s + 1) !== node) return;
    const q = Atomics.load(this.ctrl, s);
    Atomics.store(this.ctrl, s, (q + 1) | 0);
    Atomics.store(this.ctrl, s + 1, 0);
    Atomics.store(this.ctrl, s, (q + 2) | 0);
  }

  /** Forgets every reply. */
  clear(): void {
    for (let s = 0; s < ATTR_SLOTS * 2; s += 2) if (Atomics.load(this.ctrl, s + 1) !== 0) this.drop(Atomics.load(this.ctrl, s + 1));
  }
}

/**
 * The reader thread (plain JavaScript, evaluated as a worker): once told its device (one
 * message), blocking reads of the device into the next free slot, except the requests it
 * answers itself (GETATTR from the attribute table, GETXATTR and LISTXATTR of nodes without
 * xattrs, LOOKUP of names missing from directories made through this mount); a message to the
 * main thread (Atomics.notify) only when it said it was idle; a message at the end.
 * Control words: [0, slots) slot full flags, [slots, 2·slots) lengths, 2·slots the idle flag.
 */
const READER_SOURCE = `
const { readSync, writeSync } = require("node:fs");
const { parentPort } = require("node:worker_threads");
const nameBits = ${nameBits.toString()};
parentPort.once("message", ({ fd, sab, slots, slotSize, ctrlBytes, bits, answered, attrCtrl, attrData, names, madeDirs, koffiPath, spinNs }) => {
  // After answering a request itself, the thread polls the device (poll(2) through koffi, with
  // no wait) for up to spinNs before its next read blocks: a program that stats or looks up
  // names one after another sends the next request a few microseconds after the reply, and a
  // blocked read would cost a sleep and a wake-up of this thread for each: on a 2-vCPU virtual
  // machine, stats after writes ran at 14-18k/s without the poll and 37-44k/s with it.
  let pollNow;
  try {
    const koffi = require(koffiPath);
    const poll = koffi.load("libc.so.6").func("int poll(_Inout_ uint8_t *fds, unsigned long nfds, int timeout)");
    const pfd = Buffer.alloc(8);
    pfd.writeInt32LE(fd, 0);
    pfd.writeInt16LE(1, 4); // POLLIN
    pollNow = () => poll(pfd, 1, 0) > 0;
  } catch {
    pollNow = undefined;
  }
  const SPIN = pollNow ? BigInt(spinNs || 0) : 0n;
  const hr = process.hrtime.bigint;
  function spin() {
    const end = hr() + SPIN;
    do if (pollNow()) return; while (hr() < end);
  }
  const ctrl = new Int32Array(sab, 0, slots * 2 + 2);
  const views = Array.from({ length: slots }, (_, i) => new Uint8Array(sab, ctrlBytes + i * slotSize, slotSize));
  const dvs = views.map((v) => new DataView(v.buffer, v.byteOffset, v.byteLength));
  const noXattrs = new Int32Array(bits);
  const count = new Int32Array(answered);
  const NBITS = noXattrs.length * 32;
  const tctrl = new Int32Array(attrCtrl);
  const tdata = new Uint8Array(attrData);
  const TSLOTS = tctrl.length / 2;
  const ATTR_OUT = tdata.length / TSLOTS;
  const out = new Uint8Array(16 + ATTR_OUT);
  const outView = new DataView(out.buffer);
  const IDLE = slots * 2;
  const nameWords = new Int32Array(names);
  const made = new Int32Array(madeDirs);
  const NMADE = made.length * 32;
  function send(len) {
    try {
      writeSync(fd, out, 0, len);
    } catch {
      // ENOENT: the request was interrupted meanwhile.
    }
  }
  // GETATTR (3) of a node whose reply the main thread put in the attribute table: the reply
  // from there, unless the slot changed (or holds another node) while it was copied.
  function attr(v, dv) {
    if (dv.getUint32(20, true) !== 0) return false;
    const node = dv.getUint32(16, true);
    const s = (node & (TSLOTS - 1)) * 2;
    const q = Atomics.load(tctrl, s);
    if (q & 1 || Atomics.load(tctrl, s + 1) !== node) return false;
    out.set(tdata.subarray((s / 2) * ATTR_OUT, (s / 2 + 1) * ATTR_OUT), 16);
    if (Atomics.load(tctrl, s) !== q) return false;
    outView.setUint32(0, 16 + ATTR_OUT, true);
    outView.setInt32(4, 0, true);
    out.set(v.subarray(8, 16), 8);
    send(16 + ATTR_OUT);
    Atomics.add(count, 2, 1);
    return true;
  }
  // LOOKUP (1) of an ASCII name in a directory made through this mount, when the name filter
  // says it was never made there: ENOENT, not cached by the kernel. The filter is read before the
  // directory's bit, and the main thread clears the bits before the filter.
  function lookup(v, dv, n) {
    if (dv.getUint32(20, true) !== 0 || n < 42 || v[n - 1] !== 0) return false;
    for (let i = 40; i < n - 1; i++) if (v[i] >= 0x80 || v[i] === 0) return false;
    const node = dv.getUint32(16, true);
    for (const bit of nameBits(node, v, 40, n - 1)) if ((Atomics.load(nameWords, bit >>> 5) & (1 << (bit & 31))) !== 0) return false;
    if (node >= NMADE || (Atomics.load(made, node >>> 5) & (1 << (node & 31))) === 0) return false;
    outView.setUint32(0, 16, true);
    outView.setInt32(4, -2, true);
    out.set(v.subarray(8, 16), 8);
    send(16);
    Atomics.add(count, 3, 1);
    return true;
  }
  // A request this thread answers itself (true), else false: LOOKUP, GETATTR (above), and
  // GETXATTR (22) and LISTXATTR (23) of a node the main thread marked as having no extended
  // attributes (ENODATA, an empty list).
  function answer(v, dv, n) {
    if (n < 40) return false;
    const op = dv.getUint32(4, true);
    if (op === 1) return lookup(v, dv, n);
    if (n < 48) return false;
    if (op === 3) return attr(v, dv);
    if (op !== 22 && op !== 23) return false;
    if (dv.getUint32(20, true) !== 0) return false;
    const node = dv.getUint32(16, true);
    if (node >= NBITS || (Atomics.load(noXattrs, node >>> 5) & (1 << (node & 31))) === 0) return false;
    let len = 16;
    outView.setInt32(4, op === 22 ? -61 : 0, true);
    if (op === 23 && dv.getUint32(40, true) === 0) {
      outView.setBigUint64(16, 0n, true);
      len = 24;
    }
    outView.setUint32(0, len, true);
    out.set(v.subarray(8, 16), 8);
    send(len);
    Atomics.add(count, op === 22 ? 0 : 1, 1);
    return true;
  }
  let i = 0;
  for (;;) {
    while (Atomics.load(ctrl, i) !== 0) Atomics.wait(ctrl, i, 1);
    let n;
    try {
      n = readSync(fd, views[i], 0, slotSize, null);
    } catch (e) {
      // ENOENT: the request was interrupted before it was read; EINTR, EAGAIN: try again; else
      // (ENODEV) the session ended.
      if (e.code === "ENOENT" || e.code === "EINTR" || e.code === "EAGAIN") continue;
      break;
    }
    if (answer(views[i], dvs[i], n)) {
      if (SPIN > 0n) spin();
      continue;
    }
    Atomics.store(ctrl, slots + i, n);
    Atomics.store(ctrl, i, 1);
    if (Atomics.compareExchange(ctrl, IDLE, 1, 0) === 1) Atomics.notify(ctrl, IDLE);
    i = (i + 1) % slots;
  }
  parentPort.postMessage("end");
});
`;

const SLOT_SIZE = MAX_IO + 4096;
const CTRL_BYTES = (SLOTS * 2 + 2) * 4;

/** A reader thread not yet given a device, and the slots it will fill. */
interface Reader {
  worker: Worker;
  sab: SharedArrayBuffer;
  dead: boolean;
}

function newReader(): Reader {
  const r: Reader = { worker: new Worker(READER_SOURCE, { eval: true }), sab: new SharedArrayBuffer(CTRL_BYTES + SLOTS * SLOT_SIZE), dead: false };
  r.worker.once("exit", () => (r.dead = true));
  return r;
}

/**
 * An open /dev/fuse mounted at a directory. `start` begins serving; `closed` resolves when the
 * kernel ends the session (unmount or abort).
 */
export class FuseDevice {
  /**
   * Nodes known to have no extended attributes: the reader thread answers their GETXATTR
   * (ENODATA) and LISTXATTR (an empty list) itself. The kernel asks for security.capability
   * before every write, so this saves the main thread one wake-up per write.
   */
  readonly noXattrs = new NodeBits(NO_XATTR_NODES);
  /** Attribute replies the reader thread gives itself (GETATTR). */
  readonly attrs = new AttrTable();
  /**
   * Directories made through this mount (empty then, so every name in them since was made by a
   * request, and is in `names`): the reader thread answers a LOOKUP there of a name not in
   * `names` with ENOENT. Cleared before `names` starts over and whenever the content may have
   * changed other than through this mount (a base move).
   */
  readonly madeDirs = new NodeBits(MADE_DIR_NODES);
  /** Names made through this mount, per directory (see madeDirs). */
  readonly names = new NameFilter();
  private readonly answeredSab = new SharedArrayBuffer(16);
  /** GETXATTR, LISTXATTR, GETATTR and LOOKUP requests the reader thread answered. */
  answered(): { getxattr: number; listxattr: number; getattr: number; lookup: number } {
    const c = new Int32Array(this.answeredSab);
    return { getxattr: Atomics.load(c, 0), listxattr: Atomics.load(c, 1), getattr: Atomics.load(c, 2), lookup: Atomics.load(c, 3) };
  }
  private ended = false;
  private notifyChain: Promise<void> = Promise.resolve();
  private resolveClosed!: () => void;
  /** Resolves when the session has ended and no read is outstanding. */
  readonly closed = new Promise<void>((res) => (this.resolveClosed = res));

  private constructor(
    readonly fd: number,
    readonly dir: string,
    /** The connection's number in /sys/fs/fuse/connections (the mount's minor device), if found. */
    readonly connection: number | undefined,
  ) {}

  /** Opens /dev/fuse and mounts it at `dir` (mount(8) with the device as fd 3). */
  static async mount(dir: string, opts: DeviceMountOptions): Promise<FuseDevice> {
    let fd: number;
    try {
      fd = fs.openSync("/dev/fuse", "r+");
    } catch (err) {
      throw VolumeError.IO("open /dev/fuse", err, { hint: "FUSE needs the fuse kernel module and /dev/fuse (run as root: bash scripts/setup.sh)" });
    }
    const uid = process.getuid?.() ?? 0;
    const gid = process.getgid?.() ?? 0;
    const options = [`fd=3`, `rootmode=40000`, `user_id=${uid}`, `group_id=${gid}`, "allow_other", `max_read=${MAX_IO}`].join(",");
    const fsname = opts.fsname.replace(/[\s,\\]/g, "_");
    try {
      await new Promise<void>((resolve, reject) => {
        const child = spawn("mount", ["-i", "-t", "fuse.strata", "-o", options, fsname, dir], { stdio: ["ignore", "ignore", "pipe", fd] });
        let stderr = "";
        child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
        child.on("error", reject);
        child.on("exit", (code) => (code === 0 ? resolve() : reject(new Error(stderr.trim() || `mount exited with ${code}`))));
      });
    } catch (err) {
      fs.closeSync(fd);
      throw VolumeError.IO(`mount ${dir}`, err, { hint: "mounting FUSE needs root (or CAP_SYS_ADMIN) and mount(8)" });
    }
    return new FuseDevice(fd, dir, await connectionOf(dir));
  }

  /**
   * Starts serving: a worker thread reads requests into a ring of shared slots and wakes this
   * thread only when it is idle; this thread decodes each request in place and frees its slot,
   * then polls (pollDevices) before it says it is idle. (Reading on the thread pool costs a pool
   * hand-off per request; this costs none while busy.)
   */
  start(handler: DeviceHandler): void {
    const slotSize = SLOT_SIZE;
    const ctrlBytes = CTRL_BYTES;
    const spare = FuseDevice.spare;
    FuseDevice.spare = undefined;
    const reader = spare && !spare.dead ? spare : newReader();
    const sab = reader.sab;
    const ctrl = new Int32Array(sab, 0, SLOTS * 2 + 2);
    const views = Array.from({ length: SLOTS }, (_, i) => Buffer.from(sab, ctrlBytes + i * slotSize, slotSize));
    const IDLE = SLOTS * 2;
    Atomics.store(ctrl, IDLE, 1);
    let head = 0;
    const drain = (): void => {
      while (Atomics.load(ctrl, head) === 1) {
        const n = Atomics.load(ctrl, SLOTS + head);
        this.dispatch(handler, views[head]!, n);
        Atomics.store(ctrl, head, 0);
        Atomics.notify(ctrl, head);
        head = (head + 1) % SLOTS;
      }
      // Not idle while polled: the reader sees IDLE 0 and sends no wake-up.
      if (SPIN_NS > 0n && !this.ended) return pollLater(poller);
      idle();
    };
    /** Says this thread is idle and sleeps, after the batch (or after a poll found nothing). */
    const idle = (): void => {
      Atomics.store(ctrl, IDLE, 1);
      // A request that landed after the last check and before IDLE was set: take it here,
      // unless the reader has already claimed the wake-up (then its notify will come).
      if (Atomics.load(ctrl, head) !== 1 || Atomics.compareExchange(ctrl, IDLE, 1, 0) !== 1) return sleep();
      drain();
    };
    const poller: Poller = { ready: () => Atomics.load(ctrl, head) === 1, take: drain, sleep: idle };
    const sleep = (): void => {
      if (this.ended) return;
      const w = waitAsync(ctrl, IDLE, 1);
      if (w.async) void (w.value as Promise<unknown>).then(drain);
      else drain();
    };
    const worker = reader.worker;
    worker.ref();
    worker.postMessage({ fd: this.fd, sab, slots: SLOTS, slotSize, ctrlBytes, bits: this.noXattrs.sab, answered: this.answeredSab, attrCtrl: this.attrs.ctrlSab, attrData: this.attrs.dataSab, names: this.names.sab, madeDirs: this.madeDirs.sab, koffiPath: packagePath("koffi"), spinNs: Number(SPIN_NS) });
    this.worker = worker;
    sleep();
    worker.on("message", () => {
      drain();
      this.ended = true;
      Atomics.notify(ctrl, IDLE);
      void worker.terminate();
      this.finish();
    });
    worker.on("error", (err) => {
      process.stderr.write(`strata fuse: device reader failed: ${err.message}\n`);
      this.ended = true;
      this.finish();
    });
  }

  private worker: Worker | undefined;

  /** A started reader thread waiting for the next device (`prepareReader`). */
  private static spare: Reader | undefined;

  /**
   * Starts a reader thread for the next `start` of this process, unless one waits already, so
   * that a process that mounts again and again (the node agent) does not wait for a thread to
   * start on each mount (about 20 ms here). The thread does not keep the process alive.
   */
  static prepareReader(): void {
    if (FuseDevice.spare && !FuseDevice.spare.dead) return;
    const r = newReader();
    r.worker.unref();
    r.worker.on("error", () => (r.dead = true));
    FuseDevice.spare = r;
  }

  private dispatch(handler: DeviceHandler, buf: Buffer, n: number): void {
    if (n < IN_HEADER) return;
    const req: Request = {
      opcode: buf.readUInt32LE(4),
      unique: buf.readBigUInt64LE(8),
      nodeid: u64(buf, 16),
      uid: buf.readUInt32LE(24),
      gid: buf.readUInt32LE(28),
      pid: buf.readUInt32LE(32),
      body: buf.subarray(IN_HEADER, n),
    };
    if (req.opcode !== Op.FORGET && req.opcode !== Op.BATCH_FORGET && req.opcode !== Op.INTERRUPT && !this.awaiting.has(req.unique)) {
      this.awaiting.add(req.unique);
      unanswered++;
    }
    try {
      handler.request(req);
    } catch (e) {
      this.reply(req.unique, -E.EIO);
      process.stderr.write(`strata fuse: request ${req.opcode}: ${(e as Error).message}\n`);
    }
  }

  /** Requests dispatched and not replied to yet (see `unanswered`). */
  private readonly awaiting = new Set<bigint>();

  private finish(): void {
    if (this.finished) return;
    this.finished = true;
    unanswered -= this.awaiting.size;
    this.awaiting.clear();
    this.closeWhenIdle();
  }

  /**
   * Closes the device once the session finished and no notification's write is still on the
   * thread pool: a descriptor number closed under a pending write may name another file by the
   * time the write runs, which would then take the notification's bytes.
   */
  private closeWhenIdle(): void {
    if (!this.finished || this.writing > 0 || this.closedFd) return;
    this.closedFd = true;
    try {
      fs.closeSync(this.fd);
    } catch {
      // already closed
    }
    this.resolveClosed();
  }

  private finished = false;
  private closedFd = false;
  /** Notification writes on the thread pool (`notifyNow`). */
  private writing = 0;
  private readonly header = Buffer.alloc(OUT_HEADER);

  /** True once the kernel ended the session. */
  get isEnded(): boolean {
    return this.ended;
  }

  /** Answers request `unique` with `error` (0 or a negative errno) and the payload parts. */
  reply(unique: bigint, error: number, ...payload: Uint8Array[]): void {
    if (this.awaiting.delete(unique)) unanswered--;
    if (this.ended) return;
    let len = OUT_HEADER;
    for (const p of payload) len += p.length;
    const h = this.header; // written synchronously below, so one buffer serves every reply
    h.writeUInt32LE(len, 0);
    h.writeInt32LE(error, 4);
    h.writeBigUInt64LE(unique, 8);
    try {
      if (payload.length === 0) fs.writeSync(this.fd, h);
      else fs.writevSync(this.fd, [h, ...payload]);
    } catch (err) {
      // ENOENT: the request was interrupted meanwhile; ENODEV: the session ended.
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENODEV") this.ended = true;
      else if (code !== "ENOENT") throw err;
    }
  }

  /** Sends a notification (e.g. an invalidation) after those queued before it. Never rejects. */
  notify(code: number, ...payload: Uint8Array[]): Promise<void> {
    this.notifyChain = this.notifyChain.then(() => this.notifyNow(code, ...payload));
    return this.notifyChain;
  }

  /**
   * Sends a notification from this thread, at once: only one that takes no lock a request in
   * progress may hold, so that a handler can send it before its reply without a round trip
   * through the thread pool (NOTIFY_INVAL_INODE with a negative offset: attributes only, no
   * pages). It overtakes queued notifications (`notify`).
   */
  notifySync(code: number, ...payload: Uint8Array[]): void {
    if (this.ended) return;
    try {
      fs.writevSync(this.fd, notification(code, payload));
    } catch {
      // ENOENT: the kernel no longer knows the inode; ENODEV: the session ended.
    }
  }

  /**
   * Sends a notification now, not after those queued (`notify`): for one that may wait for a
   * lock a request being answered holds, which a handler of that request must not wait behind.
   * Never rejects.
   */
  async notifyNow(code: number, ...payload: Uint8Array[]): Promise<void> {
    if (this.ended || this.finished) return;
    this.writing++;
    await new Promise<void>((res) =>
      fs.writev(this.fd, notification(code, payload), () => {
        this.writing--;
        this.closeWhenIdle();
        res();
      }),
    );
  }

  /**
   * Registers `fileFd` (a file of a local file system, open for what the kernel will do with it)
   * as a backing file of this connection (ioctl FUSE_DEV_IOC_BACKING_OPEN; needs CAP_SYS_ADMIN
   * and a session whose INIT accepted Init2.PASSTHROUGH with a stack depth). An open or create
   * reply carrying the returned id and FOPEN_PASSTHROUGH has the kernel read, write and map that
   * file itself, through the backing file system's page cache: no READ or WRITE requests reach
   * the server for that open file. The kernel keeps its own reference from the reply on, so the
   * id (and `fileFd`) may be closed once the open is answered. Throws VolumeError IO when refused.
   */
  openBacking(fileFd: number): number {
    // After finish the number may name another file (another mount's device, even).
    if (this.finished) throw VolumeError.IO("register a FUSE backing file", new Error("the session ended"));
    const map = Buffer.alloc(16); // struct fuse_backing_map { s32 fd; u32 flags; u64 padding; }
    map.writeInt32LE(fileFd, 0);
    const id = ioctls().call(this.fd, FUSE_DEV_IOC_BACKING_OPEN, map);
    if (id < 0) throw VolumeError.IO("register a FUSE backing file", errnoError(ioctls().errno(), "ioctl"), { hint: "backing files need Linux 6.9 or newer, root, and a session that accepted them at INIT" });
    return id;
  }

  /** Drops a backing file id (`openBacking`); files already open on it keep their backing. */
  closeBacking(id: number): void {
    if (this.finished) return; // the connection's backing files went with it
    const arg = Buffer.alloc(4);
    arg.writeUInt32LE(id, 0);
    if (ioctls().call(this.fd, FUSE_DEV_IOC_BACKING_CLOSE, arg) < 0) {
      const errno = ioctls().errno();
      if (!this.ended) throw VolumeError.IO(`drop FUSE backing file ${id}`, errnoError(errno, "ioctl"));
    }
  }

  /** Detaches the mount (lazily: open files do not block it) and aborts the connection. */
  async unmount(): Promise<void> {
    await new Promise<void>((res) => spawn("umount", ["-l", this.dir], { stdio: "ignore" }).on("exit", () => res()).on("error", () => res()));
    if (!this.ended && this.connection !== undefined) {
      // Wakes the reads still blocked on the device (a lazily detached mount keeps the session
      // alive while files are open in it).
      try {
        fs.writeFileSync(`${await fuseControlDir()}/${this.connection}/abort`, "1");
      } catch {
        // no fusectl (not root, or no sysfs): the reads end when the last file is closed
      }
    }
    this.ended = true;
    await Promise.race([this.closed, new Promise((r) => setTimeout(r, 2000).unref())]);
  }
}

/** A notification's parts: its header (the code where a reply has its error, unique 0), then `payload`. */
function notification(code: number, payload: Uint8Array[]): Uint8Array[] {
  let len = OUT_HEADER;
  for (const p of payload) len += p.length;
  const h = Buffer.alloc(OUT_HEADER);
  h.writeUInt32LE(len, 0);
  h.writeInt32LE(code, 4);
  return [h, ...payload];
}

const FUSECTL = "/sys/fs/fuse/connections";
let fusectlMounted: Promise<void> | undefined;

/**
 * The fuse control file system's directory (one folder per connection, with its `abort`),
 * mounted there first when it is not: a host without systemd (a container, a fresh VM) leaves
 * it unmounted, and without it an unmount cannot end a session whose files are still open.
 */
async function fuseControlDir(): Promise<string> {
  fusectlMounted ??= (async () => {
    const table = await mountTable();
    if (table.some((m) => m.point === FUSECTL && m.type === "fusectl")) return;
    await new Promise<void>((res) => spawn("mount", ["-t", "fusectl", "fusectl", FUSECTL], { stdio: "ignore" }).on("exit", () => res()).on("error", () => res()));
  })();
  await fusectlMounted;
  return FUSECTL;
}

/** _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t) of linux/fuse.h. */
const FUSE_DEV_IOC_BACKING_OPEN = 0x4010e501;
const FUSE_DEV_IOC_BACKING_CLOSE = 0x4004e502;

interface Ioctl {
  call(fd: number, request: number, arg: Buffer): number;
  errno(): number;
}
let ioctlFn: Ioctl | undefined;

/**
 * ioctl(2) from libc through koffi (a foreign function interface with prebuilt binaries): Node
 * has no ioctl, and this saves the project a native module of its own. Loaded on first use, so
 * that processes that never register backing files do not pay for it.
 */
function ioctls(): Ioctl {
  if (ioctlFn) return ioctlFn;
  const k = koffi();
  if (!k) throw new Error("koffi (for ioctl) does not load");
  const f = k.load("libc.so.6").func("int ioctl(int fd, unsigned long request, _Inout_ uint8_t *arg)");
  ioctlFn = { call: (fd, request, arg) => f(fd, request, arg) as number, errno: () => k.errno() };
  return ioctlFn;
}

/** An Error shaped like Node's system errors, from an errno value. */
function errnoError(errno: number, syscall: string): NodeJS.ErrnoException {
  const name = getSystemErrorName(-errno);
  return Object.assign(new Error(`${syscall}: ${name}`), { code: name, errno: -errno, syscall });
}

/** One line of /proc/self/mountinfo. */
export interface MountEntry {
  point: string;
  type: string;
  source: string;
  /** The minor device number (a FUSE mount's connection number). */
  minor: number;
}

/** The mount table of this process, from /proc/self/mountinfo. */
export async function mountTable(): Promise<MountEntry[]> {
  const text = await fs.promises.readFile("/proc/self/mountinfo", "utf8");
  const unescape = (s: string) => s.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8)));
  return text
    .split("\n")
    .filter(Boolean)
    .map((line) => {
      const [left, right = ""] = line.split(" - ");
      const f = left!.split(" ");
      const r = right.split(" ");
      return { point: unescape(f[4] ?? ""), type: r[0] ?? "", source: unescape(r[1] ?? ""), minor: Number((f[2] ?? "").split(":")[1]) };
    });
}

/**
 * The minor device number of the FUSE mount at `dir` (never from a stat of the mount, which this
 * process must not do synchronously while it serves it).
 */
async function connectionOf(dir: string): Promise<number | undefined> {
  return (await mountTable()).filter((m) => m.point === dir && m.type.startsWith("fuse")).at(-1)?.minor;
}
