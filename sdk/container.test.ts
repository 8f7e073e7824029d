import { describe, expect, it } from "vitest";
import { AgentError, parseDuration, parseGpu, parseNetwork, type NetworkSpec, type SandboxGpu } from "./index.js";

describe("sandbox option parsers (the SDK's public door)", () => {
  it("parseNetwork: none by default, egress keeps the list as given, a bad entry fails INVALID_SPEC naming why", () => {
    expect(parseNetwork(undefined)).toEqual({ mode: "none" });
    expect(parseNetwork("none")).toEqual({ mode: "none" });
    const spec: NetworkSpec = parseNetwork({ egress: ["10.0.0.1:8080", "10.1.0.0/16", "db.internal:5432"] });
    expect(spec).toEqual({ mode: "egress", allow: ["10.0.0.1:8080", "10.1.0.0/16", "db.internal:5432"] });
    expect(parseNetwork({ egress: [] })).toEqual({ mode: "egress", allow: [] });
    for (const [bad, why] of [["10.0.0.1:0", "port must be 1-65535"], ["fe80::1", "IPv6 is not supported"], ["10.0.0.0/33", "bad prefix length (want 0-32)"], ["a b", /not an IPv4 address/]] as const) {
      let err: unknown;
      try {
        parseNetwork({ egress: [bad] });
      } catch (e) {
        err = e;
      }
      expect(err, bad).toBeInstanceOf(AgentError);
      expect((err as AgentError).code).toBe("INVALID_SPEC");
      expect(((err as AgentError).details as { why: string }).why).toMatch(why);
    }
    expect(() => parseNetwork("all" as never)).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
  });

  it("parseGpu and parseDuration", () => {
    expect(parseGpu("a100")).toEqual({ type: "a100", count: 1 });
    expect(parseGpu("a100:2")).toEqual({ type: "a100", count: 2 });
    expect(() => parseGpu("a100:0")).toThrow(expect.objectContaining({ code: "INVALID_ARGUMENT" }));
    const held: SandboxGpu = { ...parseGpu("t4"), devices: [] };
    expect(held.count).toBe(1);
    expect(parseDuration("90s")).toBe(90_000);
    expect(parseDuration("1h")).toBe(3_600_000);
  });
});
