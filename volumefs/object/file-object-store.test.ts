import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, it, expect } from "vitest";
import { describeObjectStore } from "./conformance.js";
import { FileObjectStore } from "./file-object-store.js";

describeObjectStore("FileObjectStore", async () => {
  const root = await mkdtemp(join(tmpdir(), "strata-fos-"));
  return { store: new FileObjectStore(root), cleanup: () => rm(root, { recursive: true, force: true }) };
});

describe("FileObjectStore", () => {
  it("leaves no temp files behind and never lists them", async () => {
    const root = await mkdtemp(join(tmpdir(), "strata-fos-"));
    try {
      const s = new FileObjectStore(root);
      await s.put("d/a", new Uint8Array([1]));
      await s.put("d/a", new Uint8Array([2]), { ifNoneMatch: "*" }).catch(() => undefined);
      expect(await readdir(join(root, "d"))).toEqual(["a"]);
      expect(s.url).toBe(`file://${root}`);
      await expect(s.put("d/.strata-tmp-x", new Uint8Array(1))).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});
