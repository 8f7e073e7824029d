#!/bin/sh
# Installs the peers the fs benchmark compares Strata with (rclone mount, s3fs) and its native
# FUSE reference (fuse-overlayfs), from Debian's archive. Idempotent: does nothing when all
# three are already installed.
set -eu
missing=""
command -v rclone >/dev/null 2>&1 || missing="$missing rclone"
command -v s3fs >/dev/null 2>&1 || missing="$missing s3fs"
command -v fuse-overlayfs >/dev/null 2>&1 || missing="$missing fuse-overlayfs"
if [ -z "$missing" ]; then
  echo "install-peers: rclone, s3fs and fuse-overlayfs already installed"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $missing fuse3
echo "install-peers: installed$missing"
