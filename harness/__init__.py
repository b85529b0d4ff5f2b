"""The test harness: what the test suite, the fault campaign and the benchmarks use to run the
real CLI, a local multi-node Ray cluster and moto's S3 server. Imported as a package (from the
repository root, or after `pip install -e .`), never by editing `sys.path`.

    harness.cli       the CLI as a subprocess (run_cli, start_cli, cli_env) and reading a run's
                      files (jsonl, manifest), wait_until, expected_kept
    harness.cluster   a Ray cluster of several nodes on this machine (local_cluster), and what
                      tests ask of it: live actors, a run's commits and events, stopping by pid
    harness.s3        moto's S3 server on loopback (MotoServer) and a fault-injecting proxy
    harness.campaign  the seeded fault campaign (`python -m harness.campaign`, `make campaign`)

tests/conftest.py holds the pytest fixtures built on these, and the suite's guard that no server
it started outlives it.
"""
