"""Fault-tolerant distributed PyTorch training on Ray, with top-k checkpoints that are
never lost or half-read.

The Python API reads runs from storage: `open_run(uri)`, `load_best(uri, model=...)`
(docs/serving.md). The command line is `orchestrator --help`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Run", "open_run", "load_best", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import orchestrator` (the CLI does) stays light; the API loads on first use.
    if name in ("Run", "open_run", "load_best"):
        from orchestrator import api

        return getattr(api, name)
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
