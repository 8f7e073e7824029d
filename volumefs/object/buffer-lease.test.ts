import { describe, it, expect } from "vitest";
import { hold, holdAll, lease, pin, recycledBuffers } from "./buffer-lease.js";

/** Lets the current task end (and the checks it set for the next one run). */
const nextTask = (): Promise<void> => new Promise((r) => setImmediate(r));

function leased(n = 64): { bytes: Uint8Array; back: ArrayBuffer[]; first: ReturnType<typeof lease> } {
  const buffer = new ArrayBuffer(n);
  const back: ArrayBuffer[] = [];
  const first = lease(buffer, (b) => back.push(b));
  return { bytes: new Uint8Array(buffer), back, first };
}

describe("buffer leases", () => {
  it("gives a buffer back in a later task once its last hold is released, never in the task that released it", async () => {
    const { bytes, back, first } = leased();
    const before = recycledBuffers();
    const a = hold(bytes.subarray(0, 10))!;
    const b = hold(bytes.subarray(10, 20))!;
    first.release();
    a.release();
    await nextTask();
    expect(back).toEqual([]);
    b.release();
    expect(back).toEqual([]);
    await nextTask();
    expect(back).toEqual([bytes.buffer]);
    expect(recycledBuffers()).toBe(before + 1);
    // Once back, it is no longer leased here.
    expect(hold(bytes)).toBeUndefined();
  });

  it("keeps a buffer a hold was taken on in the task its other holds were released in", async () => {
    const { bytes, back, first } = leased();
    first.release();
    const late = hold(bytes.subarray(5))!;
    await nextTask();
    expect(back).toEqual([]);
    late.release();
    await nextTask();
    expect(back).toHaveLength(1);
  });

  it("counts a hold released twice once", async () => {
    const { bytes, back, first } = leased();
    const h = hold(bytes)!;
    h.release();
    h.release();
    first.release();
    first.release();
    await nextTask();
    expect(back).toHaveLength(1);
    const other = leased();
    const kept = hold(other.bytes)!;
    const twice = hold(other.bytes)!;
    twice.release();
    twice.release();
    other.first.release();
    await nextTask();
    expect(other.back).toEqual([]);
    kept.release();
    await nextTask();
    expect(other.back).toHaveLength(1);
  });

  it("never gives back a pinned buffer, whatever is released after", async () => {
    const { bytes, back, first } = leased();
    const h = hold(bytes)!;
    pin(bytes.subarray(3, 4));
    expect(hold(bytes)).toBeUndefined();
    h.release();
    first.release();
    await nextTask();
    await nextTask();
    expect(back).toEqual([]);
  });

  it("holds several views at once, of leased buffers and others", async () => {
    const x = leased();
    const y = leased();
    const all = holdAll([x.bytes.subarray(1), Buffer.from("plain"), y.bytes, x.bytes.subarray(2)]);
    x.first.release();
    y.first.release();
    await nextTask();
    expect([x.back, y.back]).toEqual([[], []]);
    all.release();
    await nextTask();
    expect([x.back.length, y.back.length]).toEqual([1, 1]);
    expect(hold(Buffer.from("plain"))).toBeUndefined();
  });
});
