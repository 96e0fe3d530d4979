"""Issue an API token for a user from the command line, for headless set-ups."""

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from webapp.management.database import check_database
from webapp.models import ApiToken

MAX_NAME_CHARS = ApiToken._meta.get_field("name").max_length


class Command(BaseCommand):
    help = (
        "Issue an API token for an existing user and print its key. The key "
        "is shown only this once; the database stores its hash."
    )

    def add_arguments(self, parser):
        parser.add_argument("username", help="The user the token acts as.")
        parser.add_argument(
            "--name",
            default="command line",
            help="A label for the token, shown on the tokens page (default: "
            "'command line').",
        )

    def handle(self, *args, username: str, name: str, **options):
        check_database()
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(
                f"user '{username}' not found; create it first with "
                "'python manage.py createsuperuser' or in the admin"
            )
        if not user.is_active:
            raise CommandError(f"user '{username}' is inactive")
        if not name.strip():
            raise CommandError(
                "--name is empty or only spaces; give a label such as 'ci', or "
                "leave the option out for 'command line'"
            )
        if len(name) > MAX_NAME_CHARS:
            raise CommandError(
                f"--name is {len(name)} characters long; the limit is {MAX_NAME_CHARS}"
            )
        try:
            name.encode()
        except UnicodeEncodeError:
            # Python keeps bytes of an argument that are not UTF-8 as lone
            # surrogates, which the check below would call unprintable.
            raise CommandError(
                "--name is not UTF-8 text; check the terminal's encoding"
            ) from None
        # As on the tokens page, which drops them: PostgreSQL cannot store
        # U+0000, and the others would garble the tokens page.
        for position, character in enumerate(name):
            if not character.isprintable():
                raise CommandError(
                    f"--name contains the unprintable character "
                    f"U+{ord(character):04X} at position {position}; use "
                    "letters, digits, spaces and punctuation"
                )
        _, key = ApiToken.issue(user, name)
        # Only the key on stdout, so scripts can capture it.
        self.stdout.write(key)
