"""Fixtures only; the helpers tests import are in tests/helpers.py."""

import copy
import math
import time
import uuid
from types import SimpleNamespace

import pytest

from conversations import llm, ratelimit
from tests.fake_llm import FakeLLM
from tests.helpers import PASSWORD, free_port


@pytest.fixture(autouse=True)
def own_cache(settings):
    """A Redis cache shared across runs would carry rate-limit counters from
    one test's users into the next: every test gets its own key prefix (or
    its own local-memory cache)."""
    caches = copy.deepcopy(settings.CACHES)
    # The local-memory cache lives as long as the process: a LOCATION of
    # its own makes it a new one (sign-ups per IP are counted there).
    key = "KEY_PREFIX" if settings.REDIS_URL else "LOCATION"
    caches["default"][key] = f"test-{uuid.uuid4().hex}"
    settings.CACHES = caches


@pytest.fixture(autouse=True)
def one_rate_window(monkeypatch):
    """The send limit counts in fixed one-minute windows: a test that sends
    up to CHAT_RATE_LIMIT and then once more saw the count start again
    whenever the minute turned between its sends (seen in CI). In-process
    tests count in the middle of one window, however long they take;
    test_ratelimit.py passes its own times."""
    now = time.time()
    middle = math.floor(now / ratelimit.WINDOW) * ratelimit.WINDOW + ratelimit.WINDOW / 2
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: middle))


@pytest.fixture(autouse=True)
def no_model_server(settings):
    """By default the model server is a closed loopback port: no test can
    reach a real server by accident."""
    settings.LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    settings.DEFAULT_MODEL = "fake"
    llm.forget_models()
    yield
    llm.forget_models()


@pytest.fixture(autouse=True)
def no_suggested_titles(settings):
    """A suggested title is one more request to the model server and one more
    frame after a reply's end: off, unless a test is about it (test_titles.py
    turns it on), so other tests see exactly the requests and frames they make."""
    settings.CHAT_SUGGEST_TITLES = False


@pytest.fixture(scope="session")
def fake_llm_server():
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_llm_server, settings, no_model_server):
    settings.LLM_BASE_URL = fake_llm_server.base_url
    fake_llm_server.reset()
    return fake_llm_server


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password=PASSWORD)


@pytest.fixture
def bob(django_user_model):
    return django_user_model.objects.create_user("bob", password=PASSWORD)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran against a live site (tests/live.Site) shows
    the end of that site's server logs: CI keeps nothing else of them."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for name in ("site", "live_site", "sites"):
        site = item.funcargs.get(name) if hasattr(item, "funcargs") else None
        for log in getattr(site, "logs", None) or []:
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            report.sections.append((f"{log.name}, its last 6,000 characters", text[-6000:]))
