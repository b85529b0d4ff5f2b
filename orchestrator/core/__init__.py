"""The core both planes share: storage, the manifest and records, retention policies,
verification, the lease and task names.

The one rule: nothing here imports Ray or torch (tests/test_core_imports.py checks it),
so all of it is plain Python, unit-tested on memory:// and a temp dir in milliseconds.
"""
