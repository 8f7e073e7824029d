import { randomBytes } from "node:crypto";
import { execFile } from "node:child_process";
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AgentError } from "./errors.js";
import { ImageBuilder, sandboxSpecFor, steps, type ImageSpec } from "./image.js";
import { TEST_IMAGE_CACHE, testImage } from "./testing.js";

const execFileP = promisify(execFile);

describe("ImageBuilder", () => {
  let ctx: string;
  let cache: string;
  beforeAll(async () => {
    const base = await testImage();
    ctx = await mkdtemp(join(tmpdir(), "strata-image-"));
    cache = join(ctx, "cache");
    await mkdir(join(cache, "layers"), { recursive: true });
    await execFileP("cp", ["-al", join(TEST_IMAGE_CACHE, "layers", base.hash), join(cache, "layers", base.hash)]);
  }, 600_000);
  afterAll(async () => {
    if (ctx) await rm(ctx, { recursive: true, force: true });
  });

  it("never rebuilds an identical spec and rebuilds only an added step", async () => {
    const nonce = randomBytes(8).toString("hex");
    await writeFile(join(ctx, "app.py"), "print('hello from the image')\n");
    const spec: ImageSpec = {
      base: { kind: "debian-slim" },
      steps: [steps.env({ NONCE: nonce }), steps.workdir("/app"), steps.addLocalFile(join(ctx, "app.py"), "/app/"), steps.runCommands([`echo ${nonce} > /app/nonce`])],
    };
    const first = new ImageBuilder({ cacheDir: cache });
    const a = await first.build(spec);
    expect(first.stats).toMatchObject({ basesBuilt: 0, stepsRun: 4 });
    expect(await readFile(join(a.rootfs, "app/app.py"), "utf8")).toBe("print('hello from the image')\n");
    expect(await readFile(join(a.rootfs, "app/nonce"), "utf8")).toBe(`${nonce}\n`);
    expect(a.config).toMatchObject({ env: { NONCE: nonce }, workdir: "/app" });

    const second = new ImageBuilder({ cacheDir: cache });
    const b = await second.build(structuredClone(spec));
    expect(second.stats.stepsRun).toBe(0);
    expect(b).toEqual(a);
    expect(await second.hash(spec)).toBe(a.hash);

    const c = await second.build({ ...spec, steps: [...spec.steps, steps.runCommands(["touch /app/more"])] });
    expect(second.stats.stepsRun).toBe(1);
    expect(c.hash).not.toBe(a.hash);
    expect((await readdir(join(c.rootfs, "app"))).sort()).toEqual(["app.py", "more", "nonce"]);

    await writeFile(join(ctx, "app.py"), "print('changed')\n");
    expect(await second.hash(spec)).not.toBe(a.hash);
  });

  it("fails a failing step with its output and caches nothing for it", async () => {
    const nonce = randomBytes(8).toString("hex");
    const spec: ImageSpec = { base: { kind: "debian-slim" }, steps: [steps.runCommands([`echo marker-${nonce}; echo on-stderr >&2; exit 3`])] };
    const builder = new ImageBuilder({ cacheDir: cache });
    const err = await builder.build(spec).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AgentError);
    expect((err as AgentError).code).toBe("IMAGE_STEP_FAILED");
    expect((err as AgentError).message).toContain(`marker-${nonce}`);
    expect((err as AgentError).message).toContain("on-stderr");
    expect((err as AgentError).details).toMatchObject({ exitCode: 3 });
    await expect(builder.get(await builder.hash(spec))).rejects.toMatchObject({ code: "IMAGE_NOT_FOUND" });
    await builder.build(spec).catch(() => undefined);
    expect(builder.stats.stepsRun).toBe(0);
    expect(await readdir(join(cache, "tmp"))).toEqual([]);
  });

  it("fails pip cleanly when no package index is reachable", async () => {
    const builder = new ImageBuilder({ cacheDir: cache });
    await expect(builder.build({ base: { kind: "debian-slim" }, steps: [steps.pipInstall(["requests"])] })).rejects.toMatchObject({ code: "IMAGE_STEP_FAILED" });
  });

  it("rejects malformed specs before building", async () => {
    const builder = new ImageBuilder({ cacheDir: cache });
    await expect(builder.build({ base: { kind: "debian-slim", python: "3.12" }, steps: [] })).rejects.toMatchObject({ code: "INVALID_SPEC" });
    await expect(builder.build({ base: { kind: "debian-slim" }, steps: [steps.aptInstall(["bad name; rm"])] })).rejects.toMatchObject({ code: "INVALID_SPEC" });
    await expect(builder.build({ base: { kind: "built", hash: "0".repeat(64) }, steps: [] })).rejects.toMatchObject({ code: "IMAGE_NOT_FOUND" });
  });

  it("turns an image into a sandbox spec with its env, workdir and mounts", () => {
    const spec = sandboxSpecFor(
      { hash: "h", rootfs: "/r", config: { env: { A: "1" }, workdir: "/app", user: "1000", exposedPorts: [], mounts: [{ source: "/s", destination: "/d", readOnly: true }] } },
      { env: { B: "2" }, cpu: 1 },
    );
    expect(spec).toEqual({ rootfs: "/r", env: { A: "1", B: "2" }, workdir: "/app", user: "1000", cpu: 1, mounts: [{ source: "/s", destination: "/d", readOnly: true }] });
  });
});
