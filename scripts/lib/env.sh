# Shared by setup.sh, test.sh and bin/kino: where kino keeps its caches and how it finds Node ≥ 22.
# Sourced, never executed. Only reads the environment; installs nothing unless asked to.

KINO_ROOT="${KINO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
KINO_CACHE="${KINO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kino}"
# The Node that set-up brings when the machine's is older than 22 (npm package node-linux-<arch>).
KINO_NODE_VERSION="24.21.0"
KINO_NODE_MIN_MAJOR=22

kino_node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }

# Prints the path of a Node ≥ 22: $KINO_NODE, the node on PATH, or the one set-up brought.
kino_find_node() {
  local candidate
  for candidate in "${KINO_NODE:-}" "$(command -v node 2>/dev/null || true)" \
    "$KINO_CACHE/node-$KINO_NODE_VERSION/package/bin/node"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] || continue
    if [ "$(kino_node_major "$candidate")" -ge "$KINO_NODE_MIN_MAJOR" ]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# The Python environment is keyed by the lock file, so a changed lock builds a new one beside it.
kino_python_env() {
  local hash
  hash=$(sha256sum "$KINO_ROOT/engine/requirements.lock" | cut -c1-16)
  echo "$KINO_CACHE/python-$hash"
}
