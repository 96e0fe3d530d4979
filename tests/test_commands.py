"""Management commands reject bad arguments with one-line errors, before acting."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.db import connection as db_connection
from django.test import override_settings

from runner.models import Run
from tests.conftest import ROOT, free_port, image_path, private_data_env
from tests.definitions import detection, image_height

DEFINITION = "examples/people-count.json"
BUS = str(image_path())


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        ("runworkflow", [DEFINITION, "--timeout", "nan"], "positive, finite"),
        ("runworkflow", [DEFINITION, "--timeout", "-1"], "positive, finite"),
        ("runworkflow", [DEFINITION, "--wait-for-runner", "-2"], "zero or a positive"),
        ("runner", ["--memory-budget-mb", "0"], "positive whole number"),
        (
            "runner",
            ["--memory-budget-mb", str(16 * 1024 * 1024 + 1)],
            "over the maximum of 16777216 MiB",
        ),
        ("runner", ["--device", ""], "--device is empty"),
        ("runner", ["--name", ""], "--name is empty"),
        ("runner", ["--name", "y" * 191], "191 characters long; the limit is 190"),
        ("runner", ["--name", ".."], "runner name '..' needs at least one letter"),
        ("runner", ["--name", "a b"], "'a b' may contain only ASCII letters"),
        ("runner", ["--name", "é²"], "'é²' may contain only ASCII letters"),
        ("runner", ["--device", "tpu"], "--device 'tpu' is not a torch device"),
        (
            "runner",
            ["--device", "cuda:99"],
            "--device 'cuda:99' (needs CUDA|names a CUDA device)",
        ),
        ("up", ["--runners", "-1"], "zero or more"),
        ("up", ["--port", "70000"], "from 1 to 65534"),
        ("up", ["--host", ""], "the address is empty"),
        ("up", ["--host", "999.1.1.1"], "cannot listen on --host '999.1.1.1'"),
        ("up", ["--web-workers", "0"], "positive whole number"),
        (
            "up",
            ["--runner-prefix", "a b"],
            "prefix 'a b' may contain only ASCII letters",
        ),
        ("up", ["--runner-prefix", "-"], "prefix '-' needs at least one letter"),
        ("up", ["--runner-prefix", ""], "the prefix is empty"),
        (
            "up",
            ["--runner-prefix", "p" * 181, "--runners", "10"],
            "--runner-prefix makes runner names of up to 191 characters",
        ),
    ],
)
def test_bad_argument_values(db, command, arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command(command, *arguments)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "contains a JSON list"),
        ('{"version": "1.0", "inputs": null}', "'inputs' must be a list"),
        (b"\xff\xfe{", "cannot read definition file"),
        # Python's json module reads these, but a run could not store them,
        # and the API refuses them: the command says so instead of a traceback.
        ('{"a":' * 100_000 + "1" + "}" * 100_000, "is nested too deeply"),
        ('{"version": 1' + "0" * 5000 + "}", "an integer has 5001 digits"),
        ('{"version": NaN}', "NaN is not a valid JSON value"),
        ('{"version": "\\ud800"}', "unpaired UTF-16 surrogate escape"),
        ('{"version": "\\u0000"}', "a string with a NUL character"),
        ('{"version": "1.0", "version": "1"}', 'has the key "version" more than'),
    ],
    ids=[
        "list",
        "bad-inputs",
        "utf16",
        "deep",
        "long-int",
        "nan",
        "surrogate",
        "nul",
        "duplicate-key",
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
    assert message in str(caught.value)
    assert Run.objects.count() == 0


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024)
def test_runworkflow_definition_over_body_limit(db, tmp_path):
    path = tmp_path / "definition.json"
    path.write_text(json.dumps({"inputs": [], "notes": "x" * 1024}))
    with pytest.raises(CommandError) as caught:
        call_command("runworkflow", str(path))
    assert "is over 1024 bytes (MAX_REQUEST_BYTES" in str(caught.value)
    assert Run.objects.count() == 0


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024)
def test_runworkflow_definition_over_limit_mid_character(db, tmp_path):
    # The read stops after 1,025 bytes, inside a two-byte "é", and the
    # limit is what the file breaks, not UTF-8.
    data = json.dumps({"note": "é" * 1024}, ensure_ascii=False).encode()
    with pytest.raises(UnicodeDecodeError):
        data[:1025].decode()
    path = tmp_path / "definition.json"
    path.write_bytes(data)
    with pytest.raises(CommandError) as caught:
        call_command("runworkflow", str(path))
    assert "is over 1024 bytes (MAX_REQUEST_BYTES" in str(caught.value)
    assert Run.objects.count() == 0


def test_runworkflow_definition_is_a_directory(db, tmp_path):
    with pytest.raises(CommandError, match="cannot read definition file"):
        call_command("runworkflow", str(tmp_path))


@pytest.mark.parametrize("username", ["", "a b/c", "x" * 200])
def test_runworkflow_rejects_invalid_user_name(db, username):
    with pytest.raises(CommandError, match="not a valid user name"):
        call_command("runworkflow", DEFINITION, "--user", username)
    assert not get_user_model().objects.filter(username=username).exists()


@pytest.mark.parametrize(
    ("definition", "arguments", "message"),
    [
        (DEFINITION, ["--param", "=1"], "must look like KEY=VALUE"),
        (DEFINITION, ["--image", "nosuch.jpg"], "cannot read image nosuch.jpg"),
        ("no-outputs", [], "'outputs' is missing"),
    ],
)
def test_runworkflow_failure_leaves_no_new_user(
    db, tmp_path, definition, arguments, message
):
    # A definition the compiler rejects fails inside start_run, not before it.
    if definition == "no-outputs":
        path = tmp_path / "definition.json"
        path.write_text(json.dumps({"version": "1.0", "inputs": [], "steps": []}))
        definition = str(path)

    with pytest.raises(CommandError, match=message):
        call_command("runworkflow", definition, "--user", "newcomer", *arguments)

    assert not get_user_model().objects.filter(username="newcomer").exists()


def test_runworkflow_failure_keeps_existing_user(db):
    get_user_model().objects.create_user("regular")

    with pytest.raises(CommandError, match="must look like KEY=VALUE"):
        call_command("runworkflow", DEFINITION, "--user", "regular", "--param", "=1")

    assert get_user_model().objects.filter(username="regular").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--param", "nosuch=1"],
            "--param names inputs the definition does not declare: nosuch; its "
            "parameter inputs: confidence$",
        ),
        (
            ["--image", f"nosuch={BUS}"],
            "--image names inputs the definition does not declare: nosuch; its "
            "image inputs: image$",
        ),
        (
            ["--image", BUS, "--image", f"confidence={BUS}"],
            "--image names inputs that are not image inputs: confidence; give "
            "them with --param",
        ),
        (
            ["--param", "image=5"],
            "--param names inputs that are not parameter inputs: image; give "
            "them with --image",
        ),
        (["--image", BUS, "--image", BUS], "--image gives input 'image' twice"),
        (
            ["--image", BUS, "--param", "confidence=0.3", "--param", "confidence=0.5"],
            "--param gives input 'confidence' twice",
        ),
        (
            ["--image", BUS, "--param", "image=5"],
            "input 'image' is given by both --image and --param",
        ),
    ],
)
def test_runworkflow_rejects_unknown_or_repeated_inputs(db, arguments, message):
    with pytest.raises(CommandError, match=message):
        call_command("runworkflow", DEFINITION, *arguments)
    assert Run.objects.count() == 0


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024)
def test_runworkflow_image_over_body_limit(db, tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff" * 1025)
    with pytest.raises(CommandError) as caught:
        call_command("runworkflow", DEFINITION, "--image", str(path))
    message = str(caught.value)
    assert f"--image {path} is over 1024 bytes" in message
    assert "MAX_REQUEST_BYTES" in message
    assert Run.objects.count() == 0


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024)
def test_runworkflow_image_from_endless_device(db):
    # A read to the end would never return.
    with pytest.raises(CommandError, match="--image /dev/zero is over 1024 bytes"):
        call_command("runworkflow", DEFINITION, "--image", "image=/dev/zero")
    assert Run.objects.count() == 0


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024)
def test_runworkflow_image_from_endless_fifo(db, tmp_path):
    fifo = tmp_path / "image.fifo"
    os.mkfifo(fifo)
    # The writer ends when the command closes the read end (EPIPE).
    writer = subprocess.Popen(["sh", "-c", f"yes > {fifo}"], stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(CommandError, match="image.fifo is over 1024 bytes"):
            call_command("runworkflow", DEFINITION, "--image", str(fifo))
    finally:
        writer.kill()
        writer.wait()
    assert Run.objects.count() == 0


def test_runworkflow_batch_input_takes_image(db, tmp_path):
    definition = image_height()
    definition["inputs"] = [
        {"type": "WorkflowBatchInput", "name": "image", "kind": ["image"]}
    ]
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(definition))
    message = (
        "--param names inputs that are not parameter inputs: image; give them "
        "with --image"
    )
    with pytest.raises(CommandError, match=message):
        call_command("runworkflow", str(path), "--param", "image=5")
    assert Run.objects.count() == 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "NaN",
            "--param note is not valid JSON: NaN is not a valid JSON value; "
            "quote it as a JSON string to pass it as text",
        ),
        ("1e400", "the number 1e400 is out of range for a 64-bit float"),
        ("1" * 5000, "an integer has 5000 digits, over the limit of 4300"),
        ("[" * 100_000 + "]" * 100_000, "is nested too deeply"),
        ('"\\u0000"', "a string with a NUL character"),
        ('"\\udc00"', "unpaired UTF-16 surrogate escape"),
        # Bytes of an argument that are not UTF-8 reach Python as surrogates.
        ("\udcff", "--param note: the value is not UTF-8 text"),
    ],
    ids=["nan", "inf", "long-int", "deep", "nul", "surrogate", "not-utf8"],
)
def test_runworkflow_rejects_parameter_a_run_cannot_store(db, tmp_path, value, message):
    # A parameter that no step checks, such as one only output: its NaN got
    # as far as the run's insert, and failed there with a traceback.
    definition = json.loads((ROOT / DEFINITION).read_text())
    definition["inputs"].append({"type": "WorkflowParameter", "name": "note"})
    definition["outputs"].append(
        {"type": "JsonField", "name": "note", "selector": "$inputs.note"}
    )
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(definition))
    with pytest.raises(CommandError) as caught:
        call_command(
            "runworkflow", str(path), "--image", BUS, "--param", f"note={value}"
        )
    assert message in str(caught.value)
    assert Run.objects.count() == 0


def test_runworkflow_missing_image_hint_names_option(runner):
    with pytest.raises(CommandError) as caught:
        call_command("runworkflow", DEFINITION)
    body = json.loads(str(caught.value))
    assert body["code"] == "invalid_input"
    assert body["hint"] == "Give the image with --image image=PATH."
    assert Run.objects.count() == 0


def test_runworkflow_bad_image_names_file(runner, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(CommandError) as caught:
        call_command("runworkflow", DEFINITION, "--image", str(text_file))
    body = json.loads(str(caught.value))
    assert body["message"].endswith(f"(file {text_file})")
    assert "hint" not in body
    assert Run.objects.count() == 0


def test_runworkflow_output_and_equals_path(runner, tmp_path, capsys):
    # An output of the input image is base64 far over the printed limit.
    definition = image_height()
    definition["outputs"].append(
        {"type": "JsonField", "name": "picture", "selector": "$inputs.image"}
    )
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(definition))
    image = tmp_path / "a=b.jpg"
    shutil.copy(BUS, image)

    call_command("runworkflow", str(path), "--image", str(image))

    printed = capsys.readouterr().out
    assert "queued; waiting up to" in printed
    text = printed.split("outputs:\n", 1)[1].split("\ntiming breakdown", 1)[0]
    [output] = json.loads(text)
    assert output["height"] == 1080
    assert "characters in all; GET /api/runs/" in output["picture"]["value"]


def production_env(data_dir: Path, **variables: str) -> dict[str, str]:
    """Return a subprocess environment with the production settings, the data
    directory ``data_dir``, no REDIS_URL, and ``variables``."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "GLASSBOX_DATA_DIR": str(data_dir),
        **variables,
    }
    env.pop("REDIS_URL", None)
    return env


def manage_py(env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    """Run ``manage.py arguments`` in a subprocess with ``env``; return its result."""
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_createtoken_on_new_database_says_to_migrate(tmp_path):
    database = tmp_path / "empty.sqlite3"
    env = production_env(tmp_path / "data", DATABASE_URL=f"sqlite:///{database}")
    result = manage_py(env, "createtoken", "nobody")
    assert result.returncode == 1
    assert "the database is not set up; run 'python manage.py migrate'" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_runner_on_new_database_says_to_migrate(tmp_path):
    # A runner started without DATABASE_URL on a machine that should use the
    # shared database gets a new SQLite file, so it must stop with a message.
    database = tmp_path / "empty.sqlite3"
    data_dir = tmp_path / "data"
    env = production_env(data_dir, DATABASE_URL=f"sqlite:///{database}")
    result = manage_py(env, "runner", "--name", "lost")
    assert result.returncode == 1
    assert f"database SQLite file {database} has " in result.stderr
    assert "unapplied migrations; run 'python manage.py migrate'" in result.stderr
    assert "Traceback" not in result.stderr
    # It stopped before starting an embedded Redis server, which would
    # outlive it.
    assert not (data_dir / "redis.sock").exists()


@pytest.mark.parametrize("heartbeat_s, dead_after_s", [("6", "5"), ("3", "5")])
def test_dead_time_under_two_heartbeats_rejected(tmp_path, heartbeat_s, dead_after_s):
    # A heartbeat key could expire between two heartbeats, and other runners
    # would then reap a live runner.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "GLASSBOX_DATA_DIR": str(tmp_path / "data"),
        "RUNNER_HEARTBEAT_S": heartbeat_s,
        "RUNNER_DEAD_AFTER_S": dead_after_s,
    }
    result = manage_py(env, "check")
    assert result.returncode != 0
    assert f"RUNNER_DEAD_AFTER_S={dead_after_s} is less than twice" in result.stderr
    assert f"RUNNER_HEARTBEAT_S={heartbeat_s}" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not a logging level"),
        ("WEBSOCKET_PORT", "abc", "WEBSOCKET_PORT='abc' is not an integer"),
        ("WEB_SERVER_PORT", "70000", "WEB_SERVER_PORT=70000 is above the maximum"),
    ],
)
def test_malformed_setting_stops_start_up(tmp_path, variable, value, message):
    env = production_env(tmp_path / "data", **{variable: value})
    result = manage_py(env, "check")
    assert result.returncode != 0
    assert f"ImproperlyConfigured: {message}" in result.stderr


@pytest.mark.parametrize("below_file", [False, True], ids=["file", "below-file"])
def test_data_dir_not_a_directory_stops_start_up(tmp_path, below_file):
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    data_dir = blocker / "sub" if below_file else blocker

    result = manage_py(production_env(data_dir), "check")

    assert result.returncode != 0
    assert (
        f"ImproperlyConfigured: GLASSBOX_DATA_DIR='{data_dir}' cannot be created"
        in result.stderr
    )
    assert blocker.read_text() == "not a directory"


def test_empty_setting_means_default(tmp_path):
    # Compose files and shell scripts often set a variable to nothing. An
    # empty MODEL_DIR or GLASSBOX_DATA_DIR must not become the current
    # directory.
    data_dir = tmp_path / "data"
    env = production_env(
        data_dir, MODEL_DIR="", DATABASE_URL="", LOG_LEVEL="", WEBSOCKET_PORT=""
    )
    script = (
        "from django.conf import settings; "
        "print(settings.GLASSBOX['MODEL_DIR']); "
        "print(settings.DATABASES['default']['NAME']); "
        "print(settings.LOGGING['root']['level']); "
        "print(settings.GLASSBOX['WEBSOCKET_PORT'])"
    )
    result = manage_py(env, "shell", "-c", script)
    assert result.returncode == 0, result.stderr
    model_dir, database, level, websocket_port = result.stdout.split()[-4:]
    assert model_dir == str((data_dir / "models").resolve())
    assert database == str((data_dir / "db.sqlite3").resolve())
    assert level == "INFO"
    assert websocket_port == "0"


def test_runner_reports_unreachable_redis(db, tmp_path):
    env = private_data_env(tmp_path / "data")
    port = free_port()
    env["REDIS_URL"] = f"redis://user:in-user-part@127.0.0.1:{port}/3"
    result = manage_py(env, "runner", "--name", "unreachable")
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/3: " in result.stderr
    assert "Check REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "in-user-part" not in result.stderr
    # It stopped before warming up, which takes seconds.
    assert "process warmed up" not in result.stderr


def test_up_reports_unreachable_redis(db, tmp_path):
    env = private_data_env(tmp_path / "data")
    redis_port = free_port()
    env["REDIS_URL"] = f"redis://user:in-user-part@127.0.0.1:{redis_port}/3"
    result = manage_py(env, "up", "--port", str(free_port()), "--runners", "0")
    assert result.returncode == 1
    assert f"cannot reach Redis at redis://127.0.0.1:{redis_port}/3: " in result.stderr
    assert "Check REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert ".. Check" not in result.stderr
    assert "in-user-part" not in result.stderr + result.stdout


def test_runner_reports_unreachable_database(tmp_path):
    port = free_port()
    env = production_env(
        tmp_path / "data",
        DATABASE_URL=f"postgres://user:in-user-part@127.0.0.1:{port}/glassbox",
    )
    result = manage_py(env, "runner", "--name", "unreachable")
    assert result.returncode == 1
    assert f"cannot connect to database glassbox on 127.0.0.1:{port}: " in result.stderr
    assert "Check DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "in-user-part" not in result.stderr


def test_up_reports_unreachable_database(tmp_path):
    database_port = free_port()
    env = production_env(
        tmp_path / "data",
        DATABASE_URL=(
            f"postgres://user:in-user-part@127.0.0.1:{database_port}/glassbox"
        ),
    )
    result = manage_py(env, "up", "--port", str(free_port()), "--runners", "0")
    assert result.returncode == 1
    assert (
        f"migrating database glassbox on 127.0.0.1:{database_port} failed: "
        in result.stderr
    )
    assert "Check DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "in-user-part" not in result.stderr


def test_runner_logs_redis_without_password(db, tmp_path):
    # redis-py reads a password from the user part or the query string.
    env = private_data_env(tmp_path / "data")
    env["REDIS_URL"] = "redis://user:in-user-part@127.0.0.1:9/3?password=in-query"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runner", "--name", "secretive"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "runner secretive: Redis " in line:
                break
    finally:
        process.kill()
        process.wait(timeout=30)
    logged = "".join(lines)
    assert "runner secretive: Redis redis://127.0.0.1:9/3, database " in logged
    assert "in-user-part" not in logged
    assert "in-query" not in logged


def test_runworkflow_interrupted_names_the_run(runner, tmp_path):
    # A large untrained architecture keeps the runner in its cold load while
    # the command waits, and SIGINT arrives then.
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(detection("yolov8x.yaml")))
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env["GLASSBOX_TEST_DB_NAME"] = str(db_connection.settings_dict["NAME"])
    command = subprocess.Popen(
        [sys.executable, "manage.py", "runworkflow", str(path), "--image", BUS],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first_line = command.stdout.readline()
    assert "queued; waiting up to" in first_line, command.stderr.read()
    command.send_signal(signal.SIGINT)
    _, errors = command.communicate(timeout=60)
    run_id = first_line.split()[1]
    assert command.returncode == 1
    assert f"interrupted; run {run_id} goes on" in errors
    assert "Traceback" not in errors
    # The run goes on and ends; later tests find the session runner free.
    deadline = time.monotonic() + 120
    while not Run.objects.get(pk=run_id).is_finished:
        assert time.monotonic() < deadline, f"run {run_id} never ended"
        time.sleep(0.2)
    assert Run.objects.get(pk=run_id).status == Run.Status.SUCCEEDED


def test_runworkflow_interrupted_before_queueing(transactional_db, tmp_path):
    path = tmp_path / "definition.json"
    path.write_text(json.dumps(detection("yolov8n.yaml")))
    env = private_data_env(tmp_path / "data")

    command = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "runworkflow",
            str(path),
            "--image",
            BUS,
            "--wait-for-runner",
            "60",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The command logs the embedded Redis it starts, then waits.
    assert "started embedded Redis" in command.stderr.readline()
    time.sleep(0.5)
    command.send_signal(signal.SIGINT)
    _, errors = command.communicate(timeout=60)

    assert command.returncode == 1
    assert "interrupted while waiting for a runner; nothing was queued" in errors
    assert "Traceback" not in errors
    assert Run.objects.count() == 0
    # No runner came, so the command stops the Redis server it started.
    assert not (tmp_path / "data" / "redis.sock").exists()


@pytest.mark.django_db
def test_models_match_migrations():
    # makemigrations --check exits with 1 when a model differs from the
    # migrations, such as a default that migrations cannot import.
    out = io.StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_fetch_models_installs_weights_once(settings, tmp_path):
    import zipfile

    settings.GLASSBOX = {**settings.GLASSBOX, "MODEL_DIR": tmp_path}
    # What an interrupted earlier copy left behind is not taken as present.
    (tmp_path / "people-detector.pt.partial").write_bytes(b"cut short")
    out = io.StringIO()
    call_command("fetch_models", stdout=out)
    target = tmp_path / "people-detector.pt"
    assert f"installed {target}" in out.getvalue()
    # A torch checkpoint is a zip archive.
    assert zipfile.is_zipfile(target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["people-detector.pt"]

    again = io.StringIO()
    call_command("fetch_models", stdout=again)
    assert again.getvalue().strip() == f"{target} already present"


@pytest.mark.parametrize("below_file", [False, True], ids=["file", "below-file"])
def test_fetch_models_model_dir_not_a_directory(settings, tmp_path, below_file):
    blocker = tmp_path / "models"
    blocker.write_text("not a directory")
    model_dir = blocker / "sub" if below_file else blocker
    settings.GLASSBOX = {**settings.GLASSBOX, "MODEL_DIR": model_dir}

    with pytest.raises(CommandError, match="cannot create the model directory"):
        call_command("fetch_models")

    assert blocker.read_text() == "not a directory"


def _migrate_with_umask_022(data_dir):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings",
        "GLASSBOX_DATA_DIR": str(data_dir),
    }
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    return subprocess.run(
        [sys.executable, "manage.py", "migrate", "--no-input"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        # The usual umask, which leaves new files readable by every user.
        preexec_fn=lambda: os.umask(0o022),
    )


def _other_users_permissions(path) -> int:
    return path.stat().st_mode & 0o077


def test_sqlite_database_private_to_owner(tmp_path):
    # The database stores session keys, and a session key signs its reader in.
    data_dir = tmp_path / "data"
    result = _migrate_with_umask_022(data_dir)
    assert result.returncode == 0, result.stderr
    database = data_dir / "db.sqlite3"
    assert _other_users_permissions(database) == 0
    for suffix in ("-wal", "-shm"):
        companion = data_dir / f"db.sqlite3{suffix}"
        if companion.exists():
            assert _other_users_permissions(companion) == 0, companion


def test_sqlite_database_made_private_on_start(tmp_path):
    # A database that an earlier version created readable by everyone.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    database = data_dir / "db.sqlite3"
    database.touch(mode=0o644)
    database.chmod(0o644)
    result = _migrate_with_umask_022(data_dir)
    assert result.returncode == 0, result.stderr
    assert _other_users_permissions(database) == 0
