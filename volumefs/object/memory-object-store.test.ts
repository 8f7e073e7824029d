import { describe, it, expect } from "vitest";
import { describeObjectStore } from "./conformance.js";
import { MemoryObjectStore } from "./memory-object-store.js";

describeObjectStore("MemoryObjectStore", async () => ({ store: new MemoryObjectStore(), cleanup: async () => {} }));

describe("MemoryObjectStore", () => {
  it("copies bytes in and out", async () => {
    const s = new MemoryObjectStore();
    const b = new Uint8Array([1, 2, 3]);
    await s.put("a", b);
    b[0] = 9;
    const got = await s.get("a");
    expect([...got]).toEqual([1, 2, 3]);
    got[1] = 9;
    expect([...(await s.get("a"))]).toEqual([1, 2, 3]);
  });
});
