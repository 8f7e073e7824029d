/**
 * The `strata` CLI contract, end to end, against the embedded file store and a real S3 server
 * (Ceph RGW started by the global setup). Most cases run the CLI in-process with captured
 * streams; the exit-code and no-stack-trace cases run the real program.
 */
import { execFile, execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readFile, readlink, rm, stat, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { runCli } from "../sdk/index.js";
import { makeTestS3Store, type TestS3Store } from "./support/s3.js";

const run = promisify(execFile);

class Sink extends Writable {
  chunks: Buffer[] = [];
  isTTY = false;
  override _write(chunk: Buffer, _enc: string, cb: () => void): void {
    this.chunks.push(Buffer.from(chunk));
    cb();
  }
  get text(): string {
    return Buffer.concat(this.chunks).toString("utf8");
  }
}

interface Result {
  code: number;
  stdout: string;
  stderr: string;
}

type Cli = (...args: string[]) => Promise<Result>;

function makeCli(env: NodeJS.ProcessEnv): Cli {
  return async (...args) => {
    const stdout = new Sink();
    const stderr = new Sink();
    const code = await runCli(args, { stdout, stderr, env });
    return { code, stdout: stdout.text, stderr: stderr.text };
  };
}

async function ok(cli: Cli, ...args: string[]): Promise<string> {
  const r = await cli(...args);
  if (r.code !== 0) throw new Error(`strata ${args.join(" ")} exited ${r.code}: ${r.stderr}`);
  return r.stdout;
}

const ID = /^[0-9a-f]{64}$/;

function contract(name: string, setup: () => Promise<{ env: NodeJS.ProcessEnv; cleanup(): Promise<void> }>): void {
  describe(`strata CLI on ${name}`, () => {
    let cli: Cli;
    let env: NodeJS.ProcessEnv;
    let work: string;
    let cleanup: () => Promise<void>;

    beforeAll(async () => {
      const s = await setup();
      cli = makeCli(s.env);
      env = s.env;
      cleanup = s.cleanup;
      work = await mkdtemp(join(tmpdir(), "strata-cli-work-"));
      await mkdir(join(work, "src/sub"), { recursive: true });
      await writeFile(join(work, "src/a.txt"), "alpha\n");
      await writeFile(join(work, "src/sub/b.bin"), Buffer.from([0, 1, 2, 255, 254]));
      await symlink("a.txt", join(work, "src/link"));
      await writeFile(join(work, "single.txt"), "single\n");
    });
    afterAll(async () => {
      await cleanup?.();
      await rm(work, { recursive: true, force: true });
    });

    it("creates, lists and removes volumes", async () => {
      expect((await ok(cli, "volume", "create", "data")).trim()).toBe("data");
      const dup = await cli("volume", "create", "data");
      expect(dup.code).toBe(1);
      expect(dup.stderr).toMatch(/^strata: .*already exists \(ALREADY_EXISTS\)\nhint: /);
      await ok(cli, "volume", "create", "tmp");
      const ls = JSON.parse(await ok(cli, "volume", "ls", "--json"));
      expect(ls.map((v: { name: string }) => v.name)).toEqual(["data", "tmp"]);
      expect(Object.keys(ls[0]).sort()).toEqual(["createdAt", "forkedFrom", "head", "name"]);
      expect(ls[0].head).toBeNull();
      await ok(cli, "volume", "rm", "tmp");
      expect(JSON.parse(await ok(cli, "volume", "ls", "--json")).map((v: { name: string }) => v.name)).toEqual(["data"]);
    });

    it("puts files and directories as one version each, and reads them back", async () => {
      const v1 = (await ok(cli, "put", "data", join(work, "src"), "/")).trim();
      expect(v1).toMatch(ID);
      const v2 = (await ok(cli, "put", "data", join(work, "single.txt"), "docs/renamed.txt")).trim();
      expect(v2).toMatch(ID);
      expect(await ok(cli, "cat", "data", "src/a.txt")).toBe("alpha\n");
      expect(await ok(cli, "cat", "data", "/docs/renamed.txt")).toBe("single\n");
      const ls = JSON.parse(await ok(cli, "ls", "data", "src", "--json"));
      expect(ls.map((e: { path: string }) => e.path)).toEqual(["src/a.txt", "src/link", "src/sub"]);
      expect(ls[0]).toMatchObject({ kind: "file", size: 6, mode: 0o644 });
      expect(Object.keys(ls[0]).sort()).toEqual(["kind", "mode", "mtime", "path", "size"]);
      expect(ls[1]).toMatchObject({ kind: "symlink", target: "a.txt" });
      const rec = JSON.parse(await ok(cli, "ls", "data", "-r", "--json"));
      expect(rec.map((e: { path: string }) => e.path)).toEqual(["docs", "docs/renamed.txt", "src", "src/a.txt", "src/link", "src/sub", "src/sub/b.bin"]);
      expect(await ok(cli, "cat", "data", "src/a.txt", "--at", v1.slice(0, 12))).toBe("alpha\n");
      const missing = await cli("cat", "data", "docs/renamed.txt", "--at", v1);
      expect(missing.code).toBe(1);
      expect(missing.stderr).toMatch(/\(NOT_FOUND\)/);
    });

    it("gets a file and a directory out, byte for byte", async () => {
      const out = join(work, "out");
      await mkdir(out);
      await ok(cli, "get", "data", "src", join(out, "copy"));
      expect(await readFile(join(out, "copy/a.txt"), "utf8")).toBe("alpha\n");
      expect([...(await readFile(join(out, "copy/sub/b.bin")))]).toEqual([0, 1, 2, 255, 254]);
      expect(await readlink(join(out, "copy/link"))).toBe("a.txt");
      await ok(cli, "get", "data", "docs/renamed.txt", out);
      expect(await readFile(join(out, "renamed.txt"), "utf8")).toBe("single\n");
      await ok(cli, "get", "data", "src", out);
      expect(await readFile(join(out, "src/a.txt"), "utf8")).toBe("alpha\n");
      const again = await cli("get", "data", "src", out);
      expect(again.code).toBe(1);
      expect(again.stderr).toMatch(/ALREADY_EXISTS/);
      expect((await stat(join(out, "src/a.txt"))).size).toBe(6);
    });

    it("logs, diffs, removes, reverts", async () => {
      const log1 = JSON.parse(await ok(cli, "log", "data", "--json"));
      expect(log1).toHaveLength(2);
      expect(Object.keys(log1[0]).sort()).toEqual(expect.arrayContaining(["bytes", "files", "id", "message", "parents", "time"]));
      expect(log1[0].parents).toEqual([log1[1].id]);
      expect(log1[0].files).toBe(4);
      const v2 = log1[0].id as string;
      const v3 = (await ok(cli, "rm", "data", "src/a.txt", "docs/renamed.txt")).trim();
      expect(v3).toMatch(ID);
      const d = JSON.parse(await ok(cli, "diff", "data", v2, "--json"));
      expect(d).toEqual({ added: [], modified: [], removed: ["docs/renamed.txt", "src/a.txt"] });
      const notEmpty = await cli("rm", "data", "src");
      expect(notEmpty.code).toBe(1);
      expect(notEmpty.stderr).toMatch(/NOT_EMPTY/);
      const v4 = (await ok(cli, "revert", "data", v2)).trim();
      expect(v4).toMatch(ID);
      expect(await ok(cli, "cat", "data", "src/a.txt")).toBe("alpha\n");
      const d2 = JSON.parse(await ok(cli, "diff", "data", v2, v4, "--json"));
      expect(d2).toEqual({ added: [], modified: [], removed: [] });
      expect(JSON.parse(await ok(cli, "log", "data", "--json"))).toHaveLength(4);
    });

    it("forks, and the fork is isolated", async () => {
      const head = (await ok(cli, "fork", "data", "data-fork")).trim();
      expect(head).toMatch(ID);
      await ok(cli, "put", "data-fork", join(work, "single.txt"), "only-in-fork.txt");
      expect(await ok(cli, "cat", "data-fork", "only-in-fork.txt")).toBe("single\n");
      expect((await cli("cat", "data", "only-in-fork.txt")).code).toBe(1);
      const vols = JSON.parse(await ok(cli, "volume", "ls", "--json"));
      expect(vols.find((v: { name: string }) => v.name === "data-fork").forkedFrom).toEqual({ volume: "data", version: head });
      const log = JSON.parse(await ok(cli, "log", "data", "--json"));
      const old = (await ok(cli, "fork", "data", "data-old", "--at", log[log.length - 1].id)).trim();
      expect(old).toBe(log[log.length - 1].id);
    });

    it("checks the store with fsck", async () => {
      const r = await cli("fsck");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/\nok\n$/);
    });

    it("rebuilds the metadata from the bucket after the database is lost", async () => {
      const before = JSON.parse(await ok(cli, "volume", "ls", "--json"));
      const log = await ok(cli, "log", "data", "--json");
      const home = env.STRATA_HOME!;
      const { readdir: ls } = await import("node:fs/promises");
      const dbs = (await ls(home)).filter((f) => f.startsWith("meta"));
      expect(dbs.length).toBeGreaterThan(0);
      for (const f of dbs) await rm(join(home, f));
      expect(JSON.parse(await ok(cli, "volume", "ls", "--json"))).toEqual([]);
      const r = await cli("fsck", "--rebuild");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(/^rebuilt metadata from .*: \d+ volumes/);
      expect(JSON.parse(await ok(cli, "volume", "ls", "--json"))).toEqual(before);
      expect(await ok(cli, "log", "data", "--json")).toBe(log);
      expect(await ok(cli, "cat", "data", "src/a.txt")).toBe("alpha\n");
      const v = (await ok(cli, "put", "data", join(work, "single.txt"), "after-rebuild.txt")).trim();
      expect(v).toMatch(ID);
    });

    it("refuses to rebuild the metadata while another process holds it, and keeps the old database", async () => {
      const home = env.STRATA_HOME!;
      const { readdir: ls } = await import("node:fs/promises");
      const { SqliteMetadataStore } = await import("../metadata/index.js");
      const before = await ok(cli, "log", "data", "--json");
      const dbs = (await ls(home)).filter((f) => /^meta.*\.db$/.test(f));
      expect(dbs).toHaveLength(1);
      const db = dbs[0]!;
      const held = SqliteMetadataStore.open({ path: join(home, db) });
      const files = await ls(home);
      try {
        // A write leaves the WAL non-empty: commits the old code's rebuild deleted unread.
        await held.createVolume({ env: "main", name: "held-only", head: null, forkedFrom: null, createdAt: Date.now() });
        const r = await cli("fsck", "--rebuild");
        expect(r.code).not.toBe(0);
        expect(r.stderr).toMatch(/BUSY/);
        expect(r.stderr).toMatch(/hint: unmount/);
        expect(r.stderr.trim().split("\n").length).toBe(2);
        expect(await ls(home)).toEqual(files);
      } finally {
        await held.close();
      }
      expect(await ok(cli, "log", "data", "--json")).toBe(before);
      const r = await cli("fsck", "--rebuild");
      expect(r.code).toBe(0);
      const kept = (await ls(home)).filter((f) => !files.includes(f) && f.startsWith(`${db}.before-rebuild-`));
      expect(kept).toHaveLength(1);
      expect(r.stdout).toContain(`the old database is kept as ${join(home, kept[0]!)}`);
      const old = SqliteMetadataStore.open({ path: join(home, kept[0]!) });
      try {
        expect((await old.listVolumes("main")).map((v) => v.name)).toContain("held-only");
      } finally {
        await old.close();
      }
      expect(await ok(cli, "log", "data", "--json")).toBe(before);
    });

    it("rejects bad input with one line, a code and a hint", async () => {
      const cases: [string[], RegExp][] = [
        [["volume", "create", "a/b"], /INVALID_NAME/],
        [["volume", "create", ".."], /INVALID_NAME/],
        [["volume", "create", "x".repeat(256)], /INVALID_NAME/],
        [["volume", "create", "tab\there"], /INVALID_NAME/],
        [["cat", "data", "../../etc/passwd"], /INVALID_PATH/],
        [["cat", "nope", "x"], /UNKNOWN_VOLUME/],
        [["cat", "nope", "--", "--help"], /UNKNOWN_VOLUME/],
        [["cat", "data", "src/a.txt", "--at", "deadbeef"], /UNKNOWN_VERSION/],
        [["cat", "data", "src/a.txt/x"], /NOT_A_DIRECTORY/],
        [["cat", "data", "src"], /IS_A_DIRECTORY/],
        [["put", "data", join(work, "does-not-exist"), "/"], /NOT_FOUND/],
        [["put", "data", join(work, "single.txt"), "src/a.txt/inside"], /NOT_A_DIRECTORY/],
        [["ls", "data", "--bogus"], /USAGE/],
        [["frobnicate"], /USAGE/],
        [["cat", "data", "src/a.txt", "extra"], /unexpected argument "extra" \(USAGE\)/],
        [["status", work, "extra"], /unexpected argument "extra" \(USAGE\)/],
        [["cat", "data", "src/a.txt", "--at", ""], /option --at has an empty value \(USAGE\)/],
        [["ls", "data", "--at="], /option --at has an empty value \(USAGE\)/],
        [["mount", "data", join(work, "mnt-never"), "--cache-size="], /option --cache-size has an empty value \(USAGE\)/],
        [["mount", "data", join(work, "mnt-never"), "--cache-dir", join(work, "single.txt")], /--cache-dir .*single.txt": not a directory \(NOT_A_DIRECTORY\)/],
      ];
      const before = JSON.parse(await ok(cli, "log", "data", "--json")).length;
      for (const [args, code] of cases) {
        const r = await cli(...args);
        expect(r.code, args.join(" ")).not.toBe(0);
        expect(r.stderr, args.join(" ")).toMatch(code);
        expect(r.stderr.split("\n")[0], args.join(" ")).toMatch(/^strata: [^\n]+ \([A-Z_]+\)$/);
        expect(r.stderr).not.toMatch(/\n\s+at /);
        expect(r.stdout).toBe("");
      }
      expect(JSON.parse(await ok(cli, "log", "data", "--json")).length).toBe(before);
    });

    it("prints names with control characters quoted, one line each", async () => {
      const src = join(work, "odd");
      await mkdir(src, { recursive: true });
      await writeFile(join(src, "two\nlines"), "x");
      await writeFile(join(src, "esc\u001b[31mred"), "y");
      await writeFile(join(src, "plain"), "z");
      const before = JSON.parse(await ok(cli, "log", "data", "--json"))[0].id;
      await ok(cli, "put", "data", src, "odd");
      const names = (await ok(cli, "ls", "data", "odd")).trimEnd().split("\n").map((l) => l.split(" ").pop());
      expect(names.sort()).toEqual([JSON.stringify("odd/esc\u001b[31mred"), "odd/plain", JSON.stringify("odd/two\nlines")].sort());
      const diff = (await ok(cli, "diff", "data", before)).trimEnd().split("\n");
      expect(diff).toHaveLength(3);
      expect(diff).toContain(`A ${JSON.stringify("odd/two\nlines")}`);
      // --json carries the names as they are.
      expect(JSON.parse(await ok(cli, "ls", "data", "odd", "--json")).map((i: { path: string }) => i.path)).toContain("odd/two\nlines");
    });
  });
}

contract("the embedded file store", async () => {
  const home = await mkdtemp(join(tmpdir(), "strata-cli-home-"));
  return { env: { STRATA_HOME: home, PATH: process.env.PATH }, cleanup: () => rm(home, { recursive: true, force: true }) };
});

contract("S3 (Ceph RGW)", async () => {
  const s3: TestS3Store = await makeTestS3Store();
  const home = await mkdtemp(join(tmpdir(), "strata-cli-home-"));
  return {
    env: {
      STRATA_HOME: home,
      STRATA_STORE: `s3://${s3.bucket}/vols`,
      STRATA_S3_ENDPOINT: s3.config.endpoint,
      AWS_ACCESS_KEY_ID: s3.config.accessKeyId,
      AWS_SECRET_ACCESS_KEY: s3.config.secretAccessKey,
      AWS_REGION: s3.config.region,
      PATH: process.env.PATH,
    },
    cleanup: async () => {
      await s3.cleanup();
      await rm(home, { recursive: true, force: true });
    },
  };
});

describe("a damaged store", () => {
  it("reports a corrupted chunk on read and in fsck, with a code and a hint", async () => {
    const home = await mkdtemp(join(tmpdir(), "strata-cli-corrupt-"));
    try {
      const cli = makeCli({ STRATA_HOME: home, PATH: process.env.PATH });
      const src = join(home, "f.txt");
      await writeFile(src, "precious bytes that will rot\n".repeat(100));
      await ok(cli, "volume", "create", "v");
      await ok(cli, "put", "v", src, "f.txt");
      const { readdir: ls } = await import("node:fs/promises");
      const packs = await ls(join(home, "objects/packs"));
      expect(packs).toHaveLength(1);
      const packPath = join(home, "objects/packs", packs[0]!);
      const bytes = await readFile(packPath);
      bytes[10] = bytes[10]! ^ 0xff;
      await writeFile(packPath, bytes);
      await rm(join(home, "cache"), { recursive: true, force: true });
      const r = await cli("cat", "v", "f.txt");
      expect(r.code).toBe(1);
      expect(r.stdout).toBe("");
      expect(r.stderr).toMatch(/^strata: .* \(CORRUPT\)\nhint: run `strata fsck`/);
      const f = await cli("fsck");
      expect(f.code).toBe(1);
      expect(f.stdout).toMatch(/problem: corrupt-chunk/);
    } finally {
      await rm(home, { recursive: true, force: true });
    }
  });
});

describe("the strata program", () => {
  const strata = join(process.cwd(), "bin/strata");
  let home: string;
  beforeAll(async () => {
    home = await mkdtemp(join(tmpdir(), "strata-bin-"));
  });
  afterAll(() => rm(home, { recursive: true, force: true }));

  async function proc(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Result> {
    try {
      const r = await run(process.execPath, [strata, ...args], { env: { PATH: process.env.PATH, STRATA_HOME: home, ...env } });
      return { code: 0, stdout: r.stdout, stderr: r.stderr };
    } catch (err) {
      const e = err as { code: number; stdout: string; stderr: string };
      return { code: e.code, stdout: e.stdout, stderr: e.stderr };
    }
  }

  it("exits non-zero with one line and no stack for a user error", async () => {
    const r = await proc(["cat", "missing-volume", "x"]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^strata: open volume "missing-volume": no such volume \(UNKNOWN_VOLUME\)\nhint: .+\n$/);
    const u = await proc(["ls"]);
    expect(u.code).toBe(2);
    const none = await proc([]);
    expect(none.code).toBe(2);
    expect(none.stdout).toBe("");
    expect(none.stderr).toMatch(/^strata: missing command \(USAGE\)\nusage: strata COMMAND/);
    const help = await proc(["--help"]);
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/^usage: strata COMMAND/);
  });

  it("refuses extra arguments, a put that would put nothing, a get into a missing directory, and a bad -e, --cpu, --memory, --gpu or --lifetime before it starts anything", async () => {
    const extra = await proc(["volume", "create", "one", "two"]);
    expect(extra.code).toBe(2);
    expect(extra.stderr).toMatch(/^strata: volume: unexpected argument "two" \(USAGE\)\nhint: /);
    expect((await proc(["volume", "ls", "x"])).code).toBe(2);
    expect((await proc(["volume", "ls"])).stdout).not.toMatch(/^one/m);
    expect((await proc(["volume", "create", "v"])).code).toBe(0);
    const fifo = join(home, "fifo");
    execFileSync("mkfifo", [fifo]);
    const nothing = await proc(["put", "v", fifo, "/f"]);
    expect(nothing.code).toBe(1);
    expect(nothing.stderr).toMatch(/put: nothing to put from .*fifo \(INVALID_ARGUMENT\)\nhint: /);
    await writeFile(join(home, "one.txt"), "1");
    expect((await proc(["put", "v", join(home, "one.txt"), "/one.txt"])).code).toBe(0);
    const missing = join(home, "no", "such", "dir", "one.txt");
    const get = await proc(["get", "v", "/one.txt", missing]);
    expect(get.code).toBe(1);
    expect(get.stderr).toBe(`strata: get: write ${missing}: its directory does not exist (NOT_FOUND)\nhint: create the directory first, or pick another destination\n`);
    const env = await proc(["run", "-e", "bad", "--", "true"]);
    expect(env.code).toBe(2);
    expect(env.stderr).toMatch(/^strata: run: bad -e "bad" \(USAGE\)/);
    for (const [opt, bad, said] of [
      ["--cpu", "0", /parse cpu "0"/],
      ["--memory", "lots", /parse memory "lots"/],
      ["--gpu", "a100:0", /parse gpu "a100:0"/],
      ["--lifetime", "soon", /parse lifetime "soon"/],
    ] as const) {
      const r = await proc(["run", opt, bad, "--", "true"]);
      expect(r.code, opt).toBe(1);
      expect(r.stderr, opt).toMatch(said);
      expect(r.stderr, opt).toMatch(/\(INVALID_ARGUMENT\)\n/);
    }
    expect(existsSync(join(home, "agent.pid"))).toBe(false);
  });

  it("prints help for every command", async () => {
    for (const cmd of ["volume", "put", "get", "cat", "ls", "rm", "fork", "log", "diff", "revert", "fsck", "demo"]) {
      const r = await proc([cmd, "--help"]);
      expect(r.code, cmd).toBe(0);
      expect(r.stdout, cmd).toMatch(new RegExp(`^usage: strata ${cmd}`));
    }
  });

  it("reports an unreachable store and wrong credentials clearly", async () => {
    const closed = await proc(["volume", "create", "x"], { STRATA_STORE: "s3://bucket/p", STRATA_S3_ENDPOINT: "http://127.0.0.1:9", AWS_ACCESS_KEY_ID: "a", AWS_SECRET_ACCESS_KEY: "b" });
    expect(closed.code).toBe(1);
    expect(closed.stderr).toMatch(/STORE_UNREACHABLE/);
    const s3 = await makeTestS3Store();
    try {
      const denied = await proc(["volume", "create", "x"], { STRATA_STORE: `s3://${s3.bucket}/p`, STRATA_S3_ENDPOINT: s3.config.endpoint, AWS_ACCESS_KEY_ID: "wrong", AWS_SECRET_ACCESS_KEY: "wrong" });
      expect(denied.code).toBe(1);
      expect(denied.stderr).toMatch(/ACCESS_DENIED/);
      expect(denied.stderr).not.toMatch(/\n\s+at /);
    } finally {
      await s3.cleanup();
    }
  });

  it("runs the demo", async () => {
    const r = await proc(["demo"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/fsck: .* 0 problems/);
  }, 120_000);
});
