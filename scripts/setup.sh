#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root, with Node 20) to run Strata:
#   bash scripts/setup.sh          the CLI and the demo (fuse3, npm packages, the build)
#   bash scripts/setup.sh --test   also what the test suite needs (a local Ceph RGW as the S3 server,
#                                  Debian 13's runsc for the sandbox tests)
# Idempotent: a second run installs nothing and only rebuilds.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
for arg in "$@"; do
  case "$arg" in
    --test) want_test=1 ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done

node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
  echo "setup: Node 20 or newer is needed (found: $(node --version 2>/dev/null || echo none))" >&2
  exit 1
fi

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# Native builds (better-sqlite3) need a compiler, python3 and Node's headers (in /usr/include/node).
apt_install fuse3 python3 make g++
if [ "$want_test" = 1 ]; then
  bash scripts/install-rgw.sh
  bash scripts/install-runsc.sh
fi

# npm packages: reinstall only when the lock file changed since the last install.
export npm_config_nodedir=/usr npm_config_build_from_source=true
stamp=node_modules/.strata-lock-hash
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$lock_hash" ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > "$stamp"
fi

npm run --silent build
echo "setup: ready"
