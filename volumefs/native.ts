/**
 * The packages the layers load natively: where one resolves from (for a worker, which loads it
 * by path), and koffi, a maintained foreign function interface with prebuilt binaries, for the
 * system calls Node lacks (ioctl, poll, a buffer's address). koffi is loaded on first use, so a
 * process that never needs it does not pay for it.
 */
import { createRequire } from "node:module";

const load = createRequire(import.meta.url);

/** The file package `name` resolves to from this install, or undefined when it does not. */
export function packagePath(name: string): string | undefined {
  try {
    return load.resolve(name);
  } catch {
    return undefined;
  }
}

let koffiModule: typeof import("koffi") | null | undefined;

/** koffi, or undefined where it does not load (not installed, or no binary for this platform). */
export function koffi(): typeof import("koffi") | undefined {
  if (koffiModule === undefined) {
    try {
      koffiModule = load("koffi") as typeof import("koffi");
    } catch {
      koffiModule = null;
    }
  }
  return koffiModule ?? undefined;
}

let flockFn: ((fd: number, op: number) => number) | null | undefined;

/**
 * flock(2) LOCK_EX | LOCK_NB on `fd`: true when taken, false when another open file holds it;
 * undefined where koffi does not load. The kernel lets go of the lock when the holder closes
 * the file or dies, so a lock can never be left behind by a killed process.
 */
export function tryLockExclusive(fd: number): boolean | undefined {
  if (flockFn === undefined) {
    const k = koffi();
    flockFn = k ? (k.load("libc.so.6").func("int flock(int fd, int operation)") as (fd: number, op: number) => number) : null;
  }
  if (!flockFn) return undefined;
  const LOCK_EX = 2;
  const LOCK_NB = 4;
  if (flockFn(fd, LOCK_EX | LOCK_NB) === 0) return true;
  const errno = koffi()!.errno();
  if (errno === 11 /* EWOULDBLOCK */) return false;
  throw Object.assign(new Error(`flock: errno ${errno}`), { errno: -errno, syscall: "flock" });
}
