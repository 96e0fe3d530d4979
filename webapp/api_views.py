"""The base class of this site's own API views (those under ``/api/``)."""

from rest_framework.views import APIView

from webapp.requests import MalformedRequest


class StrictQueryAPIView(APIView):
    """An API view that rejects query parameters other than ``api_key`` (400).

    These views read no other query parameter, so without the check a field
    sent in the query would be ignored: ``GET /api/workflows/1?version=1``
    would return the latest version, and ``?async=true`` on a run would wait
    for the result.
    """

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        unknown = sorted(set(request.GET) - {"api_key"})
        if unknown:
            raise MalformedRequest(
                f"unknown query parameters {', '.join(map(repr, unknown))[:300]}; "
                "this route takes only api_key in the query",
                context="request_parsing",
                field_name=unknown[0][:100],
                hint="Send the request's fields in its body."
                if request.method in ("POST", "PUT", "PATCH")
                else None,
            )
