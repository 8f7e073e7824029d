/**
 * volumefs: versioned volumes over an object store — objects, chunks and packs, trees, sync.
 *
 * ```ts
 * import { Repository, FileObjectStore, splitWritablePath } from "../volumefs/index.js";
 * import { SqliteMetadataStore } from "../metadata/index.js";
 * const repo = new Repository({ meta: SqliteMetadataStore.open({ path: "meta.db" }), objects: new FileObjectStore("objects") });
 * const vol = await repo.openOrCreate("data");
 * const overlay = repo.stage(await repo.resolve("data"));
 * await overlay.put(splitWritablePath("hello.txt"), { kind: "file", name: "hello.txt", mode: 0o644, mtime: Date.now(), size: 3, pending: { kind: "bytes", data: Buffer.from("hi\n") } });
 * const { version } = await repo.sync("data", await repo.resolve("data"), overlay);
 * ```
 *
 * Inside: `fuse → vfs → {chunk, object}`; this file is the layer's only public door.
 */
export * from "./errors.js";
export * from "./object/index.js";
export * from "./chunk/index.js";
export * from "./vfs/index.js";
export * from "./fuse/index.js";
