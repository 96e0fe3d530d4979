"""The shape of API keys, known to the token model and to the log filters.

This module imports nothing from Django, so gunicorn can load the log
filters before Django is set up.
"""

# Every key starts with this prefix, followed by token_urlsafe characters.
TOKEN_PREFIX = "gbx_"
