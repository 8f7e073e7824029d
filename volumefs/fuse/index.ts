/**
 * fuse: serves a `MountFs` (vfs/mount-types.ts) as a kernel FUSE mount: by default speaking the
 * kernel's FUSE protocol over /dev/fuse (kernel.ts, kernel-mount.ts); fuse-native's high-level
 * libfuse API is kept as a second driver (`driver: "fuse-native"`).
 *
 * ```ts
 * import { mountFs, PassthroughFs } from "../volumefs/fuse/index.js";
 * const m = await mountFs(new PassthroughFs("/srv/data"), "/mnt/data");
 * // other processes use /mnt/data; this one only asynchronously
 * await m.unmount();
 * ```
 *
 * Errors become errno values in one place, `toErrno`.
 */
export * from "./errno.js";
export * from "./fuse-mount.js";
export * from "./passthrough-fs.js";
