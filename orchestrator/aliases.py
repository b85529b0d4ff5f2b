"""Aliases: a name under a storage root that points at one verified checkpoint of one run.

    ROOT/aliases/NAME.json   {"name", "run_uri", "checkpoint", "epoch", "metrics", "files"
                              (path -> sha256), "record_sha256", "promoted_by", "promoted_at",
                              "previous" (what it pointed at before, or null)}

`orchestrator promote RUN_URI --as NAME` writes one; the Serve app (deploy/serve/app.py,
`alias=NAME root=ROOT`) follows it, so serving a better model from another run is one
promote, no redeploy. An alias is written by compare-and-swap (Storage.write_if, as the
manifest and the lease are): a promote reads the alias's version, verifies the checkpoint,
then writes only if the alias is still that version. Two promotes racing never lose one
silently: the second fails with AliasConflict, naming what the alias now points at.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.api import Checkpoint, Run, weight_files
from orchestrator.core.errors import InputError, OrchestratorError
from orchestrator.core.storage import Conflict, Storage
from orchestrator.core.verify import VerificationError, copy_verified

ALIASES = "aliases"  # the directory under the storage root
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AliasError(InputError):
    """A bad alias name, an alias that does not exist, or a checkpoint that cannot be promoted."""


class AliasConflict(OrchestratorError):
    """Another promote changed the alias between this one's read and its write."""


@dataclass(frozen=True)
class Alias:
    name: str
    run_uri: str
    checkpoint: str
    epoch: int
    metrics: dict[str, float]
    files: dict[str, str]  # path -> sha256, as the checkpoint's record holds them
    record_sha256: str  # of the record (canonical JSON): the checkpoint exactly as promoted
    promoted_by: str
    promoted_at: float
    previous: dict[str, str] | None = None  # {"run_uri", "checkpoint"} it pointed at before

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.promoted_at))
        return f"{self.run_uri} checkpoint {self.checkpoint} (promoted by {self.promoted_by} at {when})"

    def matches(self, ck: Checkpoint) -> bool:
        """Is ck the checkpoint this alias was promoted with (same record, same files)?"""
        return ck.id == self.checkpoint and record_digest(ck) == self.record_sha256


def record_digest(ck: Checkpoint) -> str:
    body = json.dumps(ck.record.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AliasError(
            f"alias name {name!r}: use letters, digits, '.', '_' or '-' "
            "(up to 64, not starting with '.', '_' or '-')"
        )
    return name


def root_of(run_uri: str) -> str:
    """The storage root a run lives under (RUN_URI = root + run name)."""
    uri = run_uri.rstrip("/")
    if "/" not in uri.split("://", 1)[-1]:
        raise AliasError(f"{run_uri}: not a storage root + run name; aliases live under the root")
    return uri.rsplit("/", 1)[0]


def _path(name: str) -> str:
    return f"{ALIASES}/{check_name(name)}.json"


def _parse(name: str, data: bytes) -> Alias:
    try:
        return Alias(**json.loads(data))
    except (ValueError, TypeError) as e:
        raise AliasError(f"alias {name!r}: {ALIASES}/{name}.json is not an alias record: {e}") from None


def read_alias(root: Storage, name: str) -> tuple[Alias, str] | None:
    """The alias NAME under root with its stored version, or None when there is none."""
    found = root.read_versioned(_path(name))
    return None if found is None else (_parse(name, found.data), found.version)


def resolve(root: Storage, name: str) -> Alias:
    found = read_alias(root, name)
    if found is None:
        raise AliasError(
            f"alias {name!r}: none under {root.uri}; promote a checkpoint first: "
            f"orchestrator promote RUN_URI --as {name}"
        )
    return found[0]


def list_aliases(root: Storage) -> list[Alias]:
    """Every alias under root, by name (the CAS lock files and temp files are not aliases)."""
    names = [n[: -len(".json")] for n in root.list_sizes(ALIASES) if n.endswith(".json") and "/" not in n]
    out = []
    for n in sorted(names):
        if _NAME.match(n) and (found := read_alias(root, n)) is not None:
            out.append(found[0])
    return out


@dataclass
class Promotion:
    """A promote between its read and its write: the checkpoint verified, the alias's version
    seen. commit() writes only if the alias is still that version."""

    root: Storage
    alias: Alias
    expect: str | None  # the version read (None: no alias yet)
    skipped: list[dict[str, str]]

    def commit(self) -> Alias:
        body = json.dumps(asdict(self.alias), indent=1).encode()
        try:
            self.root.write_if(_path(self.alias.name), body, self.expect)
        except Conflict:
            now = read_alias(self.root, self.alias.name)
            target = now[0].describe() if now else "nothing (it was removed)"
            raise AliasConflict(
                f"alias {self.alias.name!r} under {self.root.uri} was changed by another promote "
                f"while this one ran: it now points at {target}; nothing was written. Check it "
                "with `orchestrator aliases ROOT` and promote again if yours should win"
            ) from None
        return self.alias


def prepare(run: Run, name: str, checkpoint: str | None = None, by: str | None = None) -> Promotion:
    """Read the alias's version, then verify the checkpoint (the run's best that verifies, or
    the one named): nothing is written yet (Promotion.commit)."""
    root = Storage(root_of(run.uri), run.storage.options)
    current = read_alias(root, check_name(name))
    skipped: list[dict[str, str]] = []
    if checkpoint is None or checkpoint == "best":
        found = run.verified_best(1, only=weight_files)
        ck, skipped = found.checkpoint, found.skipped
    else:
        ck = run.checkpoint(checkpoint)
        try:
            copy_verified(run.storage, ck.record, None, weight_files(ck.record))
        except VerificationError as e:
            raise AliasError(
                f"checkpoint {ck.id} of {run.uri} failed verification, not promoted to {name!r}: {e}"
            ) from None
    alias = Alias(
        name=name,
        run_uri=run.uri,
        checkpoint=ck.id,
        epoch=ck.epoch,
        metrics=dict(ck.metrics),
        files={f.path: f.sha256 for f in ck.record.files},
        record_sha256=record_digest(ck),
        promoted_by=by or f"{getpass.getuser()}@{socket.gethostname()}",
        promoted_at=time.time(),
        previous=None
        if current is None
        else {"run_uri": current[0].run_uri, "checkpoint": current[0].checkpoint},
    )
    return Promotion(root, alias, None if current is None else current[1], skipped)


def promote(run: Run, name: str, checkpoint: str | None = None) -> Promotion:
    """Point alias NAME (under the run's storage root) at a verified checkpoint of run."""
    p = prepare(run, name, checkpoint)
    p.commit()
    return p


def as_dict(a: Alias, root: str | None = None) -> dict[str, Any]:
    return {**asdict(a), **({"root": root} if root else {})}


class Follower:
    """What a server that follows alias NAME reads each poll: the alias file alone."""

    def __init__(self, root: str, name: str, options: dict[str, Any] | None = None) -> None:
        self.root = Storage(root, options or {})
        self.name = check_name(name)

    def read(self) -> tuple[Alias, str]:
        """The alias and its version (AliasError when it is gone)."""
        found = read_alias(self.root, self.name)
        return found if found is not None else (resolve(self.root, self.name), "")  # resolve raises
