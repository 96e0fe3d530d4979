import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
application = get_wsgi_application()


def _warm_up() -> None:
    """Do the first request's one-time set-up as the worker starts, not in it.

    Resolving the first URL imports every view, about 40 ms on a 2-core VM,
    and the first image check loads PIL's format plugins, about 5 ms. A
    gunicorn worker imports this module once, before it serves anything.
    """
    from django.urls import resolve
    from PIL import Image

    resolve("/info")
    Image.init()


_warm_up()
