import { describe, expect, it } from "vitest";
import { parseDockerfile } from "./dockerfile.js";

describe("parseDockerfile", () => {
  it("turns instructions into steps in order", () => {
    const text = [
      "# comment",
      "FROM python:3.11-slim AS build",
      "ENV A=1 B=\"two words\"",
      "ENV C three four",
      "WORKDIR /app",
      "RUN apt-get update && \\",
      "    apt-get install -y curl",
      "RUN [\"echo\", \"it's\"]",
      "COPY src/ req.txt /app/",
      "USER 1000:1000",
      "EXPOSE 8080 9090/tcp",
      "LABEL team=agents",
      "CMD [\"python3\", \"main.py\"]",
    ].join("\n");
    const p = parseDockerfile(text, { contextDir: "/ctx" });
    expect(p.spec).toEqual({
      base: { kind: "debian-slim", python: "3.11" },
      steps: [
        { op: "env", vars: { A: "1", B: "two words" } },
        { op: "env", vars: { C: "three four" } },
        { op: "workdir", path: "/app" },
        { op: "run", commands: ["apt-get update &&      apt-get install -y curl"] },
        { op: "run", commands: ["echo 'it'\\''s'"] },
        { op: "copy", src: "/ctx/src", dst: "/app/", strategy: "copy" },
        { op: "copy", src: "/ctx/req.txt", dst: "/app/", strategy: "copy" },
        { op: "user", user: "1000:1000" },
        { op: "expose", ports: [8080, 9090] },
      ],
    });
    expect(p.labels).toEqual({ team: "agents" });
    expect(p.cmd).toEqual(["python3", "main.py"]);
  });

  it("maps FROM to bases", () => {
    expect(parseDockerfile("FROM debian:bookworm-slim", { contextDir: "/c" }).spec.base).toEqual({ kind: "debian-slim" });
    expect(parseDockerfile("FROM oci:images/x.tar", { contextDir: "/c" }).spec.base).toEqual({ kind: "oci", path: "/c/images/x.tar" });
    expect(parseDockerfile(`FROM strata:${"a".repeat(64)}`, { contextDir: "/c" }).spec.base).toEqual({ kind: "built", hash: "a".repeat(64) });
  });

  it("fails with the line number on what it cannot honour", () => {
    const bad: [string, RegExp][] = [
      ["FROM ubuntu:22.04", /line 1: FROM ubuntu/],
      ["FROM debian:12\nARG X=1", /line 2: ARG is not supported/],
      ["FROM debian:12\nCOPY --from=build /a /b", /line 2: COPY flags/],
      ["FROM debian:12\nCOPY ../secret /x", /outside the build context/],
      ["FROM debian:12\nADD https://example.invalid/x /x", /URL/],
      ["RUN true", /line 1: RUN before FROM/],
      ["FROM debian:12\nFROM debian:12", /multi-stage/],
    ];
    for (const [text, re] of bad) {
      expect(() => parseDockerfile(text, { contextDir: "/c" }), text).toThrow(re);
      try {
        parseDockerfile(text, { contextDir: "/c" });
      } catch (e) {
        expect((e as { code: string }).code).toBe("DOCKERFILE");
      }
    }
  });
});
