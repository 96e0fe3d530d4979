"""Run daphne, as ``python -m daphne`` would, with keys kept out of its log.

``manage.py up`` serves the live-timeline websockets with this module.
daphne's command line builds its access log from ``AccessLogGenerator``
itself and has no option for another class, so that name is replaced here
before the command line runs.
"""

from daphne import cli

from webapp.log_redaction import DaphneAccessLog

if __name__ == "__main__":
    cli.AccessLogGenerator = DaphneAccessLog
    cli.CommandLineInterface.entrypoint()
