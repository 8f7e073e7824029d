/**
 * Backing files (kernel FUSE passthrough, Linux 6.9+) registered through FuseDevice.openBacking,
 * on a real kernel mount served by test/support/backing-server.ts: the kernel reads and writes the
 * backing file itself, and no READ or WRITE request reaches the server. The same server without
 * backing files answers them (so the counts the assertions read are live). The mount is touched
 * only from child processes: this process serves it.
 */
import { execFile } from "node:child_process";
import { randomBytes, createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { BackingServer } from "../../test/support/backing-server.js";

const run = promisify(execFile);
const sha = (b: Uint8Array) => createHash("sha256").update(b).digest("hex");

describe.each([true, false])("a FUSE mount whose opens are backed by local files: %s", (passthrough) => {
  let base: string;
  let mnt: string;
  let server: BackingServer;
  const data = randomBytes(3 * 1024 * 1024 + 123);
  const patch = randomBytes(200 * 1024);

  beforeAll(async () => {
    base = await mkdtemp(join(tmpdir(), "strata-backing-"));
    mnt = join(base, "mnt");
    await mkdir(mnt);
    await writeFile(join(base, "read.bin"), data);
    await writeFile(join(base, "write.bin"), data);
    await writeFile(join(base, "patch.bin"), patch);
    server = await BackingServer.mount(mnt, new Map([["read.bin", join(base, "read.bin")], ["write.bin", join(base, "write.bin")]]), { passthrough });
  });

  afterAll(async () => {
    await server?.unmount();
    await rm(base, { recursive: true, force: true });
  });

  it("reads the local file's bytes; with a backing file, without one READ request", async (ctx) => {
    if (passthrough && !server.offered) ctx.skip();
    const { stdout } = await run("sha256sum", [join(mnt, "read.bin")]);
    expect(stdout.split(" ")[0]).toBe(sha(data));
    if (passthrough) expect(server.counts.read).toBe(0);
    else expect(server.counts.read).toBeGreaterThan(0);
  });

  it("writes into the local file; with a backing file, without one WRITE request", async (ctx) => {
    if (passthrough && !server.offered) ctx.skip();
    const at = 1024 * 1024 + 7;
    await run("dd", [`if=${join(base, "patch.bin")}`, `of=${join(mnt, "write.bin")}`, "bs=64k", `seek=${at}`, "oflag=seek_bytes", "conv=notrunc", "status=none"]);
    const want = Buffer.from(data);
    patch.copy(want, at);
    expect(sha(await readFile(join(base, "write.bin")))).toBe(sha(want));
    if (passthrough) expect(server.counts.write).toBe(0);
    else expect(server.counts.write).toBeGreaterThan(0);
  });
});
