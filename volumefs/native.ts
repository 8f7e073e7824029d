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
