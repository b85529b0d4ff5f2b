"""One error hierarchy, each kind with the exit code the command line gives it.

Every error this project raises on purpose derives from OrchestratorError (and from the
builtin it always was, so `except ValueError` around a SpecError still holds). The command
line's entry point (orchestrator/cli/__init__.py) has the one handler: the message, then
exit with `exit_code`. A command catches an error itself only to say more than the error
does (which flag, which run). tests/test_errors.py holds every class to this.

    1  the run, or the operation, failed              OrchestratorError
    2  bad input: spec, arguments, a path that is no run  InputError
    3  the run is owned by another live driver          OwnedElsewhere
    4  storage unreachable or unreadable                StorageProblem
    5  the Ray cluster or its Jobs API unreachable       RayProblem
"""

from __future__ import annotations

EXIT_FAILED, EXIT_INPUT, EXIT_LEASE, EXIT_STORAGE, EXIT_API = 1, 2, 3, 4, 5


class OrchestratorError(Exception):
    """An error this project raises on purpose; the message says what to do."""

    exit_code = EXIT_FAILED


class InputError(OrchestratorError):
    exit_code = EXIT_INPUT


class OwnedElsewhere(OrchestratorError):
    exit_code = EXIT_LEASE


class StorageProblem(OrchestratorError):
    exit_code = EXIT_STORAGE


class RayProblem(OrchestratorError):
    exit_code = EXIT_API
