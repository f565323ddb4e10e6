"""The settings file reads the environment strictly: what a value turns into,
and a bad value is an error naming the setting, never a quiet default. Each
case imports the settings in a fresh interpreter, as a site starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = "postgres://chat@db.example:5432/chatsite"  # parsed only, never reached

READ = """
import json
from chatsite import settings
db = settings.DATABASES["default"]
print(json.dumps({"options": db.get("OPTIONS", {}), "health": db["CONN_HEALTH_CHECKS"]
                  if "CONN_HEALTH_CHECKS" in db else None}))
"""


def read_settings(**environ: str) -> subprocess.CompletedProcess:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "DJANGO_", "CHANNEL_", "REDIS_"))
    }
    env.update(environ)
    return subprocess.run(
        [sys.executable, "-c", READ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def database(**environ: str) -> dict:
    result = read_settings(**environ)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_postgres_connections_come_from_a_pool_of_the_size_asked():
    db = database(DATABASE_URL=POSTGRES, DATABASE_POOL_SIZE="7", DATABASE_POOL_TIMEOUT="2.5")
    assert db["options"]["pool"] == {"min_size": 2, "max_size": 7, "timeout": 2.5}
    assert db["health"] is True


def test_postgres_has_a_pool_by_default_and_none_when_its_size_is_0():
    assert database(DATABASE_URL=POSTGRES)["options"]["pool"]["max_size"] == 20
    assert "pool" not in database(DATABASE_URL=POSTGRES, DATABASE_POOL_SIZE="0")["options"]


def test_sqlite_is_not_pooled():
    options = database(DATABASE_POOL_SIZE="7")["options"]
    assert "pool" not in options and options["transaction_mode"] == "IMMEDIATE"


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("DATABASE_POOL_SIZE", "lots", "DATABASE_POOL_SIZE='lots': use a whole number"),
        ("DATABASE_POOL_SIZE", "-1", "DATABASE_POOL_SIZE=-1: use 0 (no pool) or more"),
        ("DATABASE_POOL_TIMEOUT", "soon", "DATABASE_POOL_TIMEOUT='soon': use a number"),
        ("DATABASE_POOL_TIMEOUT", "0", "DATABASE_POOL_TIMEOUT=0.0: use a number of seconds"),
        ("CHANNEL_CAPACITY", "5k", "CHANNEL_CAPACITY='5k': use a whole number"),
    ],
)
def test_a_bad_number_is_an_error_naming_the_setting(name, value, says):
    environ = {"DATABASE_URL": POSTGRES, "REDIS_URL": "redis://127.0.0.1:6379/0", name: value}
    result = read_settings(**environ)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and says in result.stderr
