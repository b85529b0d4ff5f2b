"""Bad input in a spec or on the command line: each a clear error naming the file or the
flag, the field and what is wrong, before Ray starts (a table: one row per mistake)."""

from __future__ import annotations

import pytest

from harness.cli import run_cli
from orchestrator.spec import SpecError, load_spec, read_value


def test_numbers_on_the_command_line_are_numbers():
    assert read_value("1e-3", "--set") == 0.001 and read_value("-2.5E+2", "--set") == -250.0
    assert read_value("3", "--set") == 3 and read_value("true", "--set") is True
    assert read_value("abc", "--set") == "abc" and read_value("1.2.3", "--set") == "1.2.3"
    spec = load_spec("configs/digits.yaml", ["task.options.lr=1e-3"])
    assert spec.task.options["lr"] == 0.001


@pytest.mark.parametrize(
    "text, sets, message",
    [
        ("", [], "the spec is empty; it needs at least `name:`"),
        ("name: x\nepochs: [1\n", [], 'job.yaml", line 3'),  # the file and the line, not <unicode string>
        ("name: x\nchekpoint: {top_k: 3}\n", [], "chekpoint: unknown field (did you mean 'checkpoint'?)"),
        ("name: x\ncheckpoint: {topk: 3}\n", [], "checkpoint.topk: unknown field (did you mean 'top_k'?)"),
        (
            "name: x\ncheckpoint: {top_k: 0}\n",
            [],
            "job.yaml: checkpoint.top_k: Input should be greater than or equal to 1",
        ),
        ("name: x\ncheckpoint: {mode: avg}\n", [], "checkpoint.mode: Input should be 'min' or 'max'"),
        ("name: x\nepochs: 0\n", [], "epochs: Input should be greater than or equal to 1"),
        ("name: x\nepochs: ten\n", [], "epochs: Input should be a valid integer"),
        ("name: x\ntask: {name: nope}\n", [], "unknown task 'nope'"),
        ("name: x\n", ["epochs=0"], "--set epochs=0: epochs: Input should be greater than or equal to 1"),
        ("name: x\n", ["task.options.lr=fast"], "task.options: lr: expected a number (got 'fast')"),
        (
            "name: x\n",
            ["task.options.batch_size=3.5"],
            "task.options: batch_size: expected an integer (got 3.5)",
        ),
        ("name: x\n", ["task.options.colour=red"], "unknown option(s) ['colour'] for digits"),
        ("name: x\n", ["epochs=[1"], "--set epochs=[1: not a valid YAML value"),
    ],
)
def test_bad_spec_input_is_a_clear_error(tmp_path, text, sets, message):
    f = tmp_path / "job.yaml"
    f.write_text(text)
    with pytest.raises(SpecError) as e:
        load_spec(f, sets)
    assert message in str(e.value), str(e.value)


def test_a_task_module_that_raises_on_import_shows_the_users_error(tmp_path):
    (tmp_path / "broken.py").write_text("import no_such_module_here\n\ndef build(o, c):\n    pass\n")
    f = tmp_path / "job.yaml"
    f.write_text(f"name: x\ntask: {{name: {tmp_path / 'broken.py'}:build}}\n")
    p = run_cli("run", str(f), timeout=60)
    assert p.returncode == 2 and "No module named 'no_such_module_here'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_bad_storage_option_value_blames_the_flag(tmp_path):
    p = run_cli("checkpoints", str(tmp_path), "--storage-option", "endpoint_url=[x", timeout=60)
    assert p.returncode == 2 and "--storage-option endpoint_url=[x: not a valid YAML value" in p.stderr
