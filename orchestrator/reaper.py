"""Stops an embedded Ray when the driver that started it dies without stopping it.

Ray ties its head processes to the driver (the kernel's parent-death signal), but that
reaches only direct children: the raylet's own children (its dashboard and runtime-env
agents) were seen outliving a SIGKILLed driver, and a user whose driver is OOM-killed
would keep paying for them. Ray's own reaper process is started only where the kernel
cannot fate-share, so this small watcher does the rest:

    python -m orchestrator.reaper DRIVER_PID

It runs in its own session, records the driver's descendants every second (pid and start
time, so a reused pid is never hit) and, once the driver is gone, sends what is left
SIGTERM, then SIGKILL after a grace period. When the driver ends normally (ray.shutdown
has stopped everything) it finds nothing left and exits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

INTERVAL_S = 1.0
GRACE_S = 5.0


def start(driver_pid: int) -> subprocess.Popen[bytes]:
    """The watcher for driver_pid, detached from the driver's session and terminal."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator.reaper", str(driver_pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a terminal's Ctrl-C to the driver's group does not reach it
    )


def watch(driver_pid: int) -> list[int]:
    """Wait for the driver to end; stop what it left. Returns the pids it had to stop."""
    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return []
    seen: dict[int, psutil.Process] = {}
    me = os.getpid()  # the driver's child too
    while _alive(driver):
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            break
        time.sleep(INTERVAL_S)
    # psutil.Process remembers each process's start time: is_running() is False for a
    # pid that was reused since, so only the driver's own leftovers are signalled.
    left = [p for p in seen.values() if _alive(p)]
    for p in left:
        _signal(p, "terminate")
    _, still = psutil.wait_procs(left, timeout=GRACE_S)
    for p in still:
        _signal(p, "kill")
    return [p.pid for p in left]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _signal(p: psutil.Process, how: str) -> None:
    try:
        getattr(p, how)()
    except psutil.NoSuchProcess:
        pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
