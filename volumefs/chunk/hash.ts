import { hash } from "blake3";

/** Length of a chunk, tree or pack id: 64 lowercase hex characters (a 32-byte blake3 digest). */
export const ID_HEX_LENGTH = 64;

/** The id of a chunk (or tree, or pack): the blake3 digest of `data`, 64 lowercase hex chars. */
export function chunkId(data: Uint8Array): string {
  return hash(data).toString("hex");
}

/** True when `id` is the blake3 hex digest of `data`. */
export function verifyChunk(id: string, data: Uint8Array): boolean {
  return id.length === ID_HEX_LENGTH && chunkId(data) === id;
}

/** True when `id` looks like an id: 64 lowercase hex characters. */
export function isChunkId(id: string): boolean {
  return /^[0-9a-f]{64}$/.test(id);
}
