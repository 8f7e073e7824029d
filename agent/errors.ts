import { StrataError, causeText, type StrataErrorContext } from "../metadata/index.js";

/** The codes an `AgentError` carries; callers branch on these, never on the message. */
export type AgentErrorCode =
  | "INVALID_SPEC"
  | "NOT_FOUND"
  | "ALREADY_EXISTS"
  | "NOT_RUNNING"
  | "RUNTIME"
  | "NETWORK"
  | "IMAGE_NOT_FOUND"
  | "IMAGE_STEP_FAILED"
  | "DOCKERFILE"
  | "IO"
  | "NO_GPU"
  | "GPU_UNAVAILABLE"
  | "AGENT_UNAVAILABLE";

/** Errors of the node agent: sandboxes under runsc, their network, and image builds. */
export class AgentError extends StrataError {
  declare readonly code: AgentErrorCode;

  constructor(code: AgentErrorCode, message: string, ctx: StrataErrorContext = {}) {
    super(code, message, ctx);
  }

  /** A sandbox or image spec that cannot be honoured; `why` says which field and how. */
  static INVALID_SPEC(what: string, why: string): AgentError {
    return new AgentError("INVALID_SPEC", `check ${what}: ${why}`, { op: "check spec", details: { what, why } });
  }
  /** No sandbox with this id is known to the runtime. */
  static NOT_FOUND(id: string, op = "find sandbox"): AgentError {
    return new AgentError("NOT_FOUND", `${op} ${JSON.stringify(id)}: no such sandbox`, {
      op,
      hint: "list sandboxes with `strata sandbox ls`",
    });
  }
  /** A sandbox with this id already exists. */
  static ALREADY_EXISTS(id: string): AgentError {
    return new AgentError("ALREADY_EXISTS", `create sandbox ${JSON.stringify(id)}: already exists`, { op: "create sandbox" });
  }
  /** The sandbox exists but no longer runs (stopped, timed out, or killed for memory). */
  static NOT_RUNNING(id: string, op: string, why: string): AgentError {
    return new AgentError("NOT_RUNNING", `${op} ${JSON.stringify(id)}: sandbox is not running (${why})`, { op });
  }
  /** runsc (or a helper it needs) failed; `cause` holds its exit and stderr. */
  static RUNTIME(op: string, cause: unknown, ctx: StrataErrorContext = {}): AgentError {
    return new AgentError("RUNTIME", `${op}: ${causeText(cause)}`, {
      op,
      cause,
      hint: "check that runsc is installed (bash scripts/install-runsc.sh) and the agent runs as root",
      ...ctx,
    });
  }
  /** Setting up or tearing down a sandbox's network failed. */
  static NETWORK(op: string, cause: unknown): AgentError {
    return new AgentError("NETWORK", `${op}: ${causeText(cause)}`, {
      op,
      cause,
      hint: "egress needs iproute2 and nftables (bash scripts/install-runsc.sh)",
    });
  }
  /** An image named by hash, or a base image on disk, does not exist. */
  static IMAGE_NOT_FOUND(what: string): AgentError {
    return new AgentError("IMAGE_NOT_FOUND", `find image ${what}: not found`, {
      op: "find image",
      hint: "build the image first, or check the path of an OCI base",
    });
  }
  /** A build step failed; `output` is the tail of what it printed; nothing was cached for it. */
  static IMAGE_STEP_FAILED(step: string, exitCode: number | null, output: string): AgentError {
    return new AgentError(
      "IMAGE_STEP_FAILED",
      `build image: step ${step} failed with exit code ${exitCode ?? "none"}:\n${output}`,
      { op: "build image", details: { step, exitCode, output } },
    );
  }
  /** A Dockerfile line this parser cannot turn into image steps. */
  static DOCKERFILE(line: number, why: string): AgentError {
    return new AgentError("DOCKERFILE", `parse dockerfile: line ${line}: ${why}`, {
      op: "parse dockerfile",
      hint: "supported: FROM, RUN, ENV, WORKDIR, USER, COPY, ADD (local files), EXPOSE, LABEL, CMD",
    });
  }
  /** A host filesystem operation failed. */
  static IO(op: string, cause: unknown, ctx: StrataErrorContext = {}): AgentError {
    return new AgentError("IO", `${op}: ${causeText(cause)}`, { op, cause, ...ctx });
  }
  /** A sandbox asked for more GPUs of a type than this node has at all; `has` says what it has ("2 x a100", "none"). */
  static NO_GPU(type: string, count: number, has: string): AgentError {
    return new AgentError("NO_GPU", `create sandbox: this node has no gpu ${type}${count > 1 ? ` x${count}` : ""} (it has ${has})`, {
      op: "create sandbox",
      hint: "run without --gpu, ask for a type and count the node has, or run on a node with that gpu",
      details: { type, count, has },
    });
  }
  /** The node has enough GPUs of the type, but other sandboxes hold them. */
  static GPU_UNAVAILABLE(type: string, count: number, free: number, total: number): AgentError {
    return new AgentError("GPU_UNAVAILABLE", `create sandbox: gpu ${type} x${count} busy (${free} of ${total} free)`, {
      op: "create sandbox",
      hint: "stop a sandbox that holds one (strata sandbox ls), or try again later",
      details: { type, count, free, total },
    });
  }
  /** No node agent answers at `address`, and none could be started. */
  static AGENT_UNAVAILABLE(address: string, cause?: unknown): AgentError {
    return new AgentError("AGENT_UNAVAILABLE", `reach agent at ${address}: ${cause === undefined ? "no answer" : causeText(cause)}`, {
      op: "reach agent",
      cause,
      hint: "start one with `strata agent --daemon` (it needs root and runsc); its log is in $STRATA_HOME/logs/agent.log",
    });
  }
}
