"""The real CLI as a subprocess, and reading what a run leaves: for tests that run the real CLI,
real Ray and real process kills, and for the fault campaign."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # the repository root: the CLI runs from here
CLI = [sys.executable, "-m", "orchestrator"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None, check: bool = False
) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [*CLI, *args],
        cwd=ROOT,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and p.returncode != 0:
        raise AssertionError(
            f"orchestrator {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
        )
    return p


def start_cli(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """The CLI in the background, in its own process group, output to log."""
    f = open(log, "wb")
    return subprocess.Popen(
        [*CLI, *args],
        cwd=ROOT,
        env=env or cli_env(),
        stdout=f,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.5) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def expected_kept(metrics: list[dict[str, Any]], monitor: str, mode: str, top_k: int) -> set[int]:
    """Epochs best-k ∪ latest should leave, computed from the metrics history alone
    (every epoch checkpointed; ties go to the newer)."""
    sign = 1 if mode == "min" else -1
    ranked = sorted(metrics, key=lambda r: (sign * r[monitor], -r["epoch"]))
    return {r["epoch"] for r in ranked[:top_k]} | {max(r["epoch"] for r in metrics)}
