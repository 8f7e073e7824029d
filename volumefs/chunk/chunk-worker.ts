/**
 * The worker-thread side of `ChunkPool`: chunks (`segmentCuts`) and hashes segments of streams
 * off the main thread. Jobs are independent; a worker keeps no state between them.
 *
 * Protocol (one message port):
 *   in  { job, buffer, offset, length, params }  a segment: bytes [offset, offset + length) of
 *                                                 `buffer`, which is transferred in
 *   out { job, cuts, n, h, ids, buffer }         its SegmentCuts and the blake3 hex of each of its
 *                                                 own chunks; `buffer` is transferred back
 *   out { job, error, buffer }                   the job failed
 *   out { ready: true }                          sent once when the worker has loaded
 */
import { parentPort } from "node:worker_threads";
import { segmentCuts } from "./chunker.js";
import { chunkId } from "./hash.js";
import type { ChunkParams } from "./types.js";

interface Job {
  job: number;
  buffer: ArrayBuffer;
  offset: number;
  length: number;
  params: ChunkParams;
}

const port = parentPort;
if (port) {
  port.on("message", (msg: Job) => {
    try {
      const data = new Uint8Array(msg.buffer, msg.offset, msg.length);
      const seg = segmentCuts(data, msg.params);
      const ids: string[] = [];
      let prev = 0;
      for (const c of seg.cuts) {
        ids.push(chunkId(data.subarray(prev, c)));
        prev = c;
      }
      port.postMessage({ job: msg.job, cuts: seg.cuts, n: seg.n, h: seg.h, ids, buffer: msg.buffer }, [msg.buffer]);
    } catch (err) {
      port.postMessage({ job: msg.job, error: err instanceof Error ? err.message : String(err), buffer: msg.buffer }, [msg.buffer]);
    }
  });
  port.postMessage({ ready: true });
}
