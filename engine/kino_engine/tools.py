"""One-shot commands the control plane runs: `python -m kino_engine.tools <command> ...`.

  make-tiny DIR [--seed N]            write a tiny random-weight Wan 2.1 T2V checkpoint (diffusers
                                      layout + kino_tiny.json) at DIR; an existing tiny checkpoint
                                      there is replaced, any other non-empty DIR is refused
  pull REPO_ID DIR [--revision REV]   download a diffusers checkpoint from the Hugging Face Hub into
                                      DIR.partial (resumable), validate it, rename it to DIR

The last line of stdout is one JSON object: {"ok": true, ...} or
{"ok": false, "error": {"code", "message"}} with exit status 1. Codes: BAD_ARGS, OUTPUT_UNWRITABLE,
NETWORK, NOT_FOUND, ACCESS_DENIED, BAD_CHECKPOINT, INTERNAL. Logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence


class ToolError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class _ArgParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ToolError("BAD_ARGS", f"{message} ({self.format_usage().strip()})")


def _folder_bytes(folder: str) -> tuple[int, int]:
    total = files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            total += os.path.getsize(os.path.join(root, name))
            files += 1
    return total, files


def _check_parent(folder: str) -> None:
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise ToolError("OUTPUT_UNWRITABLE", f"folder {parent} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ToolError("OUTPUT_UNWRITABLE", f"folder {parent} is not writable")


def make_tiny(folder: str, seed: int) -> dict[str, Any]:
    from .tiny import MARKER, make_tiny_checkpoint

    _check_parent(folder)
    previous = None
    if os.path.lexists(folder):
        if not os.path.isdir(folder):
            raise ToolError("OUTPUT_UNWRITABLE", f"{folder} exists and is not a folder")
        if os.listdir(folder):
            if not os.path.isfile(os.path.join(folder, MARKER)):
                raise ToolError(
                    "OUTPUT_UNWRITABLE",
                    f"{folder} is not empty and is not a kino tiny checkpoint: remove it or choose another folder",
                )
            previous = f"{folder}.replaced-{os.getpid()}"
            os.rename(folder, previous)
    try:
        make_tiny_checkpoint(folder, seed)
    except BaseException:
        if previous is not None:
            os.rename(previous, folder)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    size, files = _folder_bytes(folder)
    return {"path": os.path.abspath(folder), "seed": seed, "bytes": size, "files": files}


def pull(repo_id: str, folder: str, revision: str | None) -> dict[str, Any]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .checkpoint import inspect_checkpoint
    from .protocol import EngineFailure

    _check_parent(folder)
    if os.path.lexists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ToolError("OUTPUT_UNWRITABLE", f"{folder} already exists: remove it or choose another folder")
    staging = f"{os.path.abspath(folder)}.partial"  # a fixed name, so a second pull resumes the first
    try:
        snapshot_download(repo_id, revision=revision, local_dir=staging)
    except GatedRepoError as exc:
        raise ToolError(
            "ACCESS_DENIED",
            f"{repo_id} is gated: accept its license at https://huggingface.co/{repo_id} and log in "
            f"(`hf auth login` or HF_TOKEN): {exc}",
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise ToolError("NOT_FOUND", f"{repo_id}{'@' + revision if revision else ''} was not found on the Hub "
                        f"(or is private and needs a token): {exc}") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ToolError(
            "NETWORK",
            f"cannot reach the Hugging Face Hub to download {repo_id} (offline, or HF_HUB_OFFLINE is set); "
            f"check the network or HF_ENDPOINT, then run pull again (it resumes): {exc}",
        ) from exc
    except HfHubHTTPError as exc:
        raise ToolError("NETWORK", f"the Hub answered an error for {repo_id}: {exc}") from exc
    except OSError as exc:
        raise ToolError("NETWORK", f"downloading {repo_id} failed: {exc}") from exc
    try:
        inspect_checkpoint(staging)
    except EngineFailure as failure:
        raise ToolError("BAD_CHECKPOINT", f"{repo_id} downloaded, but {failure.message}") from failure
    os.replace(staging, folder)
    size, files = _folder_bytes(folder)
    return {"path": os.path.abspath(folder), "repo": repo_id, "revision": revision, "bytes": size, "files": files}


def _parser() -> argparse.ArgumentParser:
    parser = _ArgParser(prog="python -m kino_engine.tools")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgParser)
    tiny = commands.add_parser("make-tiny", help="write a tiny random-weight Wan 2.1 T2V checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    get = commands.add_parser("pull", help="download a diffusers checkpoint from the Hugging Face Hub")
    get.add_argument("repo_id")
    get.add_argument("dir")
    get.add_argument("--revision", default=None)
    return parser


def run(argv: Sequence[str]) -> dict[str, Any]:
    """Execute one command; returns its JSON answer (without "ok"); raises ToolError."""
    args = _parser().parse_args(list(argv))
    commands: dict[str, Callable[[], dict[str, Any]]] = {
        "make-tiny": lambda: make_tiny(args.dir, args.seed),
        "pull": lambda: pull(args.repo_id, args.dir, args.revision),
    }
    return commands[args.command]()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        answer: dict[str, Any] = {"ok": True, **run(sys.argv[1:] if argv is None else argv)}
        status = 0
    except ToolError as exc:
        answer, status = {"ok": False, "error": {"code": exc.code, "message": exc.message}}, 1
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        answer, status = {"ok": False, "error": {"code": "INTERNAL", "message": f"{type(exc).__name__}: {exc}"}}, 1
    sys.stdout.flush()
    print(json.dumps(answer), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
