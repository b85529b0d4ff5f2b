"""Serving: `export` writes a checkpoint in a format a server reads without this package."""

from __future__ import annotations

import json

import typer

from orchestrator.cli.exits import (
    EXIT_INPUT,
    EXIT_STORAGE,
    OPT_HELP,
    die,
    local_error,
    parse_options,
    stdout_to_stderr,
)
from orchestrator.core.manifest import ManifestError
from orchestrator.core.storage import StorageError
from orchestrator.core.tasks import TaskError
from orchestrator.core.verify import VerificationError


def export(
    run_uri: str = typer.Argument(..., help="Storage root + run name."),
    out: str = typer.Option(..., "--out", help="Directory to write the export and config.json into."),
    fmt: str = typer.Option(
        "safetensors", "--format", help="safetensors (weights; no task import), torchscript or onnx."
    ),
    checkpoint: str = typer.Option("best", help="best, latest, or a checkpoint id."),
    as_json: bool = typer.Option(False, "--json", help="Print config.json's content."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Export a checkpoint (verified) for serving, with a config.json that says what it is.

    safetensors loads with safetensors.torch.load_file and the task's model constructor, with
    no orchestrator installed; torchscript (torch.jit.load) and onnx (onnxruntime) hold the
    model traced on one validation batch, so they import the task to build it."""
    from orchestrator.api import NoCheckpoint, Run, RunNotFound
    from orchestrator.export import FORMATS
    from orchestrator.export import export as do_export

    if fmt not in FORMATS:
        die(f"--format {fmt!r}: one of {', '.join(FORMATS)}", EXIT_INPUT)
    try:
        run = Run(run_uri, parse_options(storage_option))
        with stdout_to_stderr(as_json):
            config = do_export(run, out, fmt, checkpoint)
    except (RunNotFound, NoCheckpoint, VerificationError):
        raise  # to the one handler: exit 2, 1, 1
    except TaskError as e:
        die(f"{fmt} export builds the task's model: {e}", EXIT_INPUT)
    except (StorageError, ManifestError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    except ImportError as e:
        die(f"{fmt} export needs {e.name}: pip install 'ray-orchestrator[onnx]'", EXIT_INPUT)
    except OSError as e:
        local_error(e, out, "--out", run_uri)
    for s in config["skipped"]:
        typer.echo(
            f"warning: {s['id']} failed verification ({s['reason']}); exported the next best", err=True
        )
    if as_json:
        typer.echo(json.dumps(config, indent=2))
        return
    typer.echo(
        f"exported {config['checkpoint']} (epoch {config['epoch']}, {config['monitor']} "
        f"{config['metrics'].get(config['monitor'])}) as {fmt} to {out}/{config['file']} (+ config.json)"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export)
