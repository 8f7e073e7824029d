#!/bin/sh
# Installs what test/support/rgw.ts needs (a single-node Ceph RGW). Idempotent: runs
# apt-get update only when a package is missing.
set -eu
PKGS="radosgw ceph-mon ceph-osd"
missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
if [ -z "$missing" ]; then
  echo "install-rgw: $PKGS already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends $missing
