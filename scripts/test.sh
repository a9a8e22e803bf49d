#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh) and runs every test: TypeScript then Python.
set -euo pipefail
. "$(dirname "$0")/lib/env.sh"
cd "$KINO_ROOT"
bash scripts/setup.sh --tests
NODE=$(kino_find_node)
export PATH="$(dirname "$NODE"):$PATH"
PY="$(kino_python_env)/bin/python"

status=0
echo "== typecheck"
npm run --silent typecheck || status=1
echo "== TypeScript tests"
npm test || status=1
echo "== Python tests"
(cd engine && "$PY" -m pytest -q tests) || status=1
exit $status
