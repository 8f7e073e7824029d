/**
 * `Image`: an immutable, fluent description of a sandbox image. Every method returns a NEW
 * Image wrapping an agent `ImageSpec`; nothing is built until a sandbox (or `SandboxClient`'s
 * `buildImage`) asks the node agent for it, which builds each distinct spec once.
 */
import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { parseDockerfile, steps, type ImageSpec, type ImageStep } from "../agent/index.js";

/** How a local file or directory gets into the image. */
export interface AddLocalOptions {
  /** "copy" (default): its bytes are part of the image and its hash; "mount": bind-mounted read-only at run time. */
  strategy?: "copy" | "mount";
}

/** An image spec, built by the node agent on first use and cached by its hash. */
export class Image {
  private constructor(
    /** The spec this image stands for (JSON, the agent's `ImageSpec`). */
    readonly spec: ImageSpec,
  ) {}

  /** Debian 12 minbase with python3; `pythonVersion` may be "3" or "3.11" (the only one Debian 12 has). */
  static debianSlim(pythonVersion?: string): Image {
    return new Image({ base: pythonVersion === undefined ? { kind: "debian-slim" } : { kind: "debian-slim", python: pythonVersion }, steps: [] });
  }

  /** An OCI image layout directory or tarball on disk, or a previously built image's 64-hex hash. */
  static base(ref: string): Image {
    if (/^[0-9a-f]{64}$/.test(ref)) return new Image({ base: { kind: "built", hash: ref }, steps: [] });
    return new Image({ base: { kind: "oci", path: resolve(ref) }, steps: [] });
  }

  /** The image a Dockerfile describes (COPY sources relative to its directory); fails DOCKERFILE. */
  static fromDockerfile(path: string): Image {
    const abs = resolve(path);
    return new Image(parseDockerfile(readFileSync(abs, "utf8"), { contextDir: dirname(abs) }).spec);
  }

  /** An image from a spec (e.g. read from a JSON file); the spec is copied. */
  static fromSpec(spec: ImageSpec): Image {
    return new Image(structuredClone(spec));
  }

  private with(step: ImageStep): Image {
    return new Image({ base: structuredClone(this.spec.base), steps: [...structuredClone(this.spec.steps), step] });
  }

  /** Installs Debian packages. */
  aptInstall(packages: string[]): Image {
    return this.with(steps.aptInstall(packages));
  }

  /** Installs Python packages with pip (needs a reachable package index at build time). */
  pipInstall(packages: string[]): Image {
    return this.with(steps.pipInstall(packages));
  }

  /** Runs shell commands at build time, each with `/bin/sh -c`. */
  runCommands(...commands: (string | string[])[]): Image {
    return this.with(steps.runCommands(commands.flat()));
  }

  /** Sets (and creates) the working directory. */
  workdir(path: string): Image {
    return this.with(steps.workdir(path));
  }

  /** Adds environment variables. */
  env(vars: Record<string, string>): Image {
    return this.with(steps.env(vars));
  }

  /** Adds a host file at `dst` (a trailing "/" means into that directory). */
  addLocalFile(src: string, dst: string, opts: AddLocalOptions = {}): Image {
    return this.with(steps.addLocalFile(src, dst, opts));
  }

  /** Adds a host directory's contents at `dst`. */
  addLocalDir(src: string, dst: string, opts: AddLocalOptions = {}): Image {
    return this.with(steps.addLocalDir(src, dst, opts));
  }

  /** Applies Dockerfile instructions (no FROM) on top of this image; COPY sources relative to the current directory. */
  dockerfileCommands(lines: string[]): Image {
    const parsed = parseDockerfile(["FROM debian:bookworm-slim", ...lines].join("\n"), { contextDir: process.cwd() });
    let img: Image = this;
    for (const s of parsed.spec.steps) img = img.with(s);
    return img;
  }

  /** The spec as canonical-ish JSON text. */
  toJSON(): ImageSpec {
    return structuredClone(this.spec);
  }
}
