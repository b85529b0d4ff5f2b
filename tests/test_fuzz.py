"""Fuzzing the two readers of user-made bytes: the spec loader (a YAML file, `--set`) and the
manifest reader (manifest.json, which a user may edit by hand).

The property: any input gives a valid object or the project's own clear error (SpecError,
ManifestError), never another exception, and an object that is accepted is usable (finite
numbers, a seed every RNG takes, a spec that round-trips through the stored spec.yaml, a
manifest a reader can rank). Strategies build documents shaped like the real ones with
wrong types, NaN/inf, huge integers, deep nesting and unicode in them, not only random
text. Derandomized, so CI sees the same examples every run.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.api import Run
from orchestrator.core.manifest import (
    FORMAT,
    METRICS,
    ManifestError,
    parse_manifest,
    read_jsonl,
    read_manifest,
    read_record,
)
from orchestrator.core.storage import Storage
from orchestrator.driver import load_stored_spec, store_spec
from orchestrator.spec import JobSpec, SpecError, load_spec

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- values of every kind a document can hold -----------------------------------------------
HUGE = st.sampled_from([2**31, 2**32, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([math.nan, math.inf, -math.inf])
TEXT = st.text(max_size=12) | st.sampled_from(["", " ", "ünï", "🚀", "名前", "a/b", "..", "x" * 300])
SCALARS = st.none() | st.booleans() | st.integers() | HUGE | FLOATS | TEXT
WILD = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=8,
)
# YAML text a user might type for one value: tags, anchors, dates, huge literals, nesting.
YAML_VALUES = st.sampled_from(
    [
        ".nan",
        ".inf",
        "-.inf",
        "1e999",
        "1e-3",
        "0x1F",
        "0o17",
        "1_000",
        "~",
        "null",
        "yes",
        "no",
        "2020-01-01",
        "2020-01-01T10:00:00",
        "!!binary aGVsbG8=",
        "!!python/object:os.system {}",
        "!!set {a, b}",
        "&a [1, *a]",
        "*nope",
        "[1, 2, 3]",
        "{a: 1}",
        "'quoted'",
        '"\\u00e9"',
        "9" * 5000,
        "-" + "9" * 5000,
        "[" * 3000 + "]" * 3000,
        "{a: " * 2000 + "1" + "}" * 2000,
        "'unterminated",
        "{",
        "]",
        ": :",
        "\t",
        "\x00",
        "|\n  block",
        ">-",
        "!!float nan",
        "!!int x",
    ]
) | st.text(max_size=20)


def valid_or(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right kind of value (so validation goes deep), sometimes anything."""
    return st.one_of(valid, valid, WILD)


POS_INT = st.integers(1, 50)
POS_FLOAT = st.floats(0.01, 100)
NAMES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)

SPEC_DICTS = st.fixed_dictionaries(
    {"name": valid_or(NAMES)},
    optional={
        "epochs": valid_or(POS_INT),
        "seed": valid_or(st.integers(0, 2**40)),
        "storage": valid_or(
            st.fixed_dictionaries(
                {},
                optional={
                    "root": valid_or(st.sampled_from(["runs", "memory://fuzz", "s3://b/p"])),
                    "options": valid_or(st.dictionaries(TEXT, WILD, max_size=2)),
                    "retry": valid_or(
                        st.fixed_dictionaries(
                            {},
                            optional={
                                "attempts": valid_or(POS_INT),
                                "initial_s": valid_or(POS_FLOAT),
                                "max_s": valid_or(POS_FLOAT),
                            },
                        )
                    ),
                },
            )
        ),
        "task": valid_or(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": valid_or(st.just("digits")),
                    "options": valid_or(st.dictionaries(TEXT, WILD, max_size=3)),
                },
            )
        ),
        "scaling": valid_or(
            st.fixed_dictionaries(
                {},
                optional={
                    "num_workers": valid_or(POS_INT | st.lists(POS_INT, min_size=2, max_size=2)),
                    "use_gpu": valid_or(st.booleans()),
                    "resources_per_worker": valid_or(st.dictionaries(st.just("CPU"), FLOATS, max_size=1)),
                    "elastic_resize_interval_s": valid_or(POS_FLOAT),
                },
            )
        ),
        "checkpoint": valid_or(
            st.fixed_dictionaries(
                {},
                optional={
                    "monitor": valid_or(st.sampled_from(["val_loss", "val_acc"])),
                    "mode": valid_or(st.sampled_from(["min", "max"])),
                    "top_k": valid_or(POS_INT),
                    "keep_latest": valid_or(POS_INT),
                    "every_n_steps": valid_or(st.none() | POS_INT),
                    "keep_every_n_epochs": valid_or(st.none() | POS_INT),
                },
            )
        ),
        "failure": valid_or(
            st.fixed_dictionaries(
                {},
                optional={
                    "max_failures": valid_or(st.integers(-1, 10)),
                    "lease_ttl_s": valid_or(st.floats(1, 100)),
                },
            )
        ),
        "early_stopping": valid_or(
            st.none()
            | st.fixed_dictionaries(
                {}, optional={"patience": valid_or(POS_INT), "min_delta": valid_or(st.floats(0, 1))}
            )
        ),
        "chaos": valid_or(
            st.fixed_dictionaries(
                {},
                optional={
                    "kills": valid_or(
                        st.lists(
                            st.fixed_dictionaries(
                                {"rank": valid_or(st.integers(0, 3)), "epoch": valid_or(POS_INT)},
                                optional={"point": valid_or(st.sampled_from(["step", "after_upload"]))},
                            ),
                            max_size=2,
                        )
                    )
                },
            )
        ),
        "chekpoint": WILD,  # a typo: an unknown field
    },
)

# Dotted keys a user passes to --set: real fields, typos, paths through lists and scalars.
SET_KEYS = st.sampled_from(
    [
        "epochs",
        "seed",
        "name",
        "task.options.lr",
        "task.options.batch_size",
        "task.name",
        "checkpoint.top_k",
        "checkpoint.mode",
        "scaling.num_workers",
        "failure.lease_ttl_s",
        "storage.retry.initial_s",
        "chaos.kills",
        "chaos.kills.0.rank",
        "name.x",
        "epochs.x",
        "",
        ".",
        "..",
        "a..b",
        "checkpoint.",
        "é.ü",
        "x" * 200,
    ]
) | st.text(max_size=15)
SETS = st.lists(st.tuples(SET_KEYS, YAML_VALUES).map(lambda kv: f"{kv[0]}={kv[1]}") | TEXT, max_size=3)
DIGITS_OPTIONS = st.dictionaries(
    st.sampled_from(["lr", "batch_size", "momentum", "dropout", "val_fraction", "hidden", "colour"]),
    SCALARS,
    max_size=3,
)


def walk_floats(node: Any) -> list[float]:
    if isinstance(node, float):
        return [node]
    if isinstance(node, dict):
        return [f for v in node.values() for f in walk_floats(v)]
    if isinstance(node, (list, tuple)):
        return [f for v in node for f in walk_floats(v)]
    return []


def usable(spec: JobSpec) -> None:
    """What an accepted spec must be: finite numbers, a seed every RNG takes, and the same
    spec again after `resume` reads it back from the stored spec.yaml."""
    assert all(math.isfinite(f) for f in walk_floats(spec.model_dump())), spec
    from workers.data import epoch_permutation
    from workers.rng import seed_all

    seed_all(spec.seed + spec.scaling.max_workers + 7919 * 10**6)  # as restore seeds a rank
    epoch_permutation(4, spec.seed, spec.epochs)
    storage = Storage(f"memory://fuzz/{uuid.uuid4().hex}")
    store_spec(storage, spec)
    again = load_stored_spec(storage.uri, check_task=False)
    assert again.model_dump() == spec.model_dump(), (again, spec)


def load_text(tmp_path: Any, text: str | bytes, sets: list[str] = (), check_task: bool = False) -> None:  # type: ignore[assignment]
    f = tmp_path / f"{uuid.uuid4().hex}.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        spec = load_spec(f, list(sets), check_task=check_task)
    except SpecError as e:
        assert str(e).strip(), "an empty error message"
        return
    usable(spec)


# -- the spec loader -----------------------------------------------------------------------
@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(bytes))
def test_any_spec_file_is_a_spec_or_a_spec_error(tmp_path, text):
    load_text(tmp_path, text)


@FUZZ
@given(data=SPEC_DICTS)
def test_spec_shaped_documents_load_or_say_what_is_wrong(tmp_path, data):
    load_text(tmp_path, yaml.safe_dump(data, allow_unicode=True))


@FUZZ
@given(
    field=st.sampled_from(
        [
            "epochs",
            "seed",
            "name",
            "task.options.lr",
            "storage.root",
            "failure.lease_ttl_s",
            "scaling.resources_per_worker.CPU",
        ]
    ),
    value=YAML_VALUES,
)
def test_any_yaml_value_in_any_field(tmp_path, field, value):
    *parents, leaf = field.split(".")
    lines, indent = ["name: fuzz"] if field != "name" else [], ""
    for p in parents:
        lines.append(f"{indent}{p}:")
        indent += "  "
    lines.append(f"{indent}{leaf}: {value}")
    load_text(tmp_path, "\n".join(lines) + "\n")


@FUZZ
@given(sets=SETS)
def test_set_overrides_apply_or_are_blamed_on_set(tmp_path, sets):
    load_text(tmp_path, "name: fuzz\nepochs: 2\n", sets)


@FUZZ
@given(options=DIGITS_OPTIONS)
def test_builtin_task_options_are_checked_before_ray(tmp_path, options):
    load_text(
        tmp_path,
        yaml.safe_dump({"name": "fuzz", "task": {"name": "digits", "options": options}}),
        check_task=True,
    )


# -- the manifest reader -------------------------------------------------------------------
def encode(value: Any) -> str:
    """JSON text for value, huge integers written out whole (json.dumps cannot)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**4000 else ("-" if value < 0 else "") + "9" * 5000
    if isinstance(value, float):
        return json.dumps(value)  # NaN, Infinity: what the manifest itself writes
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return "{" + ",".join(f"{json.dumps(str(k))}:{encode(v)}" for k, v in value.items()) + "}"


HUGE_DIGITS = st.just(10**4001)  # written as 5000 nines: past Python's int-parsing limit
SHA = st.text("0123456789abcdef", min_size=64, max_size=64)
RECORDS = st.fixed_dictionaries(
    {
        "id": valid_or(st.sampled_from(["epoch0001-step0000010-a1", "epoch0002-step0000020-a1"])),
        "epoch": valid_or(POS_INT | HUGE_DIGITS),
        "step_in_epoch": valid_or(st.integers(0, 10)),
        "global_step": valid_or(st.integers(0, 100)),
        "end_of_epoch": valid_or(st.booleans()),
        "metrics": valid_or(st.dictionaries(st.sampled_from(["val_loss", "val_acc"]), FLOATS, max_size=2)),
        "files": valid_or(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "path": valid_or(st.just("model.pt")),
                        "size": valid_or(st.integers(0, 99)),
                        "sha256": valid_or(SHA),
                    }
                ),
                max_size=2,
            )
        ),
        "world_size": valid_or(POS_INT),
        "attempt": valid_or(POS_INT),
    },
    optional={"seq": valid_or(st.integers(0, 9)), "metrics_fresh": valid_or(st.booleans())},
)
MANIFESTS = st.fixed_dictionaries(
    {"run": valid_or(NAMES)},
    optional={
        "format": valid_or(st.integers(-2, FORMAT + 2) | HUGE_DIGITS),
        "generation": valid_or(st.integers(0, 100) | HUGE_DIGITS),
        "retention": valid_or(
            st.none()
            | st.fixed_dictionaries(
                {"monitor": valid_or(st.just("val_loss")), "mode": valid_or(st.sampled_from(["min", "max"]))},
                optional={"top_k": valid_or(POS_INT), "keep_latest": valid_or(POS_INT)},
            )
            | st.dictionaries(TEXT, WILD, max_size=2)
        ),
        "owner": valid_or(st.none() | TEXT),
        "requests": valid_or(st.dictionaries(TEXT, WILD, max_size=2)),
        "stopped": valid_or(st.none() | st.dictionaries(TEXT, TEXT, max_size=2)),
        "next_seq": valid_or(POS_INT),
        "checkpoints": valid_or(st.lists(RECORDS, max_size=3)),
        "kept": valid_or(st.dictionaries(TEXT, st.lists(TEXT, max_size=2), max_size=2)),
        "bad": valid_or(st.lists(st.fixed_dictionaries({"record": RECORDS, "reason": TEXT}), max_size=1)),
        "attempts": valid_or(st.integers(0, 9)),
        "status": valid_or(st.sampled_from(["running", "finished", "failed"])),
        "resumed_from": valid_or(st.none() | TEXT),
        "updated_at": valid_or(st.floats(0, 2e9)),
    },
)
DEEP = st.integers(1, 5000).map(lambda d: "[" * d + "]" * d)


def read_and_use(raw: bytes) -> None:
    """parse_manifest and a reader of the run (Run: rank, list): a Manifest or ManifestError."""
    storage = Storage(f"memory://fuzz/{uuid.uuid4().hex}")
    try:
        parse_manifest(storage, raw)
    except ManifestError as e:
        assert "manifest.json" in str(e), str(e)  # names the file
    storage.write_bytes("manifest.json", raw)
    try:
        run = Run(storage.uri)
    except ManifestError as e:
        assert storage.uri in str(e), str(e)
        return
    run.checkpoints()
    run.ranked()


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | DEEP.map(str.encode))
def test_any_manifest_bytes_are_a_manifest_or_a_manifest_error(raw):
    read_and_use(raw)


@FUZZ
@given(doc=MANIFESTS, cut=st.none() | st.integers(0, 400))
def test_manifest_shaped_documents_read_or_say_what_is_wrong(doc, cut):
    raw = encode(doc).encode()
    read_and_use(raw if cut is None else raw[:cut])  # a manifest cut short, as a bad edit leaves it


@FUZZ
@given(record=RECORDS | WILD, lines=st.lists(WILD.map(encode) | TEXT | DEEP, max_size=4))
def test_records_and_logs_read_or_fail_clearly(record, lines):
    storage = Storage(f"memory://fuzz/{uuid.uuid4().hex}")
    storage.write_bytes("checkpoints/c1/checkpoint.json", encode(record).encode())
    try:
        read_record(storage, "c1")
    except ManifestError as e:
        assert "checkpoint.json" in str(e), str(e)
    storage.write_bytes(METRICS, "\n".join(lines).encode("utf-8", "surrogatepass"))
    assert all(isinstance(row, dict) for row in read_jsonl(storage, METRICS))


# -- what the fuzzing found, each kept as a plain regression test ---------------------------
@pytest.mark.parametrize(
    "raw, says",
    [
        (b'{"run": "x", "generation": ' + b"9" * 5000 + b"}", "not a valid manifest"),
        (b"[" * 100_000 + b"]" * 100_000, "not a valid manifest"),
        (b'{"run": "x", "retention": {"top_k": 3}}', "retention"),
        (b'{"run": "x", "retention": {"monitor": "val_loss", "mode": "sideways"}}', "retention"),
    ],
)
def test_found_manifests_are_manifest_errors(raw, says):
    storage = Storage(f"memory://fuzz/{uuid.uuid4().hex}")
    storage.write_bytes("manifest.json", raw)
    with pytest.raises(ManifestError, match=says):
        read_manifest(storage)


# "Billion laughs": each level ten aliases of the one before, 10**8 values from 9 lines.
LAUGHS = "name: x\ntask:\n  options:\n    l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
    f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 8)
)


@pytest.mark.parametrize(
    "text, sets, says",
    [
        (b"name: x\nseed: \xff\n", [], "not UTF-8"),
        (
            "name: x\nseed: " + "9" * 5000 + "\n",
            [],
            "cannot read this value: Exceeds the limit (4300 digits)",
        ),
        ("name: x\ntask: {options: {a: " + "[" * 5000 + "]" * 5000 + "}}\n", [], "nested too deeply"),
        ("name: x\n", ["task.options.a=" + "[" * 5000 + "]" * 5000], "--set task.options.a="),
        (
            "name: x\nfailure: {lease_ttl_s: .inf}\n",
            [],
            "failure.lease_ttl_s: Input should be a finite number",
        ),
        ("name: x\nscaling: {resources_per_worker: {CPU: .nan}}\n", [], "scaling.resources_per_worker.CPU"),
        ("name: x\nseed: 18446744073709551616\n", [], "seed: Input should be less than"),
        ("name: x\nseed: -1\n", [], "seed: Input should be greater than or equal to 0"),
        ("name: x\ntask: {options: {when: 2020-01-01}}\n", [], "task.options: when: a date"),
        ("name: x\ntask: {options: {x: .nan}}\n", [], "task.options: x: not a finite number (got nan)"),
        (LAUGHS, [], "more than 100000 values (YAML aliases that multiply?)"),
    ],
)
def test_found_specs_are_spec_errors(tmp_path, text, sets, says):
    f = tmp_path / "job.yaml"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpecError) as e:
        load_spec(f, sets, check_task=False)
    assert says in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "options, says",
    [
        ({"batch_size": -1}, "batch_size: must be from 1 to 1048576 (got -1)"),
        ({"lr": 0}, "lr: must be a finite number > 0 (got 0)"),
        ({"val_fraction": 2}, "val_fraction: must be > 0 and < 1 (got 2)"),
        ({"dropout": 1.0}, "dropout: must be >= 0 and < 1 (got 1.0)"),
    ],
)
def test_found_digits_options_are_spec_errors(tmp_path, options, says):
    f = tmp_path / "job.yaml"
    f.write_text(yaml.safe_dump({"name": "x", "task": {"name": "digits", "options": options}}))
    with pytest.raises(SpecError) as e:
        load_spec(f)
    assert says in str(e.value), str(e.value)


def test_found_the_default_storage_root_is_absolute_too(tmp_path, monkeypatch):
    # Found by the round trip: without a storage section the root stayed "runs", relative to
    # wherever the process runs; `storage: {root: runs}` was made absolute.
    f = tmp_path / "job.yaml"
    f.write_text("name: x\n")
    monkeypatch.chdir(tmp_path)
    assert load_spec(f, check_task=False).storage.root == str(tmp_path / "runs")


def test_found_log_lines_that_are_not_objects_are_skipped():
    storage = Storage(f"memory://fuzz/{uuid.uuid4().hex}")
    storage.write_bytes(METRICS, b'{"epoch": 1}\n[]\n3\n' + b"[" * 5000 + b'\n\xff\n{"epoch": 2}\n')
    assert read_jsonl(storage, METRICS) == [{"epoch": 1}, {"epoch": 2}]
