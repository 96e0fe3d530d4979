"""The smallest Django and DRF application that accepts a workflow request.

``bench/overhead.py`` serves it with the same gunicorn options as
``manage.py up`` and times it like glassbox's detection requests. Its one
view parses the JSON body and returns a constant, so its latency is the floor
of the stack glassbox is built on (gunicorn, Django, DRF), below which no
work in glassbox's web server, Redis or runner can go. It has no
middleware, no database and no authentication.
"""

import json

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="benchmark floor application, serves only 127.0.0.1",
    ALLOWED_HOSTS=["127.0.0.1"],
    ROOT_URLCONF=__name__,
    INSTALLED_APPS=["rest_framework"],
    MIDDLEWARE=[],
    DATA_UPLOAD_MAX_MEMORY_SIZE=None,
    REST_FRAMEWORK={
        "DEFAULT_AUTHENTICATION_CLASSES": [],
        "DEFAULT_PERMISSION_CLASSES": [],
        "UNAUTHENTICATED_USER": None,
    },
)

import django  # noqa: E402

django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402
from rest_framework.views import APIView  # noqa: E402


class ParseOnlyView(APIView):
    def post(self, request):
        json.loads(request.body)
        return HttpResponse(b'{"outputs":[]}', content_type="application/json")


urlpatterns = [path("workflows/run", ParseOnlyView.as_view())]

application = get_wsgi_application()
