"""The one settings file. Everything comes from the environment; the defaults
run a development site as-is (SQLite, in-memory channel layer, the bundled
model served on loopback)."""

import os
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    word = value.strip().lower()
    # A typo ("ture", "of") must not quietly become False: DEBUG and the
    # HTTPS settings hang on these.
    if word not in TRUE_WORDS | FALSE_WORDS:
        raise ImproperlyConfigured(f"{name}={value!r}: use 1/0, true/false, yes/no or on/off.")
    return word in TRUE_WORDS


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


Number = TypeVar("Number", int, float)


def env_number(name: str, default: Number, parse: type[Number], what: str) -> Number:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return parse(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={value!r}: use {what}.") from None


def env_float(name: str, default: float) -> float:
    return env_number(name, default, float, "a number")


def env_int(name: str, default: int) -> int:
    return env_number(name, default, int, "a whole number")


DEBUG = env_bool("DEBUG", True)

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set SECRET_KEY: it is required when DEBUG is off.")
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "conversations",
    "review",
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "chatsite.middleware.content_security_policy",
    # Last, as axes asks: it turns a lockout flagged during authenticate()
    # into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "chatsite.urls"

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

WSGI_APPLICATION = None
ASGI_APPLICATION = "chatsite.asgi.application"

# Persistent connections leak under ASGI: every request runs in its own
# thread, so conn_max_age stays 0 whatever the URL says. Postgres gets a
# connection pool instead (Django's own, psycopg_pool): without one, every
# ORM call of every socket opened a connection (a TCP and auth round trip,
# about 1 ms of CPU), some seventy a second under the soak.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}", conn_max_age=0
    )
}
DATABASE_POOL_SIZE = env_int("DATABASE_POOL_SIZE", 20)
DATABASE_POOL_TIMEOUT = env_float("DATABASE_POOL_TIMEOUT", 5.0)
if DATABASE_POOL_SIZE < 0:
    raise ImproperlyConfigured(f"DATABASE_POOL_SIZE={DATABASE_POOL_SIZE}: use 0 (no pool) or more.")
if DATABASE_POOL_TIMEOUT <= 0:
    raise ImproperlyConfigured(
        f"DATABASE_POOL_TIMEOUT={DATABASE_POOL_TIMEOUT}: use a number of seconds above 0."
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and DATABASE_POOL_SIZE:
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": min(2, DATABASE_POOL_SIZE),
        "max_size": DATABASE_POOL_SIZE,
        # How long a request waits for a free connection before it fails
        # (psycopg_pool.PoolTimeout, an OperationalError, which the reply
        # saver retries): a full pool is an error, not a hang.
        "timeout": DATABASE_POOL_TIMEOUT,
    }
    # A connection the server dropped (a restart) is found out when it is
    # taken, not by the query that uses it.
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE makes concurrent writers queue instead of failing to upgrade
    # a read lock; WAL lets readers go on while a reply is being saved.
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"].setdefault("TEST", {})["NAME"] = None

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "")
# Namespaces this site's keys, so that several sites (or test runs) can
# share one Redis without reading each other's counters and groups.
REDIS_PREFIX = os.environ.get("REDIS_PREFIX", "chatsite")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "conversations.layers.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 times reads out after 5 s by default, which is
                # exactly how long channels-redis blocks waiting for a message.
                # RESP2: on RESP3, redis-py 8's asyncio pool hands out a pooled
                # connection the server closed without checking it, so after
                # Redis restarts each one fails once (redis/redis-py#4128).
                "hosts": [{"address": REDIS_URL, "socket_timeout": 30, "protocol": 2}],
                # A fast reply to a slow reader must not overflow a channel:
                # channels-redis drops messages past capacity without a word.
                "capacity": env_int("CHANNEL_CAPACITY", 5000),
                "expiry": 60,
                "group_expiry": 86400,
                "prefix": f"{REDIS_PREFIX}:asgi",
            },
        }
    }
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": REDIS_PREFIX,
            # One pool for the process, not one per async context (there).
            "OPTIONS": {"pool_class": "chatsite.redispool.SharedConnectionPool"},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env_int("CHANNEL_CAPACITY", 5000), "expiry": 60},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "conversations:chat"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
# WhiteNoise serves static files under daphne too; in DEBUG it reads them
# straight from the finders, so collectstatic is only needed with DEBUG off.
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG

if not DEBUG:
    SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)
    CSRF_COOKIE_SECURE = env_bool("SECURE_COOKIES", True)


# The model server. OLLAMA_HOST takes Ollama's own forms ("host:port",
# "http://host:port"); LLM_BASE_URL is any OpenAI-compatible base URL and
# wins when both are set. With neither, `manage.py serve` starts the bundled
# model and sets LLM_BASE_URL for the site.
def _ollama_base_url(host: str) -> str:
    host = host.strip().rstrip("/")
    if "://" not in host:
        host = f"http://{host}"
    scheme, _, rest = host.partition("://")
    if ":" not in rest.rsplit("]", 1)[-1] and "/" not in rest:
        rest = f"{rest}:11434"
    return f"{scheme}://{rest}/v1"


OLLAMA_HOST = os.environ.get("OLLAMA_HOST", "")
LLM_BASE_URL = os.environ.get("LLM_BASE_URL") or _ollama_base_url(
    OLLAMA_HOST or "http://127.0.0.1:11434"
)
# Ollama and llama.cpp ignore the key, but the openai client insists on one.
LLM_API_KEY = os.environ.get("LLM_API_KEY", "") or "not-needed"
# Empty means "the first model the server lists".
DEFAULT_MODEL = os.environ.get("DEFAULT_MODEL") or (
    "llama3.2" if OLLAMA_HOST else "" if os.environ.get("LLM_BASE_URL") else "smollm2"
)
LLM_CONNECT_TIMEOUT = env_float("LLM_CONNECT_TIMEOUT", 5.0)
# Seconds to wait for the first token of an answer (a CPU server may spend a
# minute loading its model or reading a long prompt), then for each later chunk.
LLM_FIRST_TOKEN_TIMEOUT = env_float("LLM_FIRST_TOKEN_TIMEOUT", 120.0)
LLM_READ_TIMEOUT = env_float("LLM_READ_TIMEOUT", 120.0)
if min(LLM_FIRST_TOKEN_TIMEOUT, LLM_READ_TIMEOUT) <= 0:
    raise ImproperlyConfigured("LLM_FIRST_TOKEN_TIMEOUT and LLM_READ_TIMEOUT must be positive.")
LLM_MODELS_CACHE_SECONDS = env_float("LLM_MODELS_CACHE_SECONDS", 10.0)
# For models whose template opens <think> itself: how many characters of an
# answer without <think> to hold back for a </think> (0: none; see llm.py).
LLM_THINK_UNDECIDED_CHARS = env_int("LLM_THINK_UNDECIDED_CHARS", 0)

# Chat behaviour.
CHAT_CONTEXT_BUDGET = env_int("CHAT_CONTEXT_BUDGET", 6000)  # tokens, roughly 4 characters each
CHAT_COALESCE_MS = env_int("CHAT_COALESCE_MS", 30)
CHAT_SAVE_INTERVAL = env_float("CHAT_SAVE_INTERVAL", 1.0)
CHAT_MAX_CONTENT = 32_000
CHAT_RATE_LIMIT = env_int("CHAT_RATE_LIMIT", 30)  # sends per user per minute
# Replies being written at once, per user and on the whole site (0: no
# site cap). A site cap protects one model server, which queues or thrashes
# past a few parallel streams.
CHAT_MAX_REPLIES_PER_USER = env_int("CHAT_MAX_REPLIES_PER_USER", 3)
CHAT_MAX_REPLIES = env_int("CHAT_MAX_REPLIES", 16)
# A reply's length: the most options.max_tokens may ask for, the max_tokens
# sent when a client asks for none, and where a reply is cut whatever the
# model server does (tokens counted as streamed chunks); and in characters.
CHAT_MAX_TOKENS = env_int("CHAT_MAX_TOKENS", 32_000)
CHAT_MAX_REPLY_CHARS = env_int("CHAT_MAX_REPLY_CHARS", 200_000)
# Seconds a reply may take in all, however steadily the server streams
# (LLM_READ_TIMEOUT is per read).
CHAT_REPLY_DEADLINE = env_float("CHAT_REPLY_DEADLINE", 600.0)
# After a conversation's first reply, ask the model for a short title in the
# background (conversations/titles.py); off, the first message names it.
CHAT_SUGGEST_TITLES = env_bool("CHAT_SUGGEST_TITLES", True)
# Frames a socket may send: CHAT_FRAME_RATE a second on average, in bursts of
# up to CHAT_FRAME_BURST; past that they are refused, and a socket that goes
# on for another CHAT_FRAME_BURST refused frames is closed (4004).
CHAT_FRAME_RATE = env_float("CHAT_FRAME_RATE", 10.0)
CHAT_FRAME_BURST = env_int("CHAT_FRAME_BURST", 40)
# Bytes a socket may leave unread before its sends wait for the client, and
# how long they wait before the socket is closed as too slow (4002).
CHAT_SEND_BUFFER = env_int("CHAT_SEND_BUFFER", 4 * 1024 * 1024)
CHAT_SEND_TIMEOUT = env_float("CHAT_SEND_TIMEOUT", 10.0)
if min(CHAT_FRAME_RATE, CHAT_FRAME_BURST, CHAT_SEND_BUFFER, CHAT_SEND_TIMEOUT) <= 0:
    raise ImproperlyConfigured(
        "CHAT_FRAME_RATE, CHAT_FRAME_BURST, CHAT_SEND_BUFFER and CHAT_SEND_TIMEOUT"
        " must be positive."
    )
# Tell owners on their conversation's page that staff opened it, and when
# (the access log keeps who; the owner is not told).
CHAT_SHOW_REVIEWS = env_bool("CHAT_SHOW_REVIEWS", True)
# The largest file the account page imports (issue 12, item 10): a whole
# number of bytes, nothing else ("10MB" would be a typo found too late).
_import_max = os.environ.get("CHAT_IMPORT_MAX_BYTES", "").strip() or str(10 * 1024 * 1024)
if not (_import_max.isascii() and _import_max.isdigit()) or int(_import_max) <= 0:
    raise ImproperlyConfigured(
        f"CHAT_IMPORT_MAX_BYTES={_import_max!r}: use a positive whole number of bytes."
    )
CHAT_IMPORT_MAX_BYTES = int(_import_max)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {"daphne": {"level": "WARNING"}, "httpx2": {"level": "WARNING"}},
}

# A traceback page (DEBUG, or the error mails) shows settings and local
# variables: credentials inside URLs (REDIS_URL, LLM_BASE_URL, ...) are masked.
DEFAULT_EXCEPTION_REPORTER_FILTER = "chatsite.debug.CredentialsFilter"

# Login brute force (django-axes). Failures count per IP and, separately,
# per username, in the database, so every process and both databases share
# them. Counting per username means anyone can keep a name locked out by
# guessing at it; that is the price of stopping a guesser who spreads over
# many addresses, and the cost is bounded: the lock lifts after the cool-off,
# it only blocks the password form (open sessions and API tokens keep
# working), and an admin lifts it at once (`manage.py axes_reset_username`).
# LOGIN_LOCKOUT_PER_USERNAME=0 counts per (username, IP) pair instead.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("LOGIN_FAILURE_LIMIT", 10)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("LOGIN_COOLOFF_MINUTES", 15))
if AXES_FAILURE_LIMIT < 1 or AXES_COOLOFF_TIME.total_seconds() < 60:
    # axes reads a zero cool-off as "locked until an admin unlocks".
    raise ImproperlyConfigured("LOGIN_FAILURE_LIMIT and LOGIN_COOLOFF_MINUTES must be at least 1.")
AXES_LOCKOUT_PARAMETERS = (
    ["ip_address", "username"]
    if env_bool("LOGIN_LOCKOUT_PER_USERNAME", True)
    else ["ip_address", ["username", "ip_address"]]
)
AXES_LOCKOUT_CALLABLE = "conversations.views.locked_out"
# Every successful login would add a row that nothing ever removes.
AXES_DISABLE_ACCESS_LOG = True
# Accounts one IP address may create per hour (0: no limit).
SIGNUP_RATE_LIMIT = env_int("SIGNUP_RATE_LIMIT", 5)

# The page's script reads the CSRF token from the page, never the cookie.
CSRF_COOKIE_HTTPONLY = True

# HTTPS, for a site behind a TLS proxy (see README, "Production").
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    # Only behind a proxy that sets this header itself, whatever the client sent.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
