"""Run daphne, as ``python -m daphne`` would, with keys kept out of its log
and a cap on request bodies.

``manage.py up`` serves the live-timeline websockets with this module.
daphne's command line builds its access log from ``AccessLogGenerator``
itself, and its HTTP factory builds requests from ``WebRequest``, with no
option for other classes, so both names are replaced here before the
command line runs.
"""

from daphne import cli, http_protocol

from webapp.daphne_request import LimitedWebRequest
from webapp.log_redaction import DaphneAccessLog

if __name__ == "__main__":
    cli.AccessLogGenerator = DaphneAccessLog
    http_protocol.WebRequest = LimitedWebRequest
    cli.CommandLineInterface.entrypoint()
