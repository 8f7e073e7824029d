/**
 * Egress networking for sandboxes: one network namespace per sandbox, a veth pair into it, and a
 * host-side nftables filter (gVisor's netstack bypasses rules inside the namespace).
 *
 * Layout, per sandbox with index N (0..16383):
 * - netns `strata-<id>`; inside it `eth0` = 10.213.0.0/16 + 4N + 2 /30, lo up, default route via
 *   the host end; runsc takes the address and route over into its own netstack.
 * - on the host: veth `sv<8 hex of sha256(id)>` = 4N + 1 /30.
 * - nftables, table `inet strata`: chains `forward` and `input` dispatch on the veth's name
 *   (`iifname vmap @sandboxes`) to the sandbox's own chain `sb_<hex>`, which accepts only the
 *   allow-listed destinations (an address or CIDR, optionally one TCP/UDP port) and drops the rest
 *   (the host itself included); table `ip strata_nat` masquerades 10.213.0.0/16 leaving through
 *   any other interface.
 * Every name derives from the sandbox id alone (`egressNames`), so a later agent process can tear
 * down what a killed one set up (`teardownEgress`) without any record of the address.
 * Invariant: an interface listed in the vmap always has its chain; teardown removes the element
 * before the chain. Needs root, iproute2, nftables.
 *
 * Forwarding: egress needs net.ipv4.ip_forward=1, a host-wide setting. The first setup that finds
 * it off writes the value it had to `IP_FORWARD_SAVED` (host-wide too, in /run: it lasts exactly
 * as long as the setting, until reboot, and outlives the agent process), then turns it on.
 * `restoreForwarding` puts the saved value back once the vmap has no element left, i.e. no egress
 * sandbox of any agent on the host remains; teardown calls it, and so does a restarted agent
 * (`GvisorRuntime.settle`). Ordering that makes concurrent setups and restores safe: a setup
 * turns forwarding on after adding its vmap element; a restore looks at the vmap again after
 * writing the old value and turns forwarding back on if an element appeared meanwhile.
 */
import { createHash } from "node:crypto";
import { lookup } from "node:dns/promises";
import { mkdir, readFile, unlink, writeFile } from "node:fs/promises";
import { isIP } from "node:net";
import { dirname } from "node:path";
import { AgentError } from "./errors.js";
import { mustRun, runCommand } from "./exec-util.js";

/** The subnet sandbox addresses are taken from. */
export const EGRESS_SUBNET = "10.213.0.0/16";

/** Where the value net.ipv4.ip_forward had before egress turned it on is kept while egress needs it. */
export const IP_FORWARD_SAVED = "/run/strata/ip_forward.before";

const IP_FORWARD = "/proc/sys/net/ipv4/ip_forward";

/** A sandbox's network namespace with its filter in place. */
export interface EgressNetwork {
  /** Name of the namespace (as in `ip netns`). */
  netns: string;
  /** Path to put in config.json's network namespace. */
  netnsPath: string;
  /** The host end of the veth. */
  hostIf: string;
  /** The host end's address (the sandbox's gateway). */
  hostIp: string;
  /** The sandbox's address. */
  sandboxIp: string;
  /** The resolved allow-list: IPv4 addresses or CIDRs, each optionally with ":PORT". */
  allowed: string[];
  /** Removes the filter, the veth and the namespace. Idempotent; never rejects. */
  teardown(): Promise<void>;
}

const used = new Set<number>();
let baseReady: Promise<void> | undefined;

function addr(n: number, host: number): string {
  const v = n * 4 + host;
  return `10.213.${(v >> 8) & 255}.${v & 255}`;
}

interface AllowRule {
  /** An IPv4 address or CIDR. */
  dest: string;
  /** Only this TCP/UDP port; undefined: every protocol and port. */
  port?: number;
}

function ruleText(r: AllowRule): string {
  return r.port === undefined ? r.dest : `${r.dest}:${r.port}`;
}

/** One allow-list entry as written, checked but not resolved. */
export interface EgressEntry {
  /** The entry without its port: "10.0.0.1", "10.0.0.0/8" or "example.internal". */
  target: string;
  /** "address" and "cidr" are IPv4; "name" is a host name, resolved when the sandbox starts. */
  kind: "address" | "cidr" | "name";
  /** Only this TCP/UDP port (1-65535); undefined: every protocol and port. */
  port?: number;
}

/**
 * Checks one allow-list entry's syntax: "ADDR", "ADDR/BITS" (IPv4) or "HOST", each optionally
 * followed by ":PORT". Resolves nothing. Fails INVALID_SPEC; `details.why` says what is wrong.
 */
export function parseEgressEntry(a: string): EgressEntry {
  const what = `network allow ${JSON.stringify(a)}`;
  if (typeof a !== "string") throw AgentError.INVALID_SPEC(what, "not a string");
  if (a.split(":").length > 2) throw AgentError.INVALID_SPEC(what, "IPv6 is not supported");
  const [target, portText] = a.split(":", 2) as [string, string | undefined];
  let port: number | undefined;
  if (portText !== undefined) {
    port = Number(portText);
    if (!/^\d+$/.test(portText) || port < 1 || port > 65535) throw AgentError.INVALID_SPEC(what, "port must be 1-65535");
  }
  const [host, bits] = target.split("/", 2) as [string, string | undefined];
  let kind: EgressEntry["kind"];
  if (isIP(host) === 4) {
    if (bits !== undefined && !(/^\d+$/.test(bits) && Number(bits) <= 32)) throw AgentError.INVALID_SPEC(what, "bad prefix length (want 0-32)");
    kind = bits === undefined ? "address" : "cidr";
  } else if (bits === undefined && /^[a-z0-9.-]+$/i.test(host) && !/^[\d.]+$/.test(host)) {
    kind = "name";
  } else {
    throw AgentError.INVALID_SPEC(what, "not an IPv4 address, CIDR or host name (each optionally with :PORT)");
  }
  return port === undefined ? { target, kind } : { target, kind, port };
}

/**
 * Parses and resolves an allow-list (see `parseEgressEntry`). Host names are resolved now (IPv4
 * only). Fails INVALID_SPEC or NETWORK.
 */
async function resolveAllow(allow: string[]): Promise<AllowRule[]> {
  const out = new Map<string, AllowRule>();
  for (const a of allow) {
    const { target, kind, port } = parseEgressEntry(a);
    const dests: string[] = [];
    if (kind !== "name") {
      dests.push(target);
    } else {
      const found = await lookup(target, { family: 4, all: true }).catch((e) => {
        throw AgentError.NETWORK(`resolve ${target}`, e);
      });
      for (const f of found) dests.push(f.address);
    }
    for (const dest of dests) {
      const r: AllowRule = port === undefined ? { dest } : { dest, port };
      out.set(ruleText(r), r);
    }
  }
  return [...out.values()];
}

/** Turns net.ipv4.ip_forward on, first saving its value to `IP_FORWARD_SAVED` unless a value is saved already. */
async function forwardingOn(): Promise<void> {
  const now = (await readFile(IP_FORWARD, "utf8")).trim();
  if (now === "1") return;
  await mkdir(dirname(IP_FORWARD_SAVED), { recursive: true });
  await writeFile(IP_FORWARD_SAVED, `${now}\n`, { flag: "wx" }).catch((e: NodeJS.ErrnoException) => {
    if (e.code !== "EEXIST") throw e;
  });
  await writeFile(IP_FORWARD, "1\n");
}

/** Whether any egress sandbox's filter is in place on this host (an element in the vmap); true when that cannot be told. */
async function egressInUse(): Promise<boolean> {
  const r = await runCommand(["nft", "-j", "list", "map", "inet", "strata", "sandboxes"]).catch(() => undefined);
  if (!r) return false; // no nft at all: no filter can exist
  if (r.code !== 0) return !/No such file or directory/.test(r.stderr.toString());
  try {
    const j = JSON.parse(r.stdout.toString()) as { nftables?: { map?: { elem?: unknown[] } }[] };
    return (j.nftables ?? []).some((o) => (o.map?.elem?.length ?? 0) > 0);
  } catch {
    return true;
  }
}

/**
 * Puts back the net.ipv4.ip_forward value that egress set-up saved, when no egress sandbox is
 * left on the host (see the file's doc); no-op when nothing is saved. Idempotent; never rejects.
 */
export async function restoreForwarding(): Promise<void> {
  try {
    const saved = (await readFile(IP_FORWARD_SAVED, "utf8").catch(() => undefined))?.trim();
    if (saved === undefined || (await egressInUse())) return;
    if (saved === "0" || saved === "1") await writeFile(IP_FORWARD, `${saved}\n`);
    await unlink(IP_FORWARD_SAVED).catch(() => undefined);
    if (await egressInUse()) await forwardingOn();
  } catch {
    // A host setting we could not put back stays as it is; the next teardown or start-up tries again.
  }
}

async function ensureBase(): Promise<void> {
  baseReady ??= (async () => {
    const has = await runCommand(["nft", "list", "table", "inet", "strata"]);
    if (has.code === 0) return;
    await mustRun(["nft", "-f", "-"], {
      input: [
        "table inet strata {",
        "  map sandboxes { type ifname : verdict; }",
        "  chain forward { type filter hook forward priority 0; policy accept; iifname vmap @sandboxes; }",
        "  chain input { type filter hook input priority 0; policy accept; iifname vmap @sandboxes; }",
        "}",
        "table ip strata_nat {",
        `  chain postrouting { type nat hook postrouting priority 100; ip saddr ${EGRESS_SUBNET} oifname != "sv*" masquerade; }`,
        "}",
      ].join("\n"),
    });
  })().catch((e) => {
    baseReady = undefined;
    throw e;
  });
  return baseReady;
}

async function takenIndexes(): Promise<Set<number>> {
  const r = await runCommand(["ip", "-4", "-o", "addr", "show"]);
  const taken = new Set<number>();
  for (const m of r.stdout.toString().matchAll(/inet 10\.213\.(\d+)\.(\d+)\//g)) {
    taken.add(((Number(m[1]) << 8) + Number(m[2])) >> 2);
  }
  return taken;
}

/**
 * Creates the namespace, veth, addresses, route and filter for sandbox `id`, allowing only
 * `allow` (IPv4 addresses, CIDRs, or host names resolved now; each optionally ":PORT", which
 * then allows only that TCP/UDP port). Fails INVALID_SPEC or NETWORK;
 * on failure nothing is left behind.
 */
export async function setupEgress(id: string, allow: string[]): Promise<EgressNetwork> {
  const rules = await resolveAllow(allow);
  try {
    await ensureBase();
  } catch (e) {
    throw AgentError.NETWORK("set up host network filter", e);
  }
  const names = egressNames(id);
  const taken = await takenIndexes();
  let n = 0;
  while (used.has(n) || taken.has(n)) n++;
  if (n >= 16384) throw AgentError.NETWORK("allocate sandbox address", new Error(`no free /30 left in ${EGRESS_SUBNET}`));
  used.add(n);
  const net: EgressNetwork = {
    netns: names.netns,
    netnsPath: names.netnsPath,
    hostIf: names.hostIf,
    hostIp: addr(n, 1),
    sandboxIp: addr(n, 2),
    allowed: rules.map(ruleText),
    teardown: async () => {
      await teardownEgress(id);
      used.delete(n);
    },
  };
  try {
    await mustRun(["ip", "netns", "add", net.netns]);
    await mustRun(["ip", "link", "add", net.hostIf, "type", "veth", "peer", "name", "eth0", "netns", net.netns]);
    await mustRun(["ip", "addr", "add", `${net.hostIp}/30`, "dev", net.hostIf]);
    await mustRun(["ip", "link", "set", net.hostIf, "up"]);
    await mustRun(["ip", "-n", net.netns, "addr", "add", `${net.sandboxIp}/30`, "dev", "eth0"]);
    await mustRun(["ip", "-n", net.netns, "link", "set", "eth0", "up"]);
    await mustRun(["ip", "-n", net.netns, "link", "set", "lo", "up"]);
    await mustRun(["ip", "-n", net.netns, "route", "add", "default", "via", net.hostIp]);
    const accept = rules
      .map((r) => (r.port === undefined ? `  ip daddr ${r.dest} accept\n` : `  ip daddr ${r.dest} meta l4proto { tcp, udp } th dport ${r.port} accept\n`))
      .join("");
    await mustRun(["nft", "-f", "-"], {
      input:
        `add chain inet strata ${names.chain}\n` +
        `flush chain inet strata ${names.chain}\n` +
        `table inet strata {\n chain ${names.chain} {\n${accept}  drop\n }\n}\n` +
        `add element inet strata sandboxes { "${net.hostIf}" : jump ${names.chain} }\n`,
    });
    await forwardingOn();
  } catch (e) {
    await net.teardown();
    throw AgentError.NETWORK(`set up network of sandbox ${JSON.stringify(id)}`, e);
  }
  return net;
}

/** The names of a sandbox's network pieces; they depend on its id only. */
export function egressNames(id: string): { netns: string; netnsPath: string; hostIf: string; chain: string } {
  const tag = createHash("sha256").update(id).digest("hex").slice(0, 8);
  return { netns: `strata-${id}`, netnsPath: `/var/run/netns/strata-${id}`, hostIf: `sv${tag}`, chain: `sb_${tag}` };
}

/**
 * Removes the filter element and chain, the veth and the namespace of sandbox `id`, whichever
 * exist, also when another (killed) process set them up; then `restoreForwarding`. Idempotent;
 * never rejects.
 */
export async function teardownEgress(id: string): Promise<void> {
  const names = egressNames(id);
  await runCommand(["nft", "-f", "-"], { input: `delete element inet strata sandboxes { "${names.hostIf}" }\n` }).catch(() => undefined);
  await runCommand(["nft", "-f", "-"], { input: `flush chain inet strata ${names.chain}\ndelete chain inet strata ${names.chain}\n` }).catch(() => undefined);
  await runCommand(["ip", "link", "del", names.hostIf]).catch(() => undefined);
  await runCommand(["ip", "netns", "del", names.netns]).catch(() => undefined);
  await restoreForwarding();
}

/**
 * The network of a sandbox set up by an earlier process, when its namespace still exists: its
 * addresses are read back from the host veth. Undefined when there is none.
 */
export async function findEgress(id: string, allowed: string[] = []): Promise<EgressNetwork | undefined> {
  const names = egressNames(id);
  const r = await runCommand(["ip", "-4", "-o", "addr", "show", "dev", names.hostIf]).catch(() => undefined);
  const m = r && r.code === 0 ? /inet (10\.213\.(\d+)\.(\d+))\//.exec(r.stdout.toString()) : null;
  if (!m) return undefined;
  const n = ((Number(m[2]) << 8) + Number(m[3])) >> 2;
  used.add(n);
  return {
    netns: names.netns, netnsPath: names.netnsPath, hostIf: names.hostIf, hostIp: addr(n, 1), sandboxIp: addr(n, 2), allowed,
    teardown: async () => {
      await teardownEgress(id);
      used.delete(n);
    },
  };
}
