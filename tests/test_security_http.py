"""Issue 9, the HTTP side: login lockout and sign-up throttle (item 3), no
credentials on a traceback page and no DEBUG beyond loopback (item 7), and
the smaller holes of item 10 (admin CSP, HTTPS settings, HttpOnly CSRF
cookie, look-alike user names, a JSON 404 for a missing conversation)."""

import os
import subprocess
import sys
import urllib.error
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError
from django.test import Client
from django.urls import path, reverse

from tests.helpers import PASSWORD
from tests.live import ROOT, Browser, running_site

pytestmark = pytest.mark.django_db

WRONG = "not the password"


def boom(request):
    raise RuntimeError("a view that fails")


# The raising view, for the traceback page (@pytest.mark.urls(__name__)).
urlpatterns = [path("boom/", boom)]


def log_in(client: Client, url: str, username: str, password: str, ip: str = "10.0.0.1"):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=ip)


def logged_in_as(client: Client) -> str | None:
    return client.session.get("_auth_user_id")


# ------------------------------------------------- item 3: login lockout

ADMIN_LOGIN = "/admin/login/"


def site_login() -> str:
    return reverse("login")


@pytest.mark.parametrize("url", [site_login, lambda: ADMIN_LOGIN], ids=["site", "admin"])
def test_sixty_wrong_passwords_then_the_right_one_is_refused(client, admin_user, url):
    for _ in range(60):
        log_in(client, url(), admin_user.username, WRONG)

    response = log_in(client, url(), admin_user.username, "password")

    assert response.status_code == 429
    assert logged_in_as(client) is None
    page = response.content.decode()
    assert "Too many failed logins" in page
    assert "paused for 15 minutes" in page


def test_a_username_is_locked_out_from_every_address(client, alice):
    for attempt in range(10):
        log_in(client, site_login(), "alice", WRONG, ip=f"10.0.1.{attempt}")

    response = log_in(client, site_login(), "alice", PASSWORD, ip="10.0.2.1")

    assert response.status_code == 429
    assert logged_in_as(client) is None


def test_an_address_guessing_at_many_names_is_locked_out_for_every_name(client, alice):
    for attempt in range(10):
        log_in(client, site_login(), f"someone-{attempt}", WRONG, ip="10.0.3.1")

    response = log_in(client, site_login(), "alice", PASSWORD, ip="10.0.3.1")

    assert response.status_code == 429
    assert logged_in_as(client) is None
    # Another address logs alice in as usual.
    response = log_in(client, site_login(), "alice", PASSWORD, ip="10.0.3.2")
    assert response.status_code == 302
    assert logged_in_as(client) == str(alice.pk)


def test_nine_wrong_passwords_still_let_the_right_one_in(client, alice):
    for _ in range(9):
        log_in(client, site_login(), "alice", WRONG)

    response = log_in(client, site_login(), "alice", PASSWORD)

    assert response.status_code == 302
    assert logged_in_as(client) == str(alice.pk)


def test_the_lockout_ends_after_the_cool_off(client, alice):
    from axes.models import AccessAttempt

    for _ in range(10):
        log_in(client, site_login(), "alice", WRONG)
    assert log_in(client, site_login(), "alice", PASSWORD).status_code == 429

    # As if the last failure were 15 minutes and a second old.
    for attempt in AccessAttempt.objects.all():
        attempt.attempt_time -= timedelta(minutes=15, seconds=1)
        attempt.save()

    response = log_in(client, site_login(), "alice", PASSWORD)
    assert response.status_code == 302
    assert logged_in_as(client) == str(alice.pk)


def test_a_locked_out_user_keeps_their_api_tokens(client, alice):
    from conversations.models import ApiToken

    _, plain = ApiToken.issue(alice, "script")
    for _ in range(10):
        log_in(client, site_login(), "alice", WRONG)

    assert ApiToken.objects.authenticate(plain).user == alice


# ------------------------------------------------- item 3: sign-up throttle


def sign_up(client: Client, username: str, ip: str = "10.0.4.1"):
    fields = {"username": username, "password1": PASSWORD, "password2": PASSWORD}
    return client.post(reverse("signup"), fields, REMOTE_ADDR=ip)


def test_an_address_creates_five_accounts_an_hour_then_is_refused(settings):
    settings.SIGNUP_RATE_LIMIT = 5
    for number in range(5):
        assert sign_up(Client(), f"user{number}").status_code == 302

    response = sign_up(Client(), "user5")

    assert response.status_code == 429
    assert "Too many accounts were created from your network" in response.content.decode()
    assert not get_user_model().objects.filter(username="user5").exists()
    # Another address is not held back.
    assert sign_up(Client(), "user6", ip="10.0.4.2").status_code == 302


def test_a_refused_sign_up_does_not_count_against_the_address(settings):
    settings.SIGNUP_RATE_LIMIT = 1
    mismatched = {"username": "carol", "password1": PASSWORD, "password2": "other"}
    for _ in range(3):
        Client().post(reverse("signup"), mismatched, REMOTE_ADDR="10.0.4.3")

    assert sign_up(Client(), "carol", ip="10.0.4.3").status_code == 302


# ------------------------------------------------- item 10: look-alike names


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("\u0430lice", id="cyrillic-a"),
        pytest.param("Alice", id="case"),
        pytest.param("ALICE", id="upper-case"),
        pytest.param("\uff41lice", id="fullwidth-a"),
        pytest.param("a1ice", id="digit-one-for-l"),
    ],
)
def test_a_name_that_looks_like_an_existing_one_is_refused(client, alice, name):
    response = sign_up(client, name)

    assert response.status_code == 200
    errors = response.context["form"].errors["username"]
    assert errors, "the form took the name"
    assert not get_user_model().objects.filter(username=name).exists()


def test_a_look_alike_name_is_told_what_it_looks_like(client, alice):
    response = sign_up(client, "\u0430lice")

    assert "looks too much like an existing user" in response.content.decode()


def test_a_name_in_another_script_that_looks_like_nothing_is_taken(client, alice):
    assert sign_up(client, "\u0430\u043d\u044f").status_code == 302  # "аня"


# ------------------------------------------------- item 7: the traceback page

REDIS_PASSWORD = "redis-s3cret-pw"
LLM_PASSWORD = "llm-s3cret-pw"


@pytest.mark.urls(__name__)
def test_the_debug_page_shows_no_password_inside_a_url(settings):
    redis_url = f"redis://default:{REDIS_PASSWORD}@127.0.0.1:6379/0"
    settings.DEBUG = True
    settings.REDIS_URL = redis_url
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"hosts": [{"address": redis_url}]},
        }
    }
    settings.LLM_BASE_URL = f"https://me:{LLM_PASSWORD}@models.example.com/v1"
    client = Client(raise_request_exception=False)

    response = client.get("/boom/", HTTP_ACCEPT="text/html")

    assert response.status_code == 500
    page = response.content.decode()
    assert "a view that fails" in page  # it is the technical page
    assert REDIS_PASSWORD not in page
    assert LLM_PASSWORD not in page
    # The rest of each URL still says which server it was.
    assert "redis://default:********************@127.0.0.1:6379/0" in page
    assert "https://me:********************@models.example.com/v1" in page


def test_the_filter_masks_passwords_in_nested_settings_and_leaves_other_urls():
    from chatsite.debug import CredentialsFilter

    cleansed = CredentialsFilter().cleanse_setting(
        "CACHES",
        {"default": {"LOCATION": "rediss://:pw@cache:6380/1", "OTHER": ("http://host/a:b@c",)}},
    )

    assert cleansed["default"]["LOCATION"] == "rediss://:********************@cache:6380/1"
    assert cleansed["default"]["OTHER"] == ("http://host/a:b@c",)


# ------------------------------------------------- item 7: serve's DEBUG


def serve_env(host: str, **environ: str) -> dict[str, str]:
    from conversations.management.commands.serve import site_environment

    return site_environment(host, environ)


def test_serve_on_every_interface_runs_with_debug_off():
    env = serve_env("0.0.0.0", SECRET_KEY="k" * 50)

    assert env["DEBUG"] == "0"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_serve_on_loopback_leaves_debug_as_it_is(host):
    assert "DEBUG" not in serve_env(host)


def test_serve_beyond_loopback_keeps_an_explicit_debug():
    assert serve_env("0.0.0.0", DEBUG="1")["DEBUG"] == "1"


def test_serve_beyond_loopback_without_a_secret_key_refuses_clearly():
    with pytest.raises(CommandError, match="set SECRET_KEY"):
        serve_env("192.168.1.20")


def test_serve_on_one_address_answers_to_it_unless_told_otherwise(settings):
    settings.ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
    env = serve_env("192.168.1.20", SECRET_KEY="k" * 50)
    assert env["ALLOWED_HOSTS"] == "localhost,127.0.0.1,192.168.1.20"
    told = serve_env("192.168.1.20", SECRET_KEY="k" * 50, ALLOWED_HOSTS="chat.example.com")
    assert told["ALLOWED_HOSTS"] == "chat.example.com"


def manage(*args: str, **environ: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"DEBUG", "SECRET_KEY"}}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**env, **environ},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_manage_serve_on_every_interface_without_a_secret_key_says_what_to_do(tmp_path):
    result = manage("serve", "--host", "0.0.0.0", "--no-model", "--log-dir", str(tmp_path))

    assert result.returncode != 0
    assert "set SECRET_KEY" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------- item 10: admin CSP


def test_admin_pages_have_a_content_security_policy(admin_client, alice):
    from chatsite.middleware import CONTENT_SECURITY_POLICY

    pages = [
        "/admin/",
        reverse("admin:auth_user_changelist"),
        reverse("admin:auth_user_change", args=[alice.pk]),
        reverse("admin:conversations_conversation_changelist"),
        # A form page: conversations can no longer be added (issue 12).
        reverse("admin:review_flag_add"),
        reverse("admin-usage"),
    ]
    for url in pages:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        assert response["Content-Security-Policy"] == CONTENT_SECURITY_POLICY, url


def test_the_admin_login_page_has_a_content_security_policy(client):
    assert "script-src 'self'" in client.get(ADMIN_LOGIN)["Content-Security-Policy"]


# ------------------------------------------------- item 10: HTTPS settings


def test_check_deploy_passes_with_production_settings(tmp_path):
    result = manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DEBUG="0",
        SECRET_KEY="x7!" + os.urandom(32).hex(),
        ALLOWED_HOSTS="chat.example.com",
        SECURE_SSL_REDIRECT="1",
        SECURE_HSTS_SECONDS="31536000",
        SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
        SECURE_HSTS_PRELOAD="1",
        DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )

    assert result.returncode == 0, result.stderr + result.stdout


def test_a_mistyped_https_setting_is_refused_not_read_as_off():
    result = manage("check", SECURE_SSL_REDIRECT="ture")

    assert result.returncode != 0
    assert "SECURE_SSL_REDIRECT='ture'" in result.stderr


# ------------------------------------------------- item 10: CSRF cookie


def test_the_csrf_cookie_is_httponly(client):
    response = client.get(site_login())

    assert response.cookies["csrftoken"]["httponly"] is True


def test_the_chat_page_carries_the_csrf_token_for_its_script(client, alice):
    client.force_login(alice)

    page = client.get(reverse("conversations:chat")).content.decode()

    assert 'name="csrfmiddlewaretoken"' in page


# ------------------------------------------------- item 10: a missing conversation


def test_deleting_a_conversation_twice_answers_a_json_404_the_second_time(client, alice):
    from conversations.models import Conversation

    conversation = Conversation.objects.create(owner=alice, model="fake")
    client.force_login(alice)
    url = reverse("conversations:delete", args=[conversation.pk])

    assert client.post(url, HTTP_ACCEPT="application/json").status_code == 200
    again = client.post(url, HTTP_ACCEPT="application/json")

    assert again.status_code == 404
    assert again.json() == {
        "error": "not_found",
        "message": again.json()["message"],
    }
    assert again.json()["message"]


# ------------------------------------------------- item 3, on a live site


def http_post(browser, path: str, fields: dict[str, str]) -> int:
    try:
        return browser.post(path, fields)[0]
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_the_lockout_holds_across_processes(tmp_path, fake_llm_server):
    """Failures counted through one daphne lock the name out in the other
    (the counters are in the database, shared by every process)."""
    with running_site(tmp_path, fake_llm_server.base_url, processes=2) as site:
        first, second = Browser(site.url(0)), Browser(site.url(1))
        first.sign_up("dana")
        stranger = Browser(site.url(0))
        wrong = {"username": "dana", "password": WRONG}
        for _ in range(9):
            assert http_post(stranger, "/accounts/login/", wrong) == 200
        assert http_post(stranger, "/accounts/login/", wrong) == 429  # the tenth

        right = {"username": "dana", "password": PASSWORD}
        status = http_post(second, "/accounts/login/", right)

        assert status == 429


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="counted per process without Redis")
def test_the_sign_up_limit_holds_across_processes(tmp_path, fake_llm_server):
    with running_site(
        tmp_path, fake_llm_server.base_url, processes=2, SIGNUP_RATE_LIMIT="2"
    ) as site:
        Browser(site.url(0)).sign_up("erin")
        Browser(site.url(1)).sign_up("fred")
        fields = {"username": "gina", "password1": PASSWORD, "password2": PASSWORD}

        assert http_post(Browser(site.url(0)), "/accounts/signup/", fields) == 429
