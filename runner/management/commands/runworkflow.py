"""python manage.py runworkflow DEFINITION.json --image PATH [--param k=v]."""

import json
import logging
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from runner import fleet
from runner.models import Run
from runner.service import PriceCapExceeded, start_run
from runner.tables import bill_lines, breakdown_table
from webapp.management.arguments import (
    positive_microcredits,
    positive_seconds,
    seconds_or_zero,
)
from webapp.management.database import check_database
from webapp.redis import embedded_redis_for_command
from webapp.requests import MalformedRequest, parse_json_text
from workflows.compiler import MAX_DEFINITION_BYTES
from workflows.compiler.parse import IMAGE_INPUT_TYPES
from workflows.errors import WorkflowError

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Run a workflow definition on an image through the runner pool; print "
        "the outputs, the timing breakdown and the bill."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "definition", type=Path, help="Workflow definition JSON file."
        )
        parser.add_argument(
            "--image",
            action="append",
            default=[],
            metavar="[NAME=]PATH",
            help="Image file for the first image input, or NAME=PATH "
            "for a named one. Repeatable.",
        )
        parser.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Parameter value; VALUE is parsed as JSON when it can "
            "be, else taken as a string. Repeatable.",
        )
        parser.add_argument(
            "--user",
            default="cli",
            help="Account the run and its bill belong to, created if missing "
            "and removed again when the command stores no run "
            "(default: %(default)s).",
        )
        parser.add_argument(
            "--timeout",
            type=positive_seconds,
            default=settings.GLASSBOX["SYNC_TIMEOUT_S"],
            help="Seconds to wait for the result (default: SYNC_TIMEOUT_S, "
            "%(default)g). The run goes on after the wait ends.",
        )
        parser.add_argument(
            "--max-price",
            type=positive_microcredits,
            default=None,
            metavar="MICROCREDITS",
            help="Maximum price of the run, in micro-credits (1 credit is "
            "1,000,000). A run whose predicted price is higher is rejected "
            "before it is queued, and the bill never exceeds it. Default: no cap.",
        )
        parser.add_argument(
            "--priority",
            choices=Run.Priority.values,
            default=Run.Priority.STANDARD,
            help="How the run is routed: 'standard' sends it to the first free "
            "runner, which loads the models it lacks; 'economy' waits for a live "
            "runner that has them loaded, even a busy one (default: %(default)s).",
        )
        parser.add_argument(
            "--wait-for-runner",
            type=seconds_or_zero,
            default=0.0,
            help="Seconds to wait for a runner to come up first (default: 0, no wait).",
        )

    def handle(self, *args, **options):
        definition = self._read_definition(options["definition"])
        check_database()
        user, created = self._user(options["user"])
        try:
            # With no embedded Redis running, no runner of this data directory
            # is up. Looking for one starts the server, and the command leaves
            # none running that no other process uses.
            with embedded_redis_for_command():
                self._run(definition, user, options)
        except BaseException:
            # An account made for a run that was never stored would outlive
            # the failed command, so it goes with it.
            if created and not Run.objects.filter(owner=user).exists():
                user.delete()
            raise

    def _run(self, definition: dict, user, options) -> None:
        if options["wait_for_runner"]:
            try:
                runner_up = fleet.wait_for_runner(options["wait_for_runner"])
            except KeyboardInterrupt:
                raise CommandError(
                    "interrupted while waiting for a runner; nothing was queued"
                ) from None
            if not runner_up:
                raise CommandError(
                    "no runner came up; start one with 'python manage.py runner'"
                )
        uploads = self._read_images(definition, options["image"])
        raw_inputs = {}
        for text in options["param"]:
            key, value = self._parse_param(text)
            if key in raw_inputs:
                raise CommandError(f"--param gives input {key!r} twice")
            raw_inputs[key] = value
        _check_input_names(definition, uploads, raw_inputs)
        started_ns = time.perf_counter_ns()
        queued = []

        def note_queued(run) -> None:
            queued.append(run)
            self.stdout.write(
                f"run {run.id} queued; waiting up to {options['timeout']:g} s"
            )
            self.stdout.flush()

        try:
            outcome = start_run(
                owner_id=user.id,
                source="cli",
                definition=definition,
                raw_inputs=raw_inputs,
                uploads=uploads,
                started_ns=started_ns,
                wait_s=options["timeout"],
                on_queued=note_queued,
                max_price_microcredits=options["max_price"],
                priority=options["priority"],
            )
        except WorkflowError as error:
            body = _with_cli_hint(error.to_dict(), definition, self.image_paths)
            if isinstance(error, PriceCapExceeded):
                body["field"] = "--max-price"
                body["message"] = error.message_for("--max-price")
                body["hint"] = error.hint_for("--max-price", "--priority economy")
            raise CommandError(json.dumps(body, indent=2)) from None
        except KeyboardInterrupt:
            if not queued:
                raise CommandError("interrupted before the run was queued") from None
            run_id = queued[0].id
            raise CommandError(
                f"interrupted; run {run_id} goes on, queued or running, and "
                f"GET /api/runs/{run_id} gives its result once it ends"
            ) from None
        if outcome.payload is None:
            raise CommandError(
                f"run {outcome.run.id} did not finish within {options['timeout']} s; "
                f"it is queued or running, and GET /api/runs/{outcome.run.id} "
                "gives its result once it ends"
            )
        meta = outcome.payload["meta"]
        self.stdout.write(f"run {meta['run_id']}: {meta['status']}")
        for warning in outcome.run.warnings:
            self.stdout.write(f"warning: {warning}")
        if meta["error"]:
            self.stdout.write(json.dumps(meta["error"], indent=2))
        self.stdout.write("outputs:")
        outputs = _shortened(outcome.payload["outputs"], meta["run_id"])
        self.stdout.write(json.dumps(outputs, indent=2))
        if meta["breakdown"]:
            self.stdout.write(breakdown_table(meta["breakdown"]))
        self.stdout.write("\n".join(bill_lines(meta["bill"])))
        if meta["status"] != "succeeded":
            raise CommandError("the run failed")

    def _user(self, username: str):
        """Return the account ``username`` and whether this call created it.

        The account is created if missing and the name is valid.
        """
        model = get_user_model()
        field = model._meta.get_field(model.USERNAME_FIELD)
        try:
            field.run_validators(username)
            if not username:
                raise ValidationError("a user name is required")
        except ValidationError as error:
            raise CommandError(
                f"--user {username!r} is not a valid user name: "
                + " ".join(error.messages)
            ) from None
        return model.objects.get_or_create(**{model.USERNAME_FIELD: username})

    def _read_definition(self, path: Path) -> dict:
        # The file may hold a whole API body, so the cap is the API's limit on
        # a request body. Reading stops past it, so a huge file or a device
        # such as /dev/zero is rejected instead of filling the memory.
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        try:
            with path.open("rb") as file:
                data = file.read(limit + 1)
        except FileNotFoundError:
            raise CommandError(f"definition file {path} not found") from None
        except OSError as error:
            raise CommandError(f"cannot read definition file {path}: {error}") from None
        # Checked before decoding, because the read may stop inside a character.
        if len(data) > limit:
            raise CommandError(
                f"definition file {path} is over {limit} bytes (MAX_REQUEST_BYTES, "
                "the API's limit on a request body); a definition may be at most "
                f"{MAX_DEFINITION_BYTES} bytes of JSON"
            )
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise CommandError(f"cannot read definition file {path}: {error}") from None
        # The API's parser: values Python's json module reads but a run cannot
        # store (NaN, huge integers, NUL) are refused here as they are there.
        try:
            definition = parse_json_text(text, what=str(path))
        except MalformedRequest as error:
            raise CommandError(error.message) from None
        # A file holding a whole API body keeps the definition under a key.
        for key in ("specification", "definition"):
            if isinstance(definition, dict) and isinstance(definition.get(key), dict):
                return definition[key]
        if not isinstance(definition, dict):
            raise CommandError(
                f"{path} contains a JSON {type(definition).__name__}; a workflow "
                "definition is an object"
            )
        return definition

    def _read_images(self, definition: dict, specs: list[str]) -> dict[str, bytes]:
        image_inputs = [
            name
            for name, kind in _declared_inputs(definition).items()
            if kind in IMAGE_INPUT_TYPES
        ]
        uploads = {}
        # Each input's file as given, for error messages.
        self.image_paths: dict[str, str] = {}
        for spec in specs:
            name, _, path = spec.partition("=")
            if not path or Path(spec).exists():
                # A bare path, which may contain "=" itself.
                name, path = "", spec
            name = name or (image_inputs[0] if image_inputs else "image")
            if name in uploads:
                raise CommandError(f"--image gives input {name!r} twice")
            uploads[name] = _read_image(path)
            self.image_paths[name] = path
        return uploads

    def _parse_param(self, text: str) -> tuple[str, object]:
        key, separator, value = text.partition("=")
        if not separator or not key:
            raise CommandError(f"--param {text!r} must look like KEY=VALUE")
        try:
            value.encode()
        except UnicodeEncodeError:
            # Bytes of the argument that are not UTF-8, kept as surrogates.
            raise CommandError(f"--param {key}: the value is not UTF-8 text") from None
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return key, value
        except (ValueError, RecursionError):
            pass  # JSON as Python reads it; the API's parser says what is wrong.
        try:
            return key, parse_json_text(value, what=f"--param {key}")
        except MalformedRequest as error:
            # A bare NaN or 1e400 may have been meant as text.
            scalar = not value.lstrip().startswith(('"', "[", "{"))
            hint = "; quote it as a JSON string to pass it as text" if scalar else ""
            raise CommandError(error.message + hint) from None


def _read_image(path: str) -> bytes:
    """Return the bytes of an --image file, or raise CommandError.

    The API receives an image inside a request body, so the cap is the API's
    limit on a body. Reading stops past it, so a huge file, a device such as
    /dev/zero or a pipe that never ends is rejected instead of filling the
    memory.
    """
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    try:
        with open(path, "rb") as file:
            data = file.read(limit + 1)
    except OSError as error:
        raise CommandError(f"cannot read image {path}: {error}") from None
    if len(data) > limit:
        raise CommandError(
            f"--image {path} is over {limit} bytes (MAX_REQUEST_BYTES, the API's "
            "limit on a request body); give a smaller image file"
        )
    return data


# Strings in the printed outputs longer than this (base64 images, mostly)
# are cut, with a note of their length.
SHOWN_STRING_CHARS = 200


def _shortened(value, run_id: str):
    """Return ``value`` with long strings cut and marked, still valid JSON."""
    if isinstance(value, str) and len(value) > SHOWN_STRING_CHARS:
        return (
            f"{value[:SHOWN_STRING_CHARS]}... ({len(value)} characters in all; "
            f"GET /api/runs/{run_id} returns them whole)"
        )
    if isinstance(value, list):
        return [_shortened(item, run_id) for item in value]
    if isinstance(value, dict):
        return {key: _shortened(item, run_id) for key, item in value.items()}
    return value


def _declared_inputs(definition: dict) -> dict:
    """Return the definition's input types by name, skipping malformed entries.

    The compiler reports malformed inputs; these helpers only word options.
    """
    declared = definition.get("inputs")
    return {
        item.get("name"): item.get("type")
        for item in (declared if isinstance(declared, list) else [])
        if isinstance(item, dict)
    }


def _check_input_names(definition: dict, uploads: dict, parameters: dict) -> None:
    """Raise CommandError for --image or --param names the definition lacks.

    Also for a name given by both options, since the image would win silently.
    """
    kinds = {
        name: kind
        for name, kind in _declared_inputs(definition).items()
        if isinstance(name, str)
    }
    both = sorted(set(uploads) & set(parameters))
    if both:
        raise CommandError(
            f"input {both[0]!r} is given by both --image and --param; give it once"
        )
    image_names = sorted(n for n, kind in kinds.items() if kind in IMAGE_INPUT_TYPES)
    parameter_names = sorted(n for n in kinds if n not in image_names)
    for option, supplied, fitting, kind, other in (
        ("--image", uploads, image_names, "image", "--param"),
        ("--param", parameters, parameter_names, "parameter", "--image"),
    ):
        unknown = sorted(set(supplied) - set(kinds))
        if unknown:
            raise CommandError(
                f"{option} names inputs the definition does not declare: "
                f"{', '.join(unknown)}; its {kind} inputs: "
                f"{', '.join(fitting) or 'none'}"
            )
        # An image given for a parameter would be dropped without a word.
        misplaced = sorted(set(supplied) - set(fitting))
        if misplaced:
            raise CommandError(
                f"{option} names inputs that are not {kind} inputs: "
                f"{', '.join(misplaced)}; give them with {other}"
            )


def _with_cli_hint(body: dict, definition: dict, image_paths: dict[str, str]) -> dict:
    """Replace an input error's hint, written for API bodies, with the option to use.

    An error about an image file that was given names the file instead.
    """
    kinds = _declared_inputs(definition)
    field = body.get("field")
    if field not in kinds or body.get("code") != "invalid_input":
        return body
    if field in image_paths:
        named = {**body, "message": f"{body['message']} (file {image_paths[field]})"}
        named.pop("hint", None)
        return named
    if kinds[field] in IMAGE_INPUT_TYPES:
        hint = f"Give the image with --image {field}=PATH."
    else:
        hint = f"Give the value with --param {field}=VALUE (JSON, or else a string)."
    return {**body, "hint": hint}
