"""Seeing a run, apart from the CLI that shows it: orchestrator/report/curves.py."""
