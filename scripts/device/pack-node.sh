#!/usr/bin/env bash
# Packs what `kino serve` and `kino bench-http` need on a GPU machine that has no Node and no network:
# this machine's Node binary, the production node_modules and the built dist/ (CLI and web UI), as one
# xz archive small enough to carry (about 35 MB, under the device tool's 64 MiB):
#   bash scripts/device/pack-node.sh            # writes .carry/node-kino.tar.xz (git-ignored)
# then on the device (carry [".carry"]): bash scripts/device/unpack-node.sh
# which leaves node_modules/, dist/ and .carry/node/bin/node in place and prints the KINO_NODE to export.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
. "$root/scripts/lib/env.sh"
node=$(kino_find_node) || { echo "pack-node: no Node >= $KINO_NODE_MIN_MAJOR here; run scripts/setup.sh" >&2; exit 1; }
[ -f "$root/dist/src/cli/main.js" ] && [ -d "$root/dist/ui" ] || { echo "pack-node: build first (npm run build)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/node/bin"
cp "$node" "$stage/node/bin/node"
cp "$root/package.json" "$root/package-lock.json" "$stage/"
(cd "$stage" && PATH="$(dirname "$node"):$PATH" npm ci --omit=dev --ignore-scripts --silent)
cp -r "$root/dist" "$stage/dist"
mkdir -p "$root/.carry"
tar -C "$stage" -cf - node node_modules dist | xz -T0 -6 > "$root/.carry/node-kino.tar.xz.partial"
mv "$root/.carry/node-kino.tar.xz.partial" "$root/.carry/node-kino.tar.xz"
echo "pack-node: $(du -h "$root/.carry/node-kino.tar.xz" | cut -f1) in .carry/node-kino.tar.xz (Node $("$node" --version))"
