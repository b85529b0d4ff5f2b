"""failure.mode replicas: the two restart budgets, counted apart. A replica replaced alone (the
others train on) spends failure.max_replacements; a restart of the whole group (Ray Train's, when
every replica failed, or the driver's fallback when its controller gave up) spends
failure.max_failures. Pure: the failure policy in orchestrator/ray_compat.py asks it for each
failure Ray Train would retry, and the driver for its own fallback."""

from __future__ import annotations

from dataclasses import dataclass, replace


def replaced_alone(failed_ranks: int, workers: int) -> bool:
    """Ray Train replaces only the failed replica groups (one worker each) when some, not all,
    failed; when all did it restarts the whole group."""
    return 0 < failed_ranks < workers


@dataclass
class RestartBudget:
    max_failures: int  # restarts of the whole group (-1: no limit)
    max_replacements: int  # replicas replaced alone (-1: no limit)
    groups: int = 0  # spent so far
    replacements: int = 0

    def spend(self, alone: bool) -> str | None:
        """Count one restart of this kind: None while within its budget, else why the run stops."""
        if alone:
            self.replacements += 1
            used, limit, field = self.replacements, self.max_replacements, "max_replacements"
        else:
            self.groups += 1
            used, limit, field = self.groups, self.max_failures, "max_failures"
        if limit == -1 or used <= limit:
            return None
        what = "replicas replaced alone" if alone else "restarts of the whole group"
        return f"failure.{field} ({limit}) {what} spent"

    def refused(self, alone: bool) -> str | None:
        """Why one more restart of this kind would be refused (its budget spent), else None."""
        return replace(self).spend(alone)

    def group_restart_left(self) -> bool:
        """Whether one more restart of the whole group is allowed."""
        return self.max_failures == -1 or self.groups < self.max_failures
