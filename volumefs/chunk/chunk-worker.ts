/**
 * The worker-thread side of `ChunkPool`: chunks and hashes streams off the main thread.
 *
 * Protocol (one message port, many sessions keyed by `sid`, messages of a session in order):
 *   in  { op: "begin", sid, params }          start a session with a fresh Chunker
 *   in  { op: "push", sid, data }             bytes of the stream (a copy the worker owns)
 *   in  { op: "finish", sid }                 end of the stream
 *   out { sid, chunks: [{ id, data }], done } completed chunks for each push / finish, in order;
 *                                             chunk buffers are transferred
 *   out { sid, error }                        the session failed
 *   out { ready: true }                       sent once when the worker has loaded
 */
import { parentPort } from "node:worker_threads";
import { Chunker } from "./chunker.js";
import { chunkId } from "./hash.js";
import type { ChunkParams } from "./types.js";

type In =
  | { op: "begin"; sid: number; params: ChunkParams }
  | { op: "push"; sid: number; data: Uint8Array }
  | { op: "finish"; sid: number };

const sessions = new Map<number, Chunker>();
const port = parentPort;
if (port) {
  port.on("message", (msg: In) => {
    try {
      if (msg.op === "begin") {
        sessions.set(msg.sid, new Chunker(msg.params));
        return;
      }
      const c = sessions.get(msg.sid);
      if (!c) throw new Error(`unknown session ${msg.sid}`);
      const out = msg.op === "push" ? c.push(msg.data) : [];
      if (msg.op === "finish") {
        const last = c.finish();
        if (last) out.push(last);
        sessions.delete(msg.sid);
      }
      const chunks = out.map((data) => ({ id: chunkId(data), data }));
      port.postMessage({ sid: msg.sid, chunks, done: msg.op === "finish" }, chunks.map((c) => c.data.buffer as ArrayBuffer));
    } catch (err) {
      sessions.delete(msg.sid);
      port.postMessage({ sid: msg.sid, error: err instanceof Error ? err.message : String(err) });
    }
  });
  port.postMessage({ ready: true });
}
