import { constants, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { SqliteMetadataStore } from "../../metadata/index.js";
import { MemoryObjectStore } from "../object/index.js";
import { parseSyncCommand } from "./control.js";
import { MountedVolume } from "./mount.js";
import { Repository } from "./repo.js";

const { O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC } = constants;
const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function setup() {
  const dir = mkdtempSync(join(tmpdir(), "strata-control-"));
  dirs.push(dir);
  const repo = new Repository({ meta: SqliteMetadataStore.open({ path: join(dir, "meta.db") }), objects: new MemoryObjectStore() });
  await repo.createVolume("v");
  const m = await MountedVolume.open({ repo, volume: "v", stagingRoot: join(dir, "staging"), labels: { run: "r-17" } });
  return { repo, m };
}

/** What `cat FILE` sees: getattr for the size, then reads to EOF. */
async function cat(m: MountedVolume, path: string): Promise<string> {
  const size = (await m.getattr(path)).size;
  const fh = await m.open(path, O_RDONLY);
  const b = await m.read(fh, Math.max(size, 1 << 16), 0);
  await m.release(fh);
  return Buffer.from(b).toString();
}

/** What `echo TEXT > FILE` does: open with O_TRUNC, one write. */
async function echo(m: MountedVolume, path: string, text: string): Promise<void> {
  const fh = await m.open(path, O_WRONLY | O_TRUNC);
  try {
    await m.write(fh, Buffer.from(text + "\n"), 0);
  } finally {
    await m.release(fh);
  }
}

async function put(m: MountedVolume, path: string, text: string): Promise<void> {
  const fh = await m.create(path, 0o644, O_WRONLY | O_CREAT | O_TRUNC);
  await m.write(fh, Buffer.from(text), 0);
  await m.release(fh);
}

describe("/.strata control directory", () => {
  it("is found by lookup but not listed", async () => {
    const { m } = await setup();
    await put(m, "/a", "x");
    expect(await m.readdir("/")).toEqual(["a"]);
    expect((await m.getattr("/.strata")).kind).toBe("dir");
    expect(await m.readdir("/.strata")).toEqual(["reload", "status", "sync", "version", "versions"]);
    await m.close();
  });

  it("syncs by a write to /.strata/sync, with provenance labels, and reports the result", async () => {
    const { m, repo } = await setup();
    expect(await cat(m, "/.strata/version")).toBe("\n");
    expect(await cat(m, "/.strata/sync")).toBe("{}\n");
    await put(m, "/a", "x");
    const status = JSON.parse(await cat(m, "/.strata/status"));
    expect(status).toEqual({ volume: "v", base: null, readOnly: false, staged: { added: ["a"], modified: [], removed: [] } });
    await echo(m, "/.strata/sync", "plain message");
    const head = (await repo.volume("v")).head!;
    const v = await repo.version(head);
    expect(v.message).toBe("plain message");
    expect(v.labels).toMatchObject({ run: "r-17" });
    expect(v.labels.mount).toMatch(new RegExp(`:${process.pid}:`));
    expect(await cat(m, "/.strata/version")).toBe(head + "\n");
    expect(JSON.parse(await cat(m, "/.strata/sync"))).toEqual({ version: head, changed: true, conflicts: [] });

    await put(m, "/b", "y");
    await echo(m, "/.strata/sync", JSON.stringify({ message: "json", labels: { step: "2" }, onConflict: "ours" }));
    const v2 = await repo.version((await repo.volume("v")).head!);
    expect(v2.message).toBe("json");
    expect(v2.labels).toMatchObject({ step: "2", run: "r-17" });
    await m.close();
  });

  it("reports a failed sync as an error, and fails the write", async () => {
    const { m, repo } = await setup();
    await put(m, "/a", "mine");
    await m.sync();
    const other = repo.stage(await repo.resolve("v"));
    await other.put(["a"], { kind: "file", name: "a", mode: 0o644, mtime: 5, size: 6, pending: { kind: "bytes", data: Buffer.from("theirs") } });
    await repo.sync("v", await repo.resolve("v"), other);
    await put(m, "/a", "mine again");
    await expect(echo(m, "/.strata/sync", "conflicting")).rejects.toMatchObject({ code: "CONFLICT" });
    const last = JSON.parse(await cat(m, "/.strata/sync"));
    expect(last.error.code).toBe("CONFLICT");
    expect(last.error.message).toContain("a");
    await echo(m, "/.strata/sync", JSON.stringify({ onConflict: "theirs" }));
    expect(JSON.parse(await cat(m, "/.strata/sync")).conflicts).toEqual(["a"]);
    const fh = await m.open("/a", O_RDONLY);
    expect(Buffer.from(await m.read(fh, 100, 0)).toString()).toBe("theirs");
    await m.release(fh);
    await m.close();
  });

  it("reloads by a write to /.strata/reload, refusing while changes are staged", async () => {
    const { m, repo } = await setup();
    const other = repo.stage(null);
    await other.put(["o"], { kind: "file", name: "o", mode: 0o644, mtime: 5, size: 1, pending: { kind: "bytes", data: Buffer.from("o") } });
    const r = await repo.sync("v", null, other);
    await put(m, "/mine", "m");
    await expect(echo(m, "/.strata/reload", "1")).rejects.toMatchObject({ code: "NOT_EMPTY" });
    await expect(echo(m, "/.strata/reload", "bogus")).rejects.toMatchObject({ code: "INVALID_ARGUMENT" });
    await echo(m, "/.strata/reload", "discard");
    expect(await cat(m, "/.strata/version")).toBe(r.version!.id + "\n");
    expect(await m.readdir("/")).toEqual(["o"]);
    await echo(m, "/.strata/reload", "1");
    await m.close();
  });

  it("browses old versions read-only under /.strata/versions", async () => {
    const { m } = await setup();
    await m.mkdir("/d", 0o755);
    await put(m, "/d/f", "one");
    const v1 = (await m.sync()).version!;
    await put(m, "/d/f", "two");
    await m.symlink("d/f", "/ln");
    const v2 = (await m.sync()).version!;
    expect((await m.readdir("/.strata/versions")).sort()).toEqual([v1, v2].sort());
    expect(await m.readdir(`/.strata/versions/${v1}`)).toEqual(["d"]);
    expect(await cat(m, `/.strata/versions/${v1}/d/f`)).toBe("one");
    expect(await cat(m, `/.strata/versions/${v1.slice(0, 8)}/d/f`)).toBe("one");
    expect(await cat(m, `/.strata/versions/${v2}/d/f`)).toBe("two");
    expect(await m.readlink(`/.strata/versions/${v2}/ln`)).toBe("d/f");
    expect((await m.getattr(`/.strata/versions/${v1}/d/f`)).immutable).toBe(true);
    await expect(m.open(`/.strata/versions/${v1}/d/f`, O_WRONLY)).rejects.toMatchObject({ code: "READ_ONLY" });
    await expect(m.unlink(`/.strata/versions/${v1}/d/f`)).rejects.toMatchObject({ code: "PERMISSION" });
    await expect(m.getattr(`/.strata/versions/${v1}/nope`)).rejects.toMatchObject({ code: "NOT_FOUND" });
    await expect(m.getattr(`/.strata/versions/ffffffffffff`)).rejects.toMatchObject({ code: "UNKNOWN_VERSION" });
    await m.close();
  });

  it("parses sync commands", () => {
    expect(parseSyncCommand("")).toEqual({});
    expect(parseSyncCommand("fix the build")).toEqual({ message: "fix the build" });
    expect(parseSyncCommand('{"message":"m","onConflict":"theirs","labels":{"a":"b"}}')).toEqual({ message: "m", onConflict: "theirs", labels: { a: "b" } });
    expect(() => parseSyncCommand('{"onConflict":"mine"}')).toThrow(/onConflict/);
    expect(() => parseSyncCommand('{"labels":{"a":1}}')).toThrow(/labels/);
    expect(() => parseSyncCommand("{not json")).toThrow(/parse sync command/);
  });
});
