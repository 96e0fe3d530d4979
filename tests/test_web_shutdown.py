"""Stopping the web server responds at once to requests that wait for runs."""

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from django.conf import settings
from django.db import connection

from runner.management.commands.up import gunicorn_command
from runner.models import Run
from tests.conftest import ROOT, free_port, image_b64, start_cli_run, wait_until_serving
from tests.definitions import detection, image_height


def post_json(url: str, body: dict, key: str, replies: list) -> None:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            replies.append((reply.status, json.loads(reply.read()), time.monotonic()))
    except urllib.error.HTTPError as error:
        replies.append((error.code, json.loads(error.read()), time.monotonic()))
    except Exception as error:  # checked by the test's assertions
        replies.append((None, repr(error), time.monotonic()))


def test_sigterm_ends_waiting_request(runner, alice, alice_key):
    port = free_port()
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env["GLASSBOX_TEST_DB_NAME"] = str(connection.settings_dict["NAME"])
    log_path = Path(settings.DATA_DIR) / "shutdown-gunicorn.log"
    with open(log_path, "wb") as log:
        web = subprocess.Popen(
            gunicorn_command("webapp.wsgi:application", f"127.0.0.1:{port}", 1),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_serving(f"http://127.0.0.1:{port}", web, log_path.read_text())
        # The only runner is busy with a cold load of the largest architecture,
        # which no other test loads, so the next run waits for seconds.
        busy = start_cli_run(alice, detection("yolo11x.yaml"), wait_s=0).run
        body = {
            "specification": image_height(),
            "inputs": {"image": {"type": "base64", "value": image_b64()}},
        }
        replies: list = []
        waiting = threading.Thread(
            target=post_json,
            args=(f"http://127.0.0.1:{port}/workflows/run", body, alice_key, replies),
        )
        waiting.start()
        deadline = time.monotonic() + 30
        while not Run.objects.filter(owner=alice).exclude(pk=busy.pk).exists():
            assert time.monotonic() < deadline, "the request stored no run"
            time.sleep(0.05)
        assert Run.objects.get(pk=busy.pk).status != Run.Status.SUCCEEDED

        stopped_at = time.monotonic()
        web.send_signal(signal.SIGTERM)
        waiting.join(timeout=60)
    finally:
        web.terminate()
        web.wait(timeout=60)

    # The Roboflow route responds to a run still going with an error that
    # names it, because its client cannot read a 202.
    status, reply, answered_at = replies[0]
    assert status == 500, reply
    assert reply["code"] == "run_not_finished"
    assert "when this web server began to stop" in reply["message"]
    waiting_run = Run.objects.exclude(pk=busy.pk).get(owner=alice)
    assert reply["run_id"] == str(waiting_run.pk)
    assert answered_at - stopped_at < 5
