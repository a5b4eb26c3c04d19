"""Settings, read from the environment (README.md lists them all).

Without ``REDIS_URL`` the server runs embedded: one process, in-memory channel
layer, SQLite, the media worker inside the web process, Celery eager.
"""

import ipaddress
import json
import os
import re
from pathlib import Path

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured

from scope_site import logs as scope_logs

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be one of 1/0/true/false/yes/no, not {raw!r}")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be a number, not {raw!r}") from exc


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_networks(name: str, default: list[str]) -> list[str]:
    """Comma-separated CIDRs (a bare address is one host), normalized."""
    try:
        return [str(ipaddress.ip_network(item, strict=False)) for item in env_list(name, default)]
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be comma-separated CIDRs such as 10.0.0.0/8: {exc}") from exc


REDIS_URL = os.environ.get("REDIS_URL", "")
SCOPE_EMBEDDED = not REDIS_URL

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not SCOPE_EMBEDDED:
        raise ImproperlyConfigured("SECRET_KEY must be set when REDIS_URL is (the scaled shape).")
    # Embedded mode is a single local process; a fixed key keeps logins across restarts.
    SECRET_KEY = "scope-embedded-insecure-key-set-SECRET_KEY-for-anything-shared"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])

# Behind a reverse proxy (README, "Production"). X-Forwarded-For/-Proto are
# believed only from these peers (scope_site/proxies.py), so
# SECURE_PROXY_SSL_HEADER, which believes anyone, stays unset.
SCOPE_TRUSTED_PROXIES = env_networks("SCOPE_TRUSTED_PROXIES", [])
# WebSocket Origins allowed besides none at all; empty: the server's own (scope_site/origins.py).
SCOPE_ALLOWED_ORIGINS = env_list("SCOPE_ALLOWED_ORIGINS", [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
SCOPE_HTTPS = env_bool("SCOPE_HTTPS", False)
if SCOPE_HTTPS:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = True
    # Probes speak plain HTTP to the process itself, not through the proxy.
    SECURE_REDIRECT_EXEMPT = [r"^healthz/?$", r"^readyz/?$", r"^metrics/?$"]
    SECURE_HSTS_SECONDS = 365 * 24 * 3600
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "sessions_app",
    "media_pipeline",
]

MIDDLEWARE = [
    # First: an oversized REST body is refused before anything else looks at the request.
    "sessions_app.middleware.RequestBodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "sessions_app.login_throttle.LoginThrottleMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "scope_site.urls"
APPEND_SLASH = False

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
            ],
        },
    },
]

ASGI_APPLICATION = "scope_site.asgi.application"

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=0,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several threads write (consumers, the embedded worker): wait for the lock
    # instead of failing, and take it up front so no reader upgrades mid-way.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
    )

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "var" / "static"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "stream"
LOGOUT_REDIRECT_URL = "stream"

# Shared by every web process when scaled: the rate limits and the login throttle count here.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "scope_site.channel_layers.ReconnectingRedisChannelLayer",
            # redis-py's default 5 s read timeout equals channels_redis's 5 s
            # blocking pop, so idle receives would fail: read for longer.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15}]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

REST_FRAMEWORK = {
    # Token first, so an unauthenticated request gets 401 with WWW-Authenticate.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # DRF's defaults, with JSON nesting bounded (sessions_app/json_limits.py).
    # The API speaks JSON only: a form or multipart body is refused (400 INVALID_MESSAGE), never half-parsed.
    "DEFAULT_PARSER_CLASSES": ["sessions_app.parsers.BoundedJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "sessions_app.api_errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

# The OpenAPI schema at /api/v1/schema/ and its browsable UI, served from this server's own files.
SPECTACULAR_SETTINGS = {
    "TITLE": "Scope server API",
    "DESCRIPTION": "Signaling over HTTP, sessions and workers. Errors read {code, detail}.",
    "VERSION": "1",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "ENUM_NAME_OVERRIDES": {
        "SessionStateEnum": "sessions_app.models.StreamSession.State",
        "WorkerStateEnum": "sessions_app.models.Worker.State",
    },
}

# Celery: Redis broker when scaled; eager (in-process) when embedded.
CELERY_BROKER_URL = REDIS_URL or "memory://"
CELERY_TASK_ALWAYS_EAGER = SCOPE_EMBEDDED
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Never give up on Redis: the worker retries it every second (scope_site/celery.py), so
# Celery's default of 100 tries would end the safety net after a two-minute outage.
CELERY_BROKER_CONNECTION_MAX_RETRIES = None

# Every process logs one line per record to stderr: JSON lines or readable text (scope_site/logs.py).
SCOPE_LOG_FORMAT = scope_logs.log_format()
LOGGING_CONFIG = "scope_site.logs.configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": scope_logs.FORMATTERS,
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": SCOPE_LOG_FORMAT}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        **scope_logs.LOGGERS,
        "aioice": {"level": "WARNING"},
        "aiortc": {"level": "WARNING"},
        "daphne": {"level": "WARNING"},
        "django.channels.server": {"level": "WARNING"},
    },
}

# --- Scope ---------------------------------------------------------------
SCOPE_MAX_SESSION_SECONDS = env_float("SCOPE_MAX_SESSION_SECONDS", 3600)
SCOPE_IDLE_TIMEOUT_SECONDS = env_float("SCOPE_IDLE_TIMEOUT_SECONDS", 10)
# A socket told ``ready`` that sends no offer this long gives its slot back (IDLE_TIMEOUT).
SCOPE_OFFER_TIMEOUT_SECONDS = env_float("SCOPE_OFFER_TIMEOUT_SECONDS", 30)
# Sockets waiting for a slot; beyond, a new one is refused NO_CAPACITY (close 4503).
SCOPE_MAX_QUEUE = int(env_float("SCOPE_MAX_QUEUE", 100))
# A session whose files its worker cannot remove closes anyway after this long (loudly).
SCOPE_CLEANUP_GIVE_UP_SECONDS = env_float("SCOPE_CLEANUP_GIVE_UP_SECONDS", 3600)
SCOPE_HEARTBEAT_SECONDS = env_float("SCOPE_HEARTBEAT_SECONDS", 2)
SCOPE_SWEEP_SECONDS = env_float("SCOPE_SWEEP_SECONDS", 2)
SCOPE_WORKER_CAPACITY = int(env_float("SCOPE_WORKER_CAPACITY", 4))
SCOPE_MAX_SESSIONS_PER_SOCKET = int(env_float("SCOPE_MAX_SESSIONS_PER_SOCKET", 4))
SCOPE_MAX_SESSIONS_PER_USER = int(env_float("SCOPE_MAX_SESSIONS_PER_USER", 16))
SCOPE_CONNECTIONS_PER_MINUTE = int(env_float("SCOPE_CONNECTIONS_PER_MINUTE", 600))
SCOPE_OFFERS_PER_MINUTE = int(env_float("SCOPE_OFFERS_PER_MINUTE", 600))
SCOPE_DEFAULT_PIPELINE = os.environ.get("SCOPE_DEFAULT_PIPELINE", "passthrough")
SCOPE_ALLOW_ANONYMOUS = env_bool("SCOPE_ALLOW_ANONYMOUS", SCOPE_EMBEDDED)
SCOPE_ICE_ENFORCE_LIST = env_list("SCOPE_ICE_ENFORCE_LIST", [])
# Remote candidates in these networks are never contacted: "this network", link-local
# (cloud metadata services live there) and multicast.
SCOPE_ICE_DENY_LIST = env_networks("SCOPE_ICE_DENY_LIST", ["0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "ff00::/8"])
# Remote ICE candidates one session may name over its life, its offer's included.
SCOPE_MAX_CANDIDATES_PER_SESSION = int(env_float("SCOPE_MAX_CANDIDATES_PER_SESSION", 32))
# WHEP viewers of one session's processed video at a time.
SCOPE_MAX_VIEWERS = int(env_float("SCOPE_MAX_VIEWERS", 8))
# torch's intra-op threads on a CPU worker: the pipeline thread shares the cores
# with the codec threads, and more threads made each op slower here, not faster.
SCOPE_TORCH_THREADS = int(env_float("SCOPE_TORCH_THREADS", 1))
# Sessions on one device running the same pipeline and parameters share a forward pass
# (media_pipeline/batching.py): how long the first frame waits for others, and how many at most.
SCOPE_BATCH_WINDOW_MS = env_float("SCOPE_BATCH_WINDOW_MS", 2)
SCOPE_MAX_BATCH = int(env_float("SCOPE_MAX_BATCH", 8))
if SCOPE_BATCH_WINDOW_MS < 0 or SCOPE_MAX_BATCH < 1:
    raise ImproperlyConfigured("SCOPE_BATCH_WINDOW_MS must be >= 0 and SCOPE_MAX_BATCH >= 1")
# Hand a received video frame to the decoder at its RTP marker bit rather than
# at the next frame's first packet (media_pipeline/jitter.py): one frame less latency.
SCOPE_RELEASE_ON_MARKER = env_bool("SCOPE_RELEASE_ON_MARKER", True)
# Encode sessions' VP8 output with libvpx set for a pipeline's picture (no denoiser, speed 12)
# instead of aiortc's camera settings (media_pipeline/encoders.py): the largest cost of a frame on a CPU.
SCOPE_PIPELINE_VP8 = env_bool("SCOPE_PIPELINE_VP8", True)
# Failed logins (the login page and the admin's) before a 429, and for how long they count.
SCOPE_LOGIN_FAILURES_PER_USERNAME = int(env_float("SCOPE_LOGIN_FAILURES_PER_USERNAME", 5))
SCOPE_LOGIN_FAILURES_PER_ADDRESS = int(env_float("SCOPE_LOGIN_FAILURES_PER_ADDRESS", 20))
SCOPE_LOGIN_LOCKOUT_SECONDS = env_float("SCOPE_LOGIN_LOCKOUT_SECONDS", 900)
# Closed sessions and their events are deleted this many days after closing; 0 keeps them.
SCOPE_RETENTION_DAYS = env_float("SCOPE_RETENTION_DAYS", 30)
SCOPE_SESSION_FILES_DIR = Path(os.environ.get("SCOPE_SESSION_FILES_DIR", BASE_DIR / "var" / "sessions"))
# How long negotiation (offer → answer) and teardown may take before giving up.
SCOPE_NEGOTIATION_TIMEOUT_SECONDS = env_float("SCOPE_NEGOTIATION_TIMEOUT_SECONDS", 10)
SCOPE_CLOSE_WAIT_SECONDS = env_float("SCOPE_CLOSE_WAIT_SECONDS", 2)
# Metrics (sessions_app/metrics.py): GET /metrics on web processes, and a media worker's own
# endpoint on SCOPE_METRICS_PORT (0: none) at SCOPE_METRICS_BIND. Readable without logging in
# from SCOPE_METRICS_ALLOW (staff users from anywhere, on the web process).
SCOPE_METRICS_ALLOW = env_networks("SCOPE_METRICS_ALLOW", ["127.0.0.0/8", "::1/128"])
SCOPE_METRICS_PORT = int(env_float("SCOPE_METRICS_PORT", 0))
if not 0 <= SCOPE_METRICS_PORT <= 65535:
    raise ImproperlyConfigured(f"SCOPE_METRICS_PORT must be a TCP port (0: off), not {SCOPE_METRICS_PORT}")
SCOPE_METRICS_BIND = os.environ.get("SCOPE_METRICS_BIND", "127.0.0.1").strip() or "127.0.0.1"
# Webhooks (sessions_app/webhooks.py): one POST's whole bound, and retries 1, 2, 4 … × the base until the last attempt.
SCOPE_WEBHOOK_TIMEOUT_SECONDS = env_float("SCOPE_WEBHOOK_TIMEOUT_SECONDS", 5)
SCOPE_WEBHOOK_RETRY_BASE_SECONDS = env_float("SCOPE_WEBHOOK_RETRY_BASE_SECONDS", 1)
SCOPE_WEBHOOK_MAX_ATTEMPTS = int(env_float("SCOPE_WEBHOOK_MAX_ATTEMPTS", 8))

try:
    SCOPE_ICE_SERVERS = json.loads(os.environ.get("SCOPE_ICE_SERVERS", "[]"))
except json.JSONDecodeError as exc:
    raise ImproperlyConfigured(f"SCOPE_ICE_SERVERS must be a JSON list: {exc}") from exc
if not isinstance(SCOPE_ICE_SERVERS, list):
    raise ImproperlyConfigured("SCOPE_ICE_SERVERS must be a JSON list")

# TURN with short-lived credentials (coturn's use-auth-secret): sessions_app/turn.py.
SCOPE_TURN_URLS = env_list("SCOPE_TURN_URLS", [])
SCOPE_TURN_SECRET = os.environ.get("SCOPE_TURN_SECRET", "")
SCOPE_TURN_TTL_SECONDS = env_float("SCOPE_TURN_TTL_SECONDS", 600)
for _url in SCOPE_TURN_URLS:
    if not re.fullmatch(r"turns?:[^?\s/]+(\?transport=(udp|tcp))?", _url):
        raise ImproperlyConfigured(f"SCOPE_TURN_URLS: {_url!r} is not a turn: or turns: URL such as "
                                   "turn:turn.example.com:3478?transport=udp")
if bool(SCOPE_TURN_URLS) != bool(SCOPE_TURN_SECRET):
    raise ImproperlyConfigured("SCOPE_TURN_URLS and SCOPE_TURN_SECRET go together: set both or neither")
if SCOPE_TURN_TTL_SECONDS < 1:
    raise ImproperlyConfigured("SCOPE_TURN_TTL_SECONDS must be at least 1")

# The safety-net sweep and the daily prune (sessions_app.tasks); embedded mode runs both on an in-process timer instead.
CELERY_BEAT_SCHEDULE = {
    "sweep": {"task": "sessions_app.sweep", "schedule": SCOPE_SWEEP_SECONDS},
    "prune-sessions": {"task": "sessions_app.prune_sessions", "schedule": crontab(hour=3, minute=0)},
}
