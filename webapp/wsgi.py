import os
import signal
import threading

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


def _answer_waiting_requests_on_stop() -> None:
    """Let SIGTERM end the waits of synchronous run requests first.

    gunicorn's worker handles SIGTERM by finishing the requests it is
    serving, but a request waiting for a run can wait minutes, longer than
    ``manage.py up`` gives the worker before killing it, and its client then
    got no response at all. This handler, chained before gunicorn's, ends
    those waits, and such requests respond at once with the run's URL (202).
    The run stays queued for the next start. gunicorn installs its handlers
    before it imports this module, in the worker's main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def stop_waiting(signum, frame):
        from runner.dispatch import stopping

        stopping.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, stop_waiting)


_warm_up()
_answer_waiting_requests_on_stop()
