/** Types for the parts of fuse-native 2.2.6 (a CommonJS module without its own) that the adapter uses. */
declare module "fuse-native" {
  type Cb = (...args: any[]) => void;
  interface FuseOptions {
    debug?: boolean;
    force?: boolean;
    mkdir?: boolean;
    /** Per-op time limit in ms, or false for none (the default is 15 s, then ETIMEDOUT). */
    timeout?: number | false;
    fsname?: string;
    subtype?: string;
    maxRead?: number;
    kernelCache?: boolean;
    autoCache?: boolean;
    attrTimeout?: number;
    entryTimeout?: number;
    allowOther?: boolean;
    defaultPermissions?: boolean;
  }
  class Fuse {
    constructor(mnt: string, ops: Record<string, Cb>, opts?: FuseOptions);
    readonly mnt: string;
    mount(cb: (err: Error | null) => void): void;
    unmount(cb: (err: Error | null) => void): void;
    static unmount(mnt: string, cb: (err: Error | null) => void): void;
  }
  export default Fuse;
}
