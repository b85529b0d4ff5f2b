"""Is a process still there? One answer for the lease, the CLI and the tests."""

from __future__ import annotations

import os

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


def pid_namespace() -> str | None:
    """This process's pid namespace ("pid:[4026531836]" on Linux), or None where there is no
    /proc. Two processes with the same host name may still not see each other's pids (a
    container with host networking): only within one namespace does a missing pid mean a
    dead process."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def start_time(pid: int) -> float | None:
    """When pid started (psutil's create_time), or None when it is gone."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
