import { describe, expect, it } from "vitest";
import { decodeTree, encodeTree, EMPTY_TREE, sameEntry, type Entry } from "./tree.js";
import { splitPath, checkVolumeName } from "./paths.js";

const file = (name: string, extra: Partial<Entry> = {}): Entry =>
  ({ kind: "file", name, mode: 0o644, mtime: 5, size: 3, chunks: [{ id: "a".repeat(64), length: 3 }], ...extra }) as Entry;

describe("tree codec", () => {
  it("round-trips every entry kind with extras, in canonical order", () => {
    const entries: Entry[] = [
      file("z", { uid: 1000, gid: 100, xattrs: { "user.k": Buffer.from([1, 2]) } }),
      { kind: "symlink", name: "l", mode: 0o777, mtime: 1, target: "../x" },
      { kind: "dir", name: "d", mode: 0o755, mtime: 2, tree: EMPTY_TREE.id, files: 4, bytes: 10 },
      file("é"),
    ];
    const enc = encodeTree(entries);
    const dec = decodeTree(enc.data, enc.id);
    expect(dec.entries.map((e) => e.name)).toEqual(["d", "l", "z", "é"]);
    expect(dec.entries[2]).toEqual(entries[0]);
    expect(enc.files).toBe(4 + 1 + 2);
    expect(enc.bytes).toBe(10 + 3 + 3);
    expect(encodeTree([...entries].reverse()).id).toBe(enc.id);
  });

  it("detects a tree whose bytes do not match its id", () => {
    const enc = encodeTree([file("a")]);
    const bad = Buffer.from(enc.data);
    bad[bad.length - 3] = 0x31;
    expect(() => decodeTree(bad, enc.id)).toThrow(/does not match/);
  });

  it("compares entries field by field", () => {
    expect(sameEntry(file("a"), file("b"))).toBe(true);
    expect(sameEntry(file("a"), file("a", { mode: 0o600 }))).toBe(false);
    expect(sameEntry(file("a"), file("a", { uid: 1 }))).toBe(false);
    expect(sameEntry(undefined, undefined)).toBe(true);
  });

  it("refuses names and paths that would escape or break a tree", () => {
    expect(() => encodeTree([file("a"), file("a")])).toThrow(/duplicate/);
    expect(splitPath("/a//b/./c/../d")).toEqual(["a", "b", "d"]);
    expect(() => splitPath("a/../../b")).toThrow(/escapes/);
    expect(() => splitPath("a\u0000b")).toThrow(/NUL/);
    expect(() => splitPath("x".repeat(256))).toThrow(/longer/);
    for (const bad of ["", ".", "..", "a/b", "a\u0000", "a\nb", "x".repeat(256)]) expect(() => checkVolumeName(bad)).toThrow();
    expect(checkVolumeName("ok-name_1.2")).toBe("ok-name_1.2");
  });
});
