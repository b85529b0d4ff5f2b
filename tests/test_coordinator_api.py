"""The coordinator's remote API is the Coordinator class's public methods, and its callers
cannot drift from it: every method of the workers' typed client (workers/calls.py) and every
`coord.<method>.remote(...)` in the driver and ray_compat calls a public method of the class
with arguments its signature accepts, and the class has no public method nobody calls.
No Ray cluster: the client runs against a fake handle that binds each call to the class."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest

from orchestrator.coordinator import Coordinator
from workers import calls

ROOT = Path(__file__).resolve().parent.parent
CALLERS = ["orchestrator/driver.py", "orchestrator/ray_compat.py"]  # besides workers/calls.py


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(fn)
        for name, fn in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


class Anything:
    """An argument of any type (a record's model_dump included)."""

    def model_dump(self) -> dict[str, Any]:
        return {}


class FakeHandle:
    """An actor handle whose `.<method>.remote(*args, **kwargs)` binds to Coordinator.<method>."""

    def __init__(self) -> None:
        self.called: list[str] = []

    def __getattr__(self, name: str) -> Any:
        handle = self

        class Method:
            _method_name = name

            @staticmethod
            def remote(*args: Any, **kwargs: Any) -> None:
                handle.called.append(name)
                assert name in public_methods(Coordinator), f"no public Coordinator.{name}"
                inspect.signature(getattr(Coordinator, name)).bind(None, *args, **kwargs)  # None: self

        return Method()


def client_methods() -> list[str]:
    return sorted(
        n for n, _ in inspect.getmembers(calls.Coordinator, inspect.isfunction) if not n.startswith("_")
    )


def run_client_method(name: str, handle: FakeHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    """calls.Coordinator.<name> with an argument for each of its parameters, Ray's get faked."""
    import ray

    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    method = getattr(calls.Coordinator(handle), name)
    method(**{p: Anything() for p in inspect.signature(method).parameters})


@pytest.mark.parametrize("name", client_methods())
def test_each_client_method_calls_a_coordinator_method_with_arguments_it_accepts(name, monkeypatch):
    handle = FakeHandle()
    run_client_method(name, handle, monkeypatch)
    assert handle.called, f"calls.Coordinator.{name} called nothing on the handle"


def remote_calls_in(path: Path) -> list[tuple[str, int, int, list[str]]]:
    """(method, line, positional count, keywords) of each `<...coord...>.<method>.remote(...)`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        func = getattr(node, "func", None)
        if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "remote"):
            continue
        target = func.value
        if isinstance(target, ast.Attribute) and "coord" in ast.unparse(target.value).lower():
            assert not any(isinstance(a, ast.Starred) for a in node.args), f"{path}:{node.lineno}"
            found.append((target.attr, node.lineno, len(node.args), [k.arg or "" for k in node.keywords]))
    return found


def test_the_drivers_calls_bind_to_coordinator_methods():
    sites = [(path, *site) for path in CALLERS for site in remote_calls_in(ROOT / path)]
    assert sites, "no coordinator calls found: has the driver changed how it names the handle?"
    for path, name, line, positional, keywords in sites:
        assert name in public_methods(Coordinator), f"{path}:{line}: no public Coordinator.{name}"
        sig = inspect.signature(getattr(Coordinator, name))
        sig.bind(None, *[Anything()] * positional, **{k: Anything() for k in keywords})


def test_every_public_coordinator_method_has_a_caller(monkeypatch):
    handle = FakeHandle()
    for name in client_methods():
        run_client_method(name, handle, monkeypatch)
    called = set(handle.called) | {site[0] for path in CALLERS for site in remote_calls_in(ROOT / path)}
    assert set(public_methods(Coordinator)) == called, "public but never called remotely: make it private"
