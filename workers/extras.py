"""Extra files a checkpoint carries beside the state (a tokenizer, a config): what
`session.report(..., extra_files=...)` takes, and what `session.restore()` gives back.

    report(..., extra_files="out/tokenizer")                 # a directory: every file under it
    report(..., extra_files={"config.json": "out/cfg.json",  # {name in the checkpoint: a file
                             "tokenizer": "out/tok"})        #  or a directory}

Rank 0's are the ones that count. They are copied aside when report() is called (so the
caller may change or delete them right after) and written in the background by the same
writer as the state, under `extras/<name>` in the checkpoint's directory, each listed in its
checkpoint.json with its size and sha256 before the coordinator commits it: verify, restore,
`orchestrator verify`, `best --download` and `export` check them like the weights. On restore
they are written, verified, into a local directory whose path `restore()` hands back as
state["extra_files"].
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Mapping
from typing import Any

from orchestrator.core.manifest import EXTRAS_DIR
from orchestrator.core.verify import inside

# The key under which restore() hands back the directory of a checkpoint's extra files; a
# state passed to report() may not use it.
STATE_KEY = "extra_files"


class ExtraFilesError(ValueError):
    """report(extra_files=...) names something that cannot be carried: said with the file."""


def resolve(extra_files: Any) -> dict[str, str]:
    """{name in the checkpoint: local file} for what report() was given (None: nothing)."""
    if extra_files is None:
        return {}
    if isinstance(extra_files, (str, os.PathLike)):
        path = os.fspath(extra_files)
        if not os.path.isdir(path):
            what = "a file" if os.path.exists(path) else "no such directory"
            raise ExtraFilesError(
                f"extra_files {path!r}: {what}; pass a directory, or {{name: path}} for single files"
            )
        return _walk(path, "")
    if not isinstance(extra_files, Mapping):
        raise ExtraFilesError(
            f"extra_files: a directory or a {{name: path}} mapping, not a {type(extra_files).__name__}"
        )
    out: dict[str, str] = {}
    for name, path in extra_files.items():
        name = _checked_name(name)
        if not isinstance(path, (str, os.PathLike)):
            raise ExtraFilesError(f"extra_files[{name!r}]: a path, not a {type(path).__name__}")
        path = os.fspath(path)
        if os.path.isdir(path):
            found = _walk(path, name + "/")
        elif os.path.isfile(path):
            found = {name: path}
        else:
            what = "not a regular file" if os.path.exists(path) else "no such file or directory"
            raise ExtraFilesError(f"extra_files[{name!r}]: {path}: {what}")
        if clash := sorted(set(found) & set(out)):
            raise ExtraFilesError(f"extra_files: {clash[0]!r} is named twice")
        out.update(found)
    return out


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ExtraFilesError(f"extra_files: a name must be a non-empty string, not {name!r}")
    norm = os.path.normpath(name).replace(os.sep, "/")
    if os.path.isabs(name) or norm == ".." or norm.startswith("../") or norm != name.rstrip("/"):
        raise ExtraFilesError(
            f"extra_files: name {name!r}: a relative path inside the checkpoint (no '..', no leading "
            "'/', no './')"
        )
    return norm


def _walk(root: str, prefix: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for here, dirs, files in os.walk(root, onerror=_raise):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(here, f)
            try:
                mode = os.stat(path).st_mode
            except OSError as e:  # a dangling symlink: an input error, named, not a crash of rank 0
                raise ExtraFilesError(f"extra_files: {path}: {e.strerror or e}") from None
            if not stat.S_ISREG(mode):
                raise ExtraFilesError(f"extra_files: {path}: not a regular file")
            out[prefix + os.path.relpath(path, root).replace(os.sep, "/")] = path
    return out


def _raise(e: OSError) -> None:
    raise ExtraFilesError(f"extra_files: {e.filename}: {e.strerror or e}")


def snapshot(files: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Copy files aside (the writer uploads them later, in the background): the directory of
    the copies and {record path (extras/<name>): copy}."""
    where = tempfile.mkdtemp(prefix="orchestrator-extras-")
    out: dict[str, str] = {}
    try:
        for name, src in files.items():
            dst = os.path.join(where, *name.split("/"))
            try:  # a name under another's file ({"a": f, "a/b": g}) fails here: named, too
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                shutil.copyfile(src, dst)
            except OSError as e:
                raise ExtraFilesError(f"extra_files[{name!r}]: {src}: {e.strerror or e}") from None
            out[f"{EXTRAS_DIR}/{name}"] = dst
    except BaseException:
        shutil.rmtree(where, ignore_errors=True)
        raise
    return where, out


def discard(extras: tuple[str, dict[str, str]] | None) -> None:
    """Remove a snapshot that will not be written."""
    if extras is not None:
        shutil.rmtree(extras[0], ignore_errors=True)


def write_restored(blobs: dict[str, bytes], cid: str, rank: int) -> str | None:
    """A restored checkpoint's extra files (verified bytes, by record path) written into a new
    local directory, whose path is returned; None when the checkpoint has none."""
    extras = {p[len(EXTRAS_DIR) + 1 :]: data for p, data in blobs.items() if p.startswith(EXTRAS_DIR + "/")}
    if not extras:
        return None
    where = tempfile.mkdtemp(prefix=f"orchestrator-{cid}-r{rank}-extras-")
    for name, data in extras.items():
        if (dst := inside(where, name)) is None:  # a record written by someone else
            raise ExtraFilesError(f"checkpoint {cid}: extra file {name!r} points outside its directory")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(data)
    return where
