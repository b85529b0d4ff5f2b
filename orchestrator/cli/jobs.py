"""Submitting runs to a Ray cluster through the Jobs API, and following them.

    orchestrator submit configs/digits.yaml --address http://HEAD:8265 [--max-retries 2]
    orchestrator status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID | list

`submit` validates the spec here (a bad spec fails before the cluster is contacted),
then ships the resolved spec to the cluster in the job's runtime_env (an environment
variable; with --working-dir, or a task given as path/to/file.py:function, that
directory is uploaded too and becomes the job's working directory). The job's
entrypoint is `orchestrator _supervise`, which writes the spec to a file and runs
`orchestrator run` on it.

Ray's Jobs API has no job-level retry, so --max-retries lives in that supervisor:
when the driver process dies (killed by a signal, or exits non-zero) it runs
`orchestrator resume RUN_URI` instead, up to N times, which continues from the
latest committed checkpoint. Bad input (exit 2) and a run owned by another live
driver (exit 3) are not retried, and neither is a job stopped with `orchestrator stop`.

Secrets in storage.options are not shipped (the Jobs API shows a job's runtime_env
to anybody who can read the dashboard): the cluster must get credentials from its
environment (e.g. AWS_* variables or an instance role).

Exit codes (besides those of `orchestrator run`): 2 bad input or unknown job,
5 the Jobs API cannot be reached or refused the request.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import typer
import yaml

from orchestrator.cli.exits import EXIT_API, EXIT_INPUT, EXIT_LEASE, die, parse_options

log = logging.getLogger(__name__)

SPEC_ENV = "ORCHESTRATOR_SPEC_YAML"
META_URI, META_RUN, META_RETRIES = "orchestrator_run_uri", "orchestrator_run", "orchestrator_max_retries"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NOT_RETRIED = {EXIT_INPUT, EXIT_LEASE}
# The Jobs API answers "No available agent to submit job" while the head's dashboard agent (the
# process that starts job drivers) has not registered yet, seconds after `ray start --head`.
AGENT_WAIT_S = 30.0
NO_AGENT = "No available agent"

ADDRESS_HELP = (
    "Ray Jobs API (dashboard) URL; default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS when "
    "it is http(s)://, else http://127.0.0.1:8265 (a `ray start --head` on this machine)."
)


# -- talking to the Jobs API ----------------------------------------------------------
def default_address(address: str | None = None) -> str:
    if address:
        return address if "://" in address else f"http://{address}"
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        v = os.environ.get(var, "")
        if v.startswith(("http://", "https://")):
            return v
    return "http://127.0.0.1:8265"  # the dashboard of a `ray start --head` on this machine


def client(address: str | None) -> Any:
    """A JobSubmissionClient for address (exits 5 with a clear message when unreachable)."""
    from orchestrator.ray_compat import use_token_auth

    use_token_auth()  # `ray start --head` in Ray 2.60 turns token auth on
    from ray.job_submission import JobSubmissionClient

    url = default_address(address)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # ConnectionError, requests errors, version mismatch
        die(f"cannot reach the Ray Jobs API at {url}: {type(e).__name__}: {e}", EXIT_API)


def _api(call: Any, *args: Any, what: str) -> Any:
    try:
        return call(*args)
    except RuntimeError as e:
        msg = str(e)
        die(f"{what}: {msg}", EXIT_INPUT if "does not exist" in msg or "404" in msg else EXIT_API)
    except Exception as e:
        die(f"{what}: {type(e).__name__}: {e}", EXIT_API)


def _submit_when_agent_up(c: Any, **job: Any) -> str:
    """c.submit_job(**job), retried for AGENT_WAIT_S while the head's job agent is not up."""
    import tenacity

    def waiting(state: tenacity.RetryCallState) -> None:
        if state.attempt_number == 1:
            wait = f"{AGENT_WAIT_S:.0f}s"
            typer.echo(f"[submit] the head's job agent is not up yet; retrying for up to {wait}", err=True)

    try:
        return str(
            tenacity.Retrying(
                stop=tenacity.stop_after_delay(AGENT_WAIT_S),
                wait=tenacity.wait_fixed(2),
                retry=tenacity.retry_if_exception(lambda e: NO_AGENT in str(e)),
                before_sleep=waiting,
                reraise=True,
            )(c.submit_job, **job)
        )
    except RuntimeError as e:
        if NO_AGENT not in str(e):
            raise
        raise RuntimeError(
            f"the Ray head's dashboard agent, which starts submitted jobs, did not come up within "
            f"{AGENT_WAIT_S:.0f}s (Ray: {NO_AGENT}). See dashboard_agent.log in the head's Ray log "
            f"directory (/tmp/ray/session_latest/logs by default): a port conflict on "
            f"--dashboard-agent-listen-port (default 52365) leaves the agent running without its "
            f"HTTP server; restart the head with a free port."
        ) from e


def _job_row(info: Any) -> dict[str, Any]:
    meta = dict(info.metadata or {})
    return {
        "job_id": info.submission_id or info.job_id,
        "ray_job_id": info.job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message,
        "run": meta.get(META_RUN),
        "run_uri": meta.get(META_URI),
        "max_retries": int(meta.get(META_RETRIES, 0) or 0),
        "entrypoint": info.entrypoint,
        "start_time": info.start_time / 1000 if info.start_time else None,
        "end_time": info.end_time / 1000 if info.end_time else None,
        "driver_exit_code": getattr(info, "driver_exit_code", None),
    }


def _progress(run_uri: str | None) -> dict[str, Any] | None:
    """What the run's manifest says, when the run is on a local path readable from here
    (remote storage needs its options: `orchestrator checkpoints RUN_URI`)."""
    if not run_uri or ("://" in run_uri and not run_uri.startswith("file://")):
        return None
    try:
        from orchestrator.core.manifest import METRICS, read_jsonl, read_manifest
        from orchestrator.core.storage import Storage

        storage = Storage(run_uri, {})
        m = read_manifest(storage)
        if m is None:
            return None
        rows = read_jsonl(storage, METRICS)
        latest = m.latest()
        return {
            "status": m.status,
            "attempts": m.attempts,
            "restarts": m.restarts,
            "checkpoints": len(m.checkpoints),
            "latest_epoch": latest.epoch if latest else None,
            "last_metrics": rows[-1] if rows else None,
        }
    except Exception:
        return None


# -- what gets shipped ---------------------------------------------------------------
def _shipped_spec(spec: Any, working_dir: str | None) -> tuple[dict[str, Any], str | None, list[str]]:
    """The spec as the cluster will run it, the working dir to upload, and warnings."""
    from orchestrator.core.storage import redact_options
    from orchestrator.core.tasks import BUILTIN_TASKS

    warnings: list[str] = []
    data = spec.model_dump(mode="json")
    dropped: list[str] = []

    def drop(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in node.items():
            if v == "***":
                dropped.append(prefix + str(k))
            else:
                out[k] = drop(v, f"{prefix}{k}.") if isinstance(v, dict) else v
        return out

    data["storage"]["options"] = drop(redact_options(spec.storage.options), "")
    if dropped:
        warnings.append(
            f"storage.options {', '.join(dropped)} not shipped (secrets): the cluster "
            "must have these credentials in its environment"
        )
    task = spec.task.name
    module, _, func = BUILTIN_TASKS.get(task, task).rpartition(":")
    wd = os.path.abspath(working_dir) if working_dir else None
    if module.endswith(".py"):
        path = Path(module).resolve()
        if wd is None:
            wd = os.getcwd()
        try:
            rel = path.relative_to(wd)
        except ValueError:
            raise ValueError(
                f"task {task!r}: {path} is not inside the working dir {wd}; "
                "pass --working-dir with a directory that holds it"
            ) from None
        data["task"]["name"] = f"{rel.as_posix()}:{func}"
    if wd is not None and not os.path.isdir(wd):
        raise ValueError(f"--working-dir {working_dir}: not a directory")
    return data, wd, warnings


def _storage_option_args(options: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for k, v in options.items():
        out += ["--storage-option", f"{k}={json.dumps(v)}"]
    return out


# -- commands ------------------------------------------------------------------------
def _job_of(
    spec: Any, data: dict[str, Any], wd: str | None, max_retries: int, verbose: bool
) -> tuple[dict[str, Any], list[str]]:
    """The job's runtime_env (the shipped spec, the working dir) and its entrypoint: the
    supervisor, which runs `orchestrator run` and reruns it as `resume` up to max_retries."""
    # `orchestrator stop` (Ray's job stop) sends the driver SIGTERM, then SIGKILL after
    # RAY_JOB_STOP_WAIT_TIME_S (Ray's default: 3 s): give the driver its stop grace to save.
    stop_wait = str(int(spec.failure.stop_grace_s) + 30)
    runtime_env: dict[str, Any] = {
        "env_vars": {SPEC_ENV: yaml.safe_dump(data, sort_keys=False), "RAY_JOB_STOP_WAIT_TIME_S": stop_wait}
    }
    if wd:
        runtime_env["working_dir"] = wd
    entry = [
        "orchestrator",
        "_supervise",
        "--max-retries",
        str(max_retries),
        "--run-uri",
        spec.run_uri,
        *_storage_option_args(data["storage"]["options"]),
    ]
    if verbose:
        entry.append("--verbose")
    return runtime_env, entry


def submit(
    config: str = typer.Argument(..., help="Job spec YAML, e.g. configs/digits.yaml."),
    address: str = typer.Option(None, help=ADDRESS_HELP),
    set_: list[str] = typer.Option(
        None, "--set", help="Override a spec field: --set epochs=20 (repeatable; values are YAML)."
    ),
    max_retries: int = typer.Option(
        0,
        min=0,
        help="Rerun the driver up to N times when it dies "
        "(signal or non-zero exit), each time with `orchestrator resume "
        "RUN_URI`: it continues from the latest committed checkpoint. "
        "Bad input (2), a run owned by another driver (3) and `stop` "
        "are not retried.",
    ),
    working_dir: str = typer.Option(
        None,
        help="Directory uploaded as the job's working dir (needed "
        "for a task given as path/to/file.py:function; default then: "
        "the current directory).",
    ),
    submission_id: str = typer.Option(None, help="Job id to use (default orchestrator-<name>-<random>)."),
    verbose: bool = typer.Option(False, help="The driver also streams Ray's and the workers' logs."),
    as_json: bool = typer.Option(False, "--json", help="Print job id, RUN_URI and address as JSON."),
) -> None:
    """Submit a run to a Ray cluster through the Jobs API; print its job id and RUN_URI.

    The spec is validated here first (a bad one exits 2 without contacting the cluster), then
    shipped, with --set applied and secret storage options left out, in the job's runtime_env;
    the job runs `orchestrator run` on it on the head. With --max-retries N the job reruns its
    driver as `orchestrator resume RUN_URI` when the driver dies, up to N times.
    """
    from orchestrator.spec import SpecError, load_spec, parse_spec

    try:
        spec = load_spec(config, set_ or [])
        data, wd, warnings = _shipped_spec(spec, working_dir)
        parse_spec(data, source=f"{config} (as shipped)", check_task=False)
    except (SpecError, ValueError) as e:
        die(str(e), EXIT_INPUT)
    for w in warnings:
        typer.echo(f"warning: {w}", err=True)
    runtime_env, entry = _job_of(spec, data, wd, max_retries, verbose)
    sid = submission_id or f"orchestrator-{spec.name}-{uuid.uuid4().hex[:8]}"
    c = client(address)
    job_id = _api(
        lambda: _submit_when_agent_up(
            c,
            entrypoint=shlex.join(entry),
            runtime_env=runtime_env,
            submission_id=sid,
            metadata={META_URI: spec.run_uri, META_RUN: spec.name, META_RETRIES: str(max_retries)},
        ),
        what="submit",
    )
    url = default_address(address)
    if as_json:
        out = {
            "job_id": job_id,
            "run_uri": spec.run_uri,
            "run": spec.name,
            "address": url,
            "max_retries": max_retries,
        }
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"[submit] job {job_id}")
    typer.echo(f"[submit] RUN_URI {spec.run_uri}")
    typer.echo(
        f"follow: orchestrator logs {job_id} --follow --address {url}\n"
        f"        orchestrator status {job_id} --address {url}\n"
        f"        orchestrator checkpoints {spec.run_uri}"
    )


def status(
    job_id: str = typer.Argument(..., help="Job id printed by `submit`."),
    address: str = typer.Option(None, help=ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """A submitted job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and its run's progress."""
    c = client(address)
    row = _job_row(_api(c.get_job_info, job_id, what=f"job {job_id}"))
    row["progress"] = _progress(row["run_uri"])
    if as_json:
        typer.echo(json.dumps(row, indent=2, sort_keys=True))
        return
    typer.echo(f"{row['job_id']}  {row['status']}  run {row['run']}  {row['run_uri']}")
    if row["message"]:
        typer.echo(f"  {row['message']}")
    p = row["progress"]
    if p:
        typer.echo(
            f"  run {p['status']}: {p['checkpoints']} checkpoint(s), latest epoch "
            f"{p['latest_epoch']}, {p['attempts']} attempt(s), {p['restarts']} restart(s)"
        )


def logs(
    job_id: str = typer.Argument(..., help="Job id printed by `submit`."),
    address: str = typer.Option(None, help=ADDRESS_HELP),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
) -> None:
    """The job's driver output (progress lines, the final summary)."""
    c = client(address)
    if not follow:
        typer.echo(_api(c.get_job_logs, job_id, what=f"job {job_id}"), nl=False)
        return
    import asyncio
    import logging

    _api(c.get_job_info, job_id, what=f"job {job_id}")  # a clear error for an unknown id
    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as e:  # the stream closed before the job ended
        die(f"job {job_id}: log stream ended: {type(e).__name__}: {e}", EXIT_API)


def stop(
    job_id: str = typer.Argument(..., help="Job id printed by `submit`."),
    address: str = typer.Option(None, help=ADDRESS_HELP),
    wait: float = typer.Option(30.0, help="Seconds to wait for the job to end (0: do not wait)."),
) -> None:
    """Stop a submitted job (its driver gets SIGTERM, then SIGKILL); it is not retried."""
    c = client(address)
    stopped = _api(c.stop_job, job_id, what=f"job {job_id}")
    state = "stopping" if stopped else "was not running"
    deadline = time.monotonic() + wait
    while stopped and time.monotonic() < deadline:
        info = _api(c.get_job_info, job_id, what=f"job {job_id}")
        state = str(getattr(info.status, "value", info.status))
        if state in TERMINAL:
            break
        time.sleep(1)
    typer.echo(f"{job_id}: {state}")


def list_jobs(
    address: str = typer.Option(None, help=ADDRESS_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """This tool's jobs on the cluster (others' jobs are left out), oldest first."""
    c = client(address)
    rows = [_job_row(j) for j in _api(c.list_jobs, what="list jobs") if META_URI in (j.metadata or {})]
    rows.sort(key=lambda r: r["start_time"] or 0)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    typer.echo(f"{'job id':<36} {'status':<10} {'started':<19} run_uri")
    for r in rows:
        ts = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["start_time"])) if r["start_time"] else "-"
        typer.echo(f"{r['job_id']:<36} {r['status']:<10} {ts:<19} {r['run_uri']}")


# -- the job's entrypoint --------------------------------------------------------------
def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exited with {rc}"


def supervise(
    max_retries: int = typer.Option(0, min=0, help="Resumes after the driver dies."),
    run_uri: str = typer.Option(..., help="The run (storage root + name) to resume."),
    storage_option: list[str] = typer.Option(None, help="fsspec option for RUN_URI (repeatable)."),
    retry_delay: float = typer.Option(
        5.0, help="Seconds before a resume (lets Ray clean up the dead driver's actors)."
    ),
    verbose: bool = typer.Option(False, help="Pass --verbose to the driver."),
) -> None:
    """Job entrypoint: run the shipped spec; on driver death resume it, up to N times."""
    text = os.environ.get(SPEC_ENV)
    if not text:
        die(f"no spec in ${SPEC_ENV}; this command is the entrypoint of `orchestrator submit`", EXIT_INPUT)
    tmp = tempfile.mkdtemp(prefix="orchestrator-job-")
    spec_file = os.path.join(tmp, "spec.yaml")
    # A file task, relative to the uploaded working dir (the job's cwd), is made absolute
    # when `orchestrator run` loads this spec.
    Path(spec_file).write_text(text)
    base = [sys.executable, "-m", "orchestrator"]
    opts = [a for o in storage_option or [] for a in ("--storage-option", o)]
    extra = ["--verbose"] if verbose else []
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True  # `orchestrator stop` / the Jobs API: end, do not retry
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cmd = [*base, "run", spec_file, *extra]
    rc = 1
    try:
        for attempt in range(max_retries + 1):
            log.info(f"[supervise] {'starting' if attempt == 0 else 'resuming'}: {shlex.join(cmd[2:])}")
            child = subprocess.Popen(cmd)
            rc = child.wait()
            if rc == 0 or stopping or rc in NOT_RETRIED:
                break
            if attempt == max_retries:
                log.info(f"[supervise] driver {_describe(rc)}; no retries left ({max_retries})")
                break
            log.info(
                f"[supervise] driver {_describe(rc)}; resuming {run_uri} "
                f"(retry {attempt + 1}/{max_retries}) in {retry_delay:g}s"
            )
            time.sleep(retry_delay)
            if stopping:
                break
            # Resume from the run's stored spec once the run exists in storage; a driver
            # that died before storing it is simply started again.
            cmd = (
                [*base, "resume", run_uri, *opts, *extra]
                if _run_stored(run_uri, storage_option)
                else [*base, "run", spec_file, *extra]
            )
    finally:
        Path(spec_file).unlink(missing_ok=True)
        os.rmdir(tmp)
    raise typer.Exit(rc if rc >= 0 else 128 - rc)


def _run_stored(run_uri: str, storage_option: list[str] | None) -> bool:
    try:
        from orchestrator.core.manifest import SPEC
        from orchestrator.core.storage import Storage

        return bool(Storage(run_uri, parse_options(storage_option)).exists(SPEC))
    except Exception:
        return False


def register(app: typer.Typer) -> None:
    """Add the job commands (submit, status, logs, stop, list) to the CLI."""
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("logs")(logs)
    app.command("stop")(stop)
    app.command("list")(list_jobs)
    app.command("_supervise", hidden=True)(supervise)
