"""A cancellation token shared by the thread that reads requests and the thread that runs a job.

`request()` (reader thread) asks for cancellation and says whether it will be honoured; the job
polls `is_cancelled()` between steps, and calls `close()` at its last cancellation point: from then
on `request()` answers False, so a `cancel` answered `{cancelled: true}` always ends the job with
CANCELLED, and one answered `{cancelled: false}` never does.
"""

from __future__ import annotations

import threading


class CancelToken:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requested = False
        self._closed = False

    def request(self) -> bool:
        """Ask for cancellation; True if the job will end with CANCELLED."""
        with self._lock:
            if self._closed:
                return False
            self._requested = True
            return True

    def is_cancelled(self) -> bool:
        with self._lock:
            return self._requested

    def close(self) -> bool:
        """Pass the last cancellation point: True if the job may finish, False if it was cancelled."""
        with self._lock:
            self._closed = True
            return not self._requested
