/**
 * vfs: a volume at a version plus staged changes, and sync (batch copy-on-write), without FUSE.
 */
export * from "./paths.js";
export * from "./tree.js";
export * from "./snapshot.js";
export * from "./overlay.js";
export * from "./build.js";
export * from "./repo.js";
export * from "./fsck.js";
export * from "./mount-types.js";
export * from "./staging.js";
export * from "./control.js";
export * from "./mount.js";
