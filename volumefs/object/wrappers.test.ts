import { describe, it, expect } from "vitest";
import { VolumeError } from "../errors.js";
import { MemoryObjectStore } from "./memory-object-store.js";
import { describeObjectStore } from "./conformance.js";
import { failFirst, failNth, transientError, withFaults, withPrefix, withRetry } from "./wrappers.js";

const fast = { baseDelayMs: 1, maxDelayMs: 2 };

describeObjectStore("withPrefix(withRetry(MemoryObjectStore))", async () => ({
  store: withPrefix(withRetry(new MemoryObjectStore(), fast), "pre/fix/"),
  cleanup: async () => {},
}), { largeFileBytes: 1 << 20 });

describe("withRetry", () => {
  it("retries retryable errors until the call succeeds", async () => {
    const faulty = withFaults(new MemoryObjectStore(), failFirst("put", 3, transientError()));
    const store = withRetry(faulty, { attempts: 5, ...fast });
    await store.put("a", new Uint8Array([7]));
    expect(faulty.calls.put).toBe(4);
    expect(faulty.injected).toBe(3);
    expect([...(await store.get("a"))]).toEqual([7]);
  });

  it("gives up after the given number of attempts with the last error", async () => {
    const faulty = withFaults(new MemoryObjectStore(), failFirst("get", 100, transientError("get object")));
    const store = withRetry(faulty, { attempts: 4, ...fast });
    await expect(store.get("a")).rejects.toMatchObject({ code: "STORE_UNREACHABLE", retryable: true });
    expect(faulty.calls.get).toBe(4);
  });

  it("does not retry NOT_FOUND or PRECONDITION_FAILED", async () => {
    const faulty = withFaults(new MemoryObjectStore(), () => undefined);
    const store = withRetry(faulty, { attempts: 5, ...fast });
    await expect(store.get("missing")).rejects.toMatchObject({ code: "NOT_FOUND" });
    expect(faulty.calls.get).toBe(1);
    await store.put("k", new Uint8Array(1), { ifNoneMatch: "*" });
    await expect(store.put("k", new Uint8Array(1), { ifNoneMatch: "*" })).rejects.toMatchObject({ code: "PRECONDITION_FAILED" });
    expect(faulty.calls.put).toBe(2);
  });

  it("surfaces a lost ack on a create-only put as PRECONDITION_FAILED on the retry", async () => {
    const inner = new MemoryObjectStore();
    const faulty = withFaults(inner, failNth("put", 1, transientError(), true));
    const store = withRetry(faulty, { attempts: 3, ...fast });
    await expect(store.put("k", new Uint8Array([1]), { ifNoneMatch: "*" })).rejects.toMatchObject({ code: "PRECONDITION_FAILED" });
    expect([...(await inner.get("k"))]).toEqual([1]);
    expect(faulty.calls.put).toBe(2);
  });

  it("retries list only before its first result", async () => {
    const inner = new MemoryObjectStore();
    await inner.put("l/a", new Uint8Array(1));
    const faulty = withFaults(inner, failNth("list", 1, transientError()));
    const keys: string[] = [];
    for await (const o of withRetry(faulty, fast).list("l/")) keys.push(o.key);
    expect(keys).toEqual(["l/a"]);
    expect(faulty.calls.list).toBe(2);
  });
});

describe("withFaults", () => {
  it("throws before the call, or after it for puts with after=true", async () => {
    const inner = new MemoryObjectStore();
    const boom = new VolumeError("IO", "put object: boom");
    const before = withFaults(inner, failNth("put", 1, boom));
    await expect(before.put("a", new Uint8Array(1))).rejects.toBe(boom);
    expect(await inner.head("a")).toBeUndefined();
    const after = withFaults(inner, failNth("put", 1, boom, true));
    await expect(after.put("a", new Uint8Array(1))).rejects.toBe(boom);
    expect(await inner.head("a")).toEqual({ size: 1 });
  });
});

describe("withPrefix", () => {
  it("stores under the prefix and lists relative keys", async () => {
    const inner = new MemoryObjectStore();
    const p = withPrefix(inner, "v/1/");
    await p.put("a/b", new Uint8Array([1]));
    expect(await inner.head("v/1/a/b")).toEqual({ size: 1 });
    const keys: string[] = [];
    for await (const o of p.list("a/")) keys.push(o.key);
    expect(keys).toEqual(["a/b"]);
  });
});
