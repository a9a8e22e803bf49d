"""How the engine's one-shot measuring tools (bench, profile) read their spec and answer.

A tool reads its spec as JSON from `--spec FILE` (or stdin) and prints exactly one JSON line last on
stdout: {"ok": true, "result": ...} or {"ok": false, "error": {"code", "message"}}, exiting 1 on
failure with any traceback on stderr. The control plane reads that line (src/engine/tools.ts).
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, Callable

from .protocol import EngineFailure


def read_spec(path: str | None) -> Any:
    """The spec from `path`, or from stdin when None."""
    if path is None:
        return json.load(sys.stdin)
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def answer(work: Callable[[], dict[str, Any]]) -> int:
    """Runs `work` and prints its answer line; returns the exit status."""
    try:
        result = work()
    except EngineFailure as failure:
        print(json.dumps({"ok": False, "error": failure.to_json()}))
        return 1
    except Exception as exc:  # noqa: BLE001 - reported as INTERNAL with the traceback on stderr
        traceback.print_exc()
        print(json.dumps({"ok": False, "error": {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}}))
        return 1
    print(json.dumps({"ok": True, "result": result}))
    return 0
