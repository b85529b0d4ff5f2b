"""`repair`: a run whose manifest.json cannot be read gets a readable one again."""

from __future__ import annotations

import json

import typer

from orchestrator.cli.exits import (
    EXIT_INPUT,
    EXIT_LEASE,
    EXIT_STORAGE,
    OPT_HELP,
    die,
    parse_options,
)
from orchestrator.core.lease import LeaseHeld
from orchestrator.core.manifest import BACKUP, MANIFEST, ManifestError
from orchestrator.core.repair import Report, repair
from orchestrator.core.storage import Storage, StorageError


def repair_cmd(
    run_uri: str = typer.Argument(..., help="Storage root + run name, e.g. runs/digits."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show what would be restored; write nothing."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    storage_option: list[str] = typer.Option(None, help=OPT_HELP),
) -> None:
    """Restore a run's manifest.json when it cannot be read (damaged, edited by hand, deleted).

    The coordinator keeps a copy of every manifest it writes in manifest.backup.json. repair
    restores it, after checking it against storage: each checkpoint it names is verified
    against its record (sizes, sha256) and one that fails is listed as bad, never restored as
    committed; a complete checkpoint of the run's last attempt that the copy does not name
    (committed just after the copy was written) is adopted. The unreadable file is kept as
    manifest.damaged.json, and nothing is deleted. A run with a live driver is refused.

    A readable manifest.json is left alone (exit 0). Then `orchestrator resume RUN_URI`
    continues the run.

    Exit codes: 0 repaired or nothing to do, 1 cannot repair (no readable backup),
    2 not a run, 3 a live driver owns the run, 4 storage unreachable."""
    try:
        storage = Storage(run_uri, parse_options(storage_option))
        report = repair(storage, dry_run=dry_run)
    except LeaseHeld as e:  # NotARun (2) and RepairError (1) go to the one handler
        die(f"{e}\nrepair changes the manifest only while no driver runs", EXIT_LEASE)
    except ManifestError as e:  # a manifest of a newer format: never overwritten (bad input, not storage)
        die(str(e), EXIT_INPUT)
    except (StorageError, OSError) as e:
        die(f"{run_uri}: {e}", EXIT_STORAGE)
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
        return
    _print(report)


def _print(r: Report) -> None:
    if r.action == "none":
        typer.echo(f"{r.run_uri}/{MANIFEST} is readable (generation {r.generation}); nothing to repair")
        return
    would = "would " if r.dry_run else ""
    typer.echo(f"{r.problem}")
    typer.echo(f"{would}restore generation {r.backup_generation} from {BACKUP}, checked against storage:")
    for cid in r.verified:
        typer.echo(f"  verified   {cid}")
    for b in r.bad:
        typer.echo(f"  bad        {b['id']}: {b['reason']} (listed as bad, not restored)")
    for cid in r.adopted:
        typer.echo(f"  adopted    {cid}: complete and verified, not named by the backup (committed after it)")
    for x in r.left_out:
        typer.echo(f"  left out   {x['id']}: {x['reason']}")
    n = len(r.verified) + len(r.adopted)
    if r.dry_run:
        typer.echo(f"would write {MANIFEST} generation {r.generation} ({n} checkpoint(s)); nothing written")
        return
    typer.echo(
        f"wrote {MANIFEST} generation {r.generation} ({n} checkpoint(s)); the unreadable file is kept "
        f"as {r.damaged_copy}. Continue with: orchestrator resume {r.run_uri}"
    )


def register(app: typer.Typer) -> None:
    app.command("repair")(repair_cmd)
