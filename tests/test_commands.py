"""Management commands reject bad arguments with one-line errors, before acting."""

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from runner.models import Run

DEFINITION = "examples/people-count.json"


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        ("runworkflow", [DEFINITION, "--timeout", "nan"], "positive, finite"),
        ("runworkflow", [DEFINITION, "--timeout", "-1"], "positive, finite"),
        ("runworkflow", [DEFINITION, "--wait-for-runner", "-2"], "zero or a positive"),
        ("runner", ["--memory-budget-mb", "0"], "positive whole number"),
        ("up", ["--runners", "-1"], "zero or more"),
        ("up", ["--port", "70000"], "from 1 to 65534"),
        ("up", ["--web-workers", "0"], "positive whole number"),
    ],
)
def test_bad_argument_values(db, command, arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command(command, *arguments)
    assert Run.objects.count() == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "contains a JSON list"),
        ('{"version": "1.0", "inputs": null}', None),
        (b"\xff\xfe{", "cannot read definition file"),
    ],
)
def test_runworkflow_bad_definition_file(db, tmp_path, content, message):
    path = tmp_path / "definition.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(CommandError) as caught:
        call_command("runworkflow", str(path))
    if message:
        assert message in str(caught.value)
    assert Run.objects.count() == 0


def test_runworkflow_definition_is_a_directory(db, tmp_path):
    with pytest.raises(CommandError, match="cannot read definition file"):
        call_command("runworkflow", str(tmp_path))


@pytest.mark.parametrize("username", ["", "a b/c", "x" * 200])
def test_runworkflow_rejects_invalid_user_name(db, username):
    with pytest.raises(CommandError, match="not a valid user name"):
        call_command("runworkflow", DEFINITION, "--user", username)
    assert not get_user_model().objects.filter(username=username).exists()
