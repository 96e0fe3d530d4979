import time


class RequestClockMiddleware:
    """Stamp each request with a monotonic start time for the timing breakdown.

    Listed first so the ``request`` component includes the other middleware.
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.started_ns = time.perf_counter_ns()
        return self.get_response(request)
