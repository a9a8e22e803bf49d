#!/usr/bin/env bash
# On the GPU machine: unpacks .carry/node-kino.tar.xz (see pack-node.sh) into the checkout and prints
# the line to export so bin/kino finds that Node:  eval "$(bash scripts/device/unpack-node.sh)"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
archive="$root/.carry/node-kino.tar.xz"
[ -f "$archive" ] || { echo "unpack-node: $archive is missing: run scripts/device/pack-node.sh here and carry .carry" >&2; exit 1; }
stage="$root/.carry/unpacked"
rm -rf "$stage" && mkdir -p "$stage"
xz -dc "$archive" | tar -C "$stage" -xf -
rm -rf "$root/node_modules" "$root/dist" "$root/.carry/node"
mv "$stage/node_modules" "$root/node_modules"
mv "$stage/dist" "$root/dist"
mv "$stage/node" "$root/.carry/node"
rmdir "$stage"
echo "export KINO_NODE=$root/.carry/node/bin/node"
