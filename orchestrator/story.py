"""Why a worker group restarted, in one line a person reads on the console and in `events`.

The coordinator hears of a restart from Ray Train's controller, whose error is a
`WorkerGroupError: Training failed due to worker errors:` followed by a snippet per rank
(tracebacks, health-check reports). Before that it has often heard the cause first hand: a
chaos kill claimed by a rank, or the user's exception recorded by the rank that raised it.
Those are preferred; Ray's text is read only when neither came (a process killed from outside,
a lost node).
"""

from __future__ import annotations

import re

_SNIPPET = re.compile(r"^\[Rank (\d+) Error Snippet\]:\s*$", re.MULTILINE)
_EXCEPTION = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception|Failed|Interrupt|Exit)\w*): (.+)$")
# What a collective raises when a peer died: a consequence, never the cause (workers/failures.py).
_PEER_GONE = re.compile(
    r"gloo|nccl|connection (?:reset|closed|refused)|closed by peer|broken pipe", re.IGNORECASE
)
_PG_REMOVED = "Destroying worker since its placement group was removed"
_DIED = re.compile(
    r"actor died unexpectedly|health check failed|worker (?:process )?(?:died|exited)", re.IGNORECASE
)
MAX = 300


def failure_cause(signature: str) -> str:
    """A user exception's signature (workers/failures.py: `Type: message at file:line (where)`)
    as one line: its first line, and where it was raised when the message had more lines."""
    lines = signature.strip().splitlines() or [signature]
    if len(lines) == 1:
        return _short(lines[0])
    at = lines[-1].rsplit(" at ", 1)
    return _short(f"{lines[0]} ... at {at[1]}" if len(at) == 2 else lines[0])


def restart_cause(reason: str) -> str:
    """Ray Train's error for a failed worker group -> the cause, in one line: a rank whose
    process died (with its pid), else the first exception that is not a collective's complaint
    about a dead peer, else that complaint, else the error's first line."""
    parts = _SNIPPET.split(reason)
    snippets = list(zip(parts[1::2], parts[2::2], strict=True))  # (rank, text)
    for rank, text in snippets:
        if _DIED.search(text):
            pid = re.search(r"\bpid=(\d+)", text)
            who = f"rank {rank} (pid {pid.group(1)})" if pid else f"rank {rank}"
            if _PG_REMOVED in text:  # Ray destroyed it on purpose: say so, not "killed from outside"
                return (
                    f"{who} was destroyed by Ray: the workers' placement group was removed (Ray "
                    "Train's placement-group cleaner judged its controller dead)"
                )
            return f"{who} died (killed from outside, out of memory, or crashed)"
    found = [
        (rank, line.strip())
        for rank, text in snippets
        for line in text.splitlines()
        if _EXCEPTION.match(line)
    ]
    own = [f for f in found if not _PEER_GONE.search(f[1])]
    for rank, line in own or found:
        return _short(f"rank {rank}: {line}")
    if not snippets:  # not a worker group's error: its last exception line, else its first line
        lines = [line.strip() for line in reason.splitlines() if _EXCEPTION.match(line)]
        if lines:
            return _short(lines[-1])
    first = next((line.strip() for line in reason.splitlines() if line.strip()), "unknown")
    return _short(first)


def _short(line: str) -> str:
    return line if len(line) <= MAX else line[: MAX - 3] + "..."
