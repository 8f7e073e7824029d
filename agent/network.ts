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
 *   allow-listed destinations and drops the rest (the host itself included); table `ip strata_nat`
 *   masquerades 10.213.0.0/16 leaving through any other interface.
 * Invariant: an interface listed in the vmap always has its chain; teardown removes the element
 * before the chain. Needs root, iproute2, nftables; sets net.ipv4.ip_forward=1 on the host.
 */
import { createHash } from "node:crypto";
import { lookup } from "node:dns/promises";
import { isIP } from "node:net";
import { AgentError } from "./errors.js";
import { mustRun, runCommand } from "./exec-util.js";

/** The subnet sandbox addresses are taken from. */
export const EGRESS_SUBNET = "10.213.0.0/16";

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
  /** The resolved allow-list, as IPv4 addresses or CIDRs. */
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

async function resolveAllow(allow: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const a of allow) {
    const [host, bits] = a.split("/", 2) as [string, string | undefined];
    if (isIP(host) === 4) {
      if (bits !== undefined && !(/^\d+$/.test(bits) && Number(bits) <= 32)) throw AgentError.INVALID_SPEC(`network allow ${a}`, "bad prefix length");
      out.push(a);
    } else if (isIP(host) === 6) {
      throw AgentError.INVALID_SPEC(`network allow ${a}`, "IPv6 is not supported");
    } else if (bits === undefined && /^[a-z0-9.-]+$/i.test(host)) {
      const found = await lookup(host, { family: 4, all: true }).catch((e) => {
        throw AgentError.NETWORK(`resolve ${host}`, e);
      });
      for (const f of found) out.push(f.address);
    } else {
      throw AgentError.INVALID_SPEC(`network allow ${JSON.stringify(a)}`, "not an IPv4 address, CIDR or host name");
    }
  }
  return [...new Set(out)];
}

async function ensureBase(): Promise<void> {
  baseReady ??= (async () => {
    await mustRun(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
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
 * `allow` (IPv4 addresses, CIDRs, or host names resolved now). Fails INVALID_SPEC or NETWORK;
 * on failure nothing is left behind.
 */
export async function setupEgress(id: string, allow: string[]): Promise<EgressNetwork> {
  const allowed = await resolveAllow(allow);
  try {
    await ensureBase();
  } catch (e) {
    throw AgentError.NETWORK("set up host network filter", e);
  }
  const tag = createHash("sha256").update(id).digest("hex").slice(0, 8);
  const taken = await takenIndexes();
  let n = 0;
  while (used.has(n) || taken.has(n)) n++;
  if (n >= 16384) throw AgentError.NETWORK("allocate sandbox address", new Error(`no free /30 left in ${EGRESS_SUBNET}`));
  used.add(n);
  const net: EgressNetwork = {
    netns: `strata-${id}`,
    netnsPath: `/var/run/netns/strata-${id}`,
    hostIf: `sv${tag}`,
    hostIp: addr(n, 1),
    sandboxIp: addr(n, 2),
    allowed,
    teardown: async () => {
      await runCommand(["nft", "-f", "-"], {
        input: `delete element inet strata sandboxes { "sv${tag}" }\n`,
      });
      await runCommand(["nft", "-f", "-"], { input: `flush chain inet strata sb_${tag}\ndelete chain inet strata sb_${tag}\n` });
      await runCommand(["ip", "link", "del", `sv${tag}`]);
      await runCommand(["ip", "netns", "del", `strata-${id}`]);
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
    const accept = allowed.length ? `  ip daddr { ${allowed.join(", ")} } accept\n` : "";
    await mustRun(["nft", "-f", "-"], {
      input:
        `add chain inet strata sb_${tag}\n` +
        `flush chain inet strata sb_${tag}\n` +
        `table inet strata {\n chain sb_${tag} {\n${accept}  drop\n }\n}\n` +
        `add element inet strata sandboxes { "${net.hostIf}" : jump sb_${tag} }\n`,
    });
  } catch (e) {
    await net.teardown();
    throw AgentError.NETWORK(`set up network of sandbox ${JSON.stringify(id)}`, e);
  }
  return net;
}
