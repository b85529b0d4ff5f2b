"""Is a process still there? One answer for the lease, the CLI and the tests."""

from __future__ import annotations

import psutil


def pid_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True while pid runs (a zombie counts as gone). With create_time, a recycled pid
    that now belongs to another process counts as gone too."""
    if not pid or pid < 0:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process, but it exists
