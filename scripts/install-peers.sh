#!/bin/sh
# Installs the peers the fs benchmark compares Strata with (rclone mount, s3fs), from Debian's
# archive. Idempotent: does nothing when both are already installed.
set -eu
missing=""
command -v rclone >/dev/null 2>&1 || missing="$missing rclone"
command -v s3fs >/dev/null 2>&1 || missing="$missing s3fs"
if [ -z "$missing" ]; then
  echo "install-peers: rclone and s3fs already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing fuse3
echo "install-peers: installed$missing"
