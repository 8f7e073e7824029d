#!/usr/bin/env bash
# Installs what agent/ needs to run sandboxes on Debian 12: Debian 13's runsc (0.0~20240729;
# bookworm's 20221219 breaks coreutils), debootstrap (image bases), iproute2 and nftables (egress
# networking). The trixie suite is added with a low pin priority, so nothing else is taken from
# it. The archive host and keyring are read from the machine's own apt sources. Idempotent: a
# second run changes nothing and only prints the runsc version.
set -euo pipefail

RUNSC_WANT="0.0~20240729"
SOURCES=/etc/apt/sources.list.d/debian.sources
TRIXIE_LIST=/etc/apt/sources.list.d/strata-trixie.sources
TRIXIE_PIN=/etc/apt/preferences.d/strata-trixie

if [ "$(id -u)" -ne 0 ]; then
  echo "install-runsc: must run as root" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive

installed_version() {
  { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | awk '/install ok installed/ {print $4}'
}

updated=0
apt_update() {
  if [ "$updated" = 0 ]; then
    apt-get update -q >/dev/null
    updated=1
  fi
}

missing=()
for p in debootstrap iproute2 nftables; do
  [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-runsc: installing ${missing[*]}"
  apt_update
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

have=$(installed_version runsc)
if [ -z "$have" ] || dpkg --compare-versions "$have" lt "$RUNSC_WANT"; then
  uri=""
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  if [ -f "$SOURCES" ]; then
    uri=$(awk '/^URIs:/ {print $2; exit}' "$SOURCES")
    k=$(awk '/^Signed-By:/ {print $2; exit}' "$SOURCES")
    [ -n "$k" ] && keyring="$k"
  fi
  if [ -z "$uri" ]; then
    uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' \
      /etc/apt/sources.list 2>/dev/null || true)
  fi
  if [ -z "$uri" ]; then
    echo "install-runsc: no Debian archive found in $SOURCES or /etc/apt/sources.list" >&2
    exit 1
  fi
  if [ ! -f "$TRIXIE_LIST" ]; then
    printf 'Types: deb\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n' "$uri" "$keyring" > "$TRIXIE_LIST"
    updated=0
  fi
  if [ ! -f "$TRIXIE_PIN" ]; then
    printf 'Package: *\nPin: release n=trixie\nPin-Priority: 100\n' > "$TRIXIE_PIN"
  fi
  echo "install-runsc: installing runsc from trixie"
  apt_update
  apt-get install -y -q --no-install-recommends -t trixie runsc >/dev/null
fi

runsc --version
