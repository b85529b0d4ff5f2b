"""Aliases: `promote RUN_URI --as NAME` points a name under the storage root at a verified
checkpoint, written by compare-and-swap; `aliases ROOT` lists them. Runs are hand-made
(real DigitsCNN weights committed through the real RunLedger, test_export.make_run) on a
temp dir and on moto's S3 server. Serving that follows an alias: tests/test_serve.py."""

from __future__ import annotations

import json

import pytest
from test_export import make_run

from harness.cli import cli_env, run_cli
from orchestrator import aliases
from orchestrator.api import NoCheckpoint, open_run
from orchestrator.core.storage import Storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A storage root holding run a (best: epoch 2) and run b (best: epoch 1)."""
    if request.param == "local":
        uri = str(tmp_path / "runs")
    else:
        request.getfixturevalue("s3_env")
        uri = f"s3://{request.getfixturevalue('bucket')}/runs"
    make_run(Storage(f"{uri}/a"), [0.9, 0.2, 0.5])
    make_run(Storage(f"{uri}/b"), [0.1, 0.3])
    return uri


def test_promote_points_the_alias_at_the_verified_best_and_lists_it(root: str) -> None:
    p = aliases.promote(open_run(f"{root}/a"), "prod")
    top = Storage(root)
    stored = json.loads(top.read_bytes("aliases/prod.json"))
    assert stored["run_uri"] == f"{root}/a" and stored["checkpoint"] == "epoch0002-step0000002-a1"
    ck = open_run(f"{root}/a").checkpoint("epoch0002-step0000002-a1")
    assert stored["files"] == {"model.pt": ck.record.files[0].sha256}
    assert stored["record_sha256"] == aliases.record_digest(ck) and stored["previous"] is None
    assert "@" in stored["promoted_by"] and stored["promoted_at"] > 0
    assert p.alias.matches(ck)

    aliases.promote(open_run(f"{root}/b"), "prod", checkpoint="epoch0002-step0000002-a1")
    aliases.promote(open_run(f"{root}/b"), "canary")
    listed = aliases.list_aliases(top)
    assert [(a.name, a.run_uri, a.checkpoint) for a in listed] == [
        ("canary", f"{root}/b", "epoch0001-step0000001-a1"),
        ("prod", f"{root}/b", "epoch0002-step0000002-a1"),
    ]
    assert listed[1].previous == {"run_uri": f"{root}/a", "checkpoint": "epoch0002-step0000002-a1"}


def test_two_promotes_racing_one_loses_naming_the_alias_and_its_target(root: str) -> None:
    # Both read the alias (absent) and verify, then write: the second write must not land.
    first = aliases.prepare(open_run(f"{root}/a"), "prod", by="alice@h1")
    second = aliases.prepare(open_run(f"{root}/b"), "prod", by="bob@h2")
    first.commit()
    with pytest.raises(aliases.AliasConflict) as e:
        second.commit()
    msg = str(e.value)
    assert msg.startswith(f"alias 'prod' under {root} was changed by another promote"), msg
    assert f"it now points at {root}/a checkpoint epoch0002-step0000002-a1 (promoted by alice@h1" in msg
    assert "nothing was written" in msg
    assert aliases.resolve(Storage(root), "prod").promoted_by == "alice@h1"

    # The same race over an existing alias (If-Match on the version both read).
    third = aliases.prepare(open_run(f"{root}/b"), "prod", by="carol@h3")
    fourth = aliases.prepare(
        open_run(f"{root}/a"), "prod", checkpoint="epoch0003-step0000003-a1", by="dan@h4"
    )
    third.commit()
    with pytest.raises(aliases.AliasConflict, match=rf"now points at {root}/b checkpoint epoch0001"):
        fourth.commit()
    now = aliases.resolve(Storage(root), "prod")
    assert (now.promoted_by, now.run_uri) == ("carol@h3", f"{root}/b")


def test_promote_refuses_an_absent_or_damaged_checkpoint_naming_it(tmp_path) -> None:
    root = tmp_path / "runs"
    make_run(Storage(str(root / "a")), [0.9, 0.2, 0.5])
    run = open_run(str(root / "a"))
    with pytest.raises(NoCheckpoint, match=r"no committed checkpoint 'epoch0009-nope'; it has epoch0002"):
        aliases.promote(run, "prod", checkpoint="epoch0009-nope")
    model = root / "a" / "checkpoints" / "epoch0003-step0000003-a1" / "model.pt"
    model.write_bytes(bytes(b ^ 0xFF for b in model.read_bytes()))  # same size, other bytes
    with pytest.raises(aliases.AliasError) as e:
        aliases.promote(run, "prod", checkpoint="epoch0003-step0000003-a1")
    assert str(e.value).startswith(
        f"checkpoint epoch0003-step0000003-a1 of {root}/a failed verification, not promoted to 'prod': "
    ) and "sha256" in str(e.value)
    assert not (root / "aliases" / "prod.json").exists()  # nothing written
    with pytest.raises(aliases.AliasError, match=r"alias name '\.\./x'"):
        aliases.promote(run, "../x")


def test_cli_promote_and_aliases(tmp_path) -> None:
    root = tmp_path / "runs"
    make_run(Storage(str(root / "a")), [0.9, 0.2, 0.5])
    env = cli_env()
    p = run_cli("aliases", str(root), env=env)
    assert p.returncode == 0 and f"no aliases under {root}" in p.stdout, p.stderr
    p = run_cli("promote", str(root / "a"), "--as", "prod", env=env, check=True)
    assert p.stdout.strip() == f"{root}/aliases/prod.json -> {root}/a epoch0002-step0000002-a1 (verified)"
    p = run_cli(
        "promote", str(root / "a"), "--as", "prod", "--checkpoint", "epoch0003-step0000003-a1", "--json"
    )
    out = json.loads(p.stdout)
    assert out["checkpoint"] == "epoch0003-step0000003-a1" and out["root"] == str(root)
    assert out["previous"] == {"run_uri": f"{root}/a", "checkpoint": "epoch0002-step0000002-a1"}
    p = run_cli("aliases", str(root), "--json", env=env, check=True)
    (listed,) = json.loads(p.stdout)
    assert (listed["name"], listed["checkpoint"]) == ("prod", "epoch0003-step0000003-a1")
    p = run_cli("aliases", str(root), env=env, check=True)
    assert "prod" in p.stdout and "epoch0003-step0000003-a1" in p.stdout and f"{root}/a" in p.stdout
    p = run_cli("promote", str(root / "a"), "--as", "prod", "--checkpoint", "nope", env=env)
    assert p.returncode == 1 and "error: " in p.stderr and "no committed checkpoint 'nope'" in p.stderr
    p = run_cli("promote", str(root / "a"), "--as", "a b", env=env)
    assert p.returncode == 2 and "error: alias name 'a b'" in p.stderr, p.stderr
    p = run_cli("runs", str(root), env=env, check=True)  # the aliases directory is no run
    assert "aliases" not in p.stdout and "unreadable" not in p.stdout, p.stdout
