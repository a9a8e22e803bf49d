#!/usr/bin/env bash
# Installs everything kino needs on a fresh machine, idempotently:
#   system packages (ffmpeg for ffprobe/concat, python3-venv; with --tests also chromium and
#   redis-server for the server's tests) from Debian when missing,
#   Node >= 22 (from the npm registry's node-linux-<arch> package when the machine's Node is older),
#   the Node dependencies and the TypeScript build,
#   a Python environment with torch, diffusers, transformers, safetensors, huggingface_hub and PyAV,
#   cached outside the clone in $KINO_CACHE/python-<hash of engine/requirements.lock>.
set -euo pipefail
. "$(dirname "$0")/lib/env.sh"
cd "$KINO_ROOT"
say() { echo "[kino setup] $*" >&2; }

# --- system packages ---
missing=()
command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
# Only for the tests (scripts/test.sh passes --tests): the web UI's tests drive Debian's Chromium
# (playwright-core) and the shared-queue tests run a redis-server. Generating a video needs neither.
if [ "${1:-}" = "--tests" ]; then
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
fi
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "missing ${missing[*]}: install them (e.g. sudo apt-get install ${missing[*]}) and run this again"
    exit 1
  fi
fi
python3 -c 'import sys; assert sys.version_info >= (3, 10), sys.version' ||
  { say "Python >= 3.10 is needed (found $(python3 --version))"; exit 1; }

# --- Node >= 22 ---
if ! NODE=$(kino_find_node); then
  case "$(uname -m)" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; *) say "no Node build for $(uname -m)"; exit 1 ;; esac
  dir="$KINO_CACHE/node-$KINO_NODE_VERSION"
  say "Node on this machine is older than $KINO_NODE_MIN_MAJOR; fetching node-linux-$arch@$KINO_NODE_VERSION from the npm registry"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  (cd "$dir.tmp" && npm pack --silent "node-linux-$arch@$KINO_NODE_VERSION" >/dev/null && tar xzf ./*.tgz && rm ./*.tgz)
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
  NODE=$(kino_find_node) || { say "the fetched Node does not run"; exit 1; }
fi
export PATH="$(dirname "$NODE"):$PATH"
say "node $("$NODE" --version) at $NODE"

# --- Node dependencies and build ---
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build

# --- Python environment, cached outside the clone and keyed by the lock file ---
PYENV=$(kino_python_env)
if [ ! -x "$PYENV/bin/python" ] || [ ! -f "$PYENV/.kino-complete" ]; then
  say "creating the Python environment $PYENV (torch and friends: a few GB, once per lock file)"
  # An interrupted install leaves no marker, so the next run starts it again from scratch.
  rm -rf "$PYENV"
  python3 -m venv "$PYENV"
  "$PYENV/bin/python" -m pip install -q --upgrade pip
  "$PYENV/bin/python" -m pip install -q --cache-dir "$KINO_CACHE/pip" -r engine/requirements.lock
  touch "$PYENV/.kino-complete"
fi
say "python env $PYENV ready"
