"""Failed sign-ins are limited per username and per client address.

Wrong old passwords at the password change pages are limited per account.
"""

import logging
import re
import threading
import time

import pytest
import requests
from django.contrib.auth.hashers import MD5PasswordHasher
from django.test import Client

from webapp.login_throttle import KEY_PREFIX, KNOWN_BROWSER_COOKIE
from webapp.redis import get_redis

WRONG = "not-the-password"


def sign_in(client, username, password, **extra):
    return client.post(
        "/accounts/login/", {"username": username, "password": password}, **extra
    )


def signed_in(client) -> bool:
    return "_auth_user_id" in client.session


@pytest.fixture
def limits(settings):
    """Set the throttle's limits for one test, keeping the rest of GLASSBOX."""

    def apply(**values):
        settings.GLASSBOX = {**settings.GLASSBOX, **values}

    return apply


def test_username_locked_after_limit(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=3, LOGIN_FAILURE_WINDOW_S=900)
    for _ in range(3):
        assert sign_in(client, "alice", WRONG).status_code == 200

    response = sign_in(client, "alice", "alice-password")

    assert response.status_code == 429
    assert not signed_in(client)
    assert 0 < int(response["Retry-After"]) <= 900
    page = response.content.decode()
    assert "Too many failed sign-ins for this username within 15 minutes" in page
    assert re.search(r"Try again in 15 minutes, after \d\d:\d\d:\d\d UTC", page)
    assert "Wrong username or password" not in page


def test_username_lock_applies_from_other_address(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    for _ in range(2):
        sign_in(client, "alice", WRONG, REMOTE_ADDR="10.0.0.1")

    response = sign_in(Client(), "alice", "alice-password", REMOTE_ADDR="10.0.0.2")

    assert response.status_code == 429


def test_address_locked_across_usernames(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=100, LOGIN_FAILURES_PER_IP=3)
    for name in ("bob", "carol", "dave"):
        assert sign_in(client, name, WRONG, REMOTE_ADDR="10.0.0.7").status_code == 200

    locked = sign_in(client, "alice", "alice-password", REMOTE_ADDR="10.0.0.7")
    other = Client()
    elsewhere = sign_in(other, "alice", "alice-password", REMOTE_ADDR="10.0.0.8")

    assert locked.status_code == 429
    assert "for this IP address" in locked.content.decode()
    assert elsewhere.status_code == 302
    assert signed_in(other)


def test_ipv6_addresses_count_per_64(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=100, LOGIN_FAILURES_PER_IP=2)
    sign_in(client, "bob", WRONG, REMOTE_ADDR="2001:db8:1:2::a")
    sign_in(client, "carol", WRONG, REMOTE_ADDR="2001:db8:1:2::b")

    same_network = sign_in(
        client, "alice", "alice-password", REMOTE_ADDR="2001:db8:1:2::c"
    )
    other_network = sign_in(
        Client(), "alice", "alice-password", REMOTE_ADDR="2001:db8:1:3::c"
    )

    assert same_network.status_code == 429
    assert other_network.status_code == 302


def test_address_behind_proxy_from_forwarded_for(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=100, LOGIN_FAILURES_PER_IP=2, NUM_PROXIES=1)
    # REMOTE_ADDR is the proxy's address. The entry that the proxy appended
    # to X-Forwarded-For is the client's, and the one before it is forged.
    proxy = {"REMOTE_ADDR": "10.0.0.1"}
    for forged in ("1.1.1.1", "2.2.2.2"):
        sign_in(
            client, "bob", WRONG, HTTP_X_FORWARDED_FOR=f"{forged}, 203.0.113.5", **proxy
        )

    locked = sign_in(
        client, "alice", "alice-password", HTTP_X_FORWARDED_FOR="203.0.113.5", **proxy
    )
    other = sign_in(
        Client(), "alice", "alice-password", HTTP_X_FORWARDED_FOR="203.0.113.6", **proxy
    )

    assert locked.status_code == 429
    assert other.status_code == 302


def test_attempts_during_lock_not_counted(client, alice, limits, caplog):
    limits(LOGIN_FAILURES_PER_USERNAME=1)
    sign_in(client, "alice", WRONG)
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="webapp.login_throttle"):
        sign_in(client, "alice", WRONG)

    # A rejected attempt during the lockout is not counted or logged again.
    assert caplog.records == []
    keys = list(get_redis().scan_iter(f"{KEY_PREFIX}username:*"))
    assert len(keys) == 1
    assert int(get_redis().get(keys[0])) == 1


def test_failure_logged_without_password(client, db, limits, caplog):
    limits(LOGIN_FAILURES_PER_USERNAME=2, LOGIN_FAILURES_PER_IP=20)

    with caplog.at_level(logging.WARNING, logger="webapp.login_throttle"):
        sign_in(client, "mallory", "secret-guess-1")
        sign_in(client, "mallory", "secret-guess-2")

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "username 'mallory' from 127.0.0.1" in messages[0]
    assert "1 of 2 for the username, 1 of 20 for the IP address" in messages[0]
    assert "2 of 2 for the username" in messages[1]
    assert "Sign-in locked for 900 s for the username" in messages[2]
    for message in messages:
        assert "secret-guess" not in message
    for key in get_redis().scan_iter(f"{KEY_PREFIX}*"):
        assert b"mallory" not in key


def test_success_clears_username_failures(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=3)
    sign_in(client, "alice", WRONG)
    sign_in(client, "alice", WRONG)
    assert sign_in(client, "alice", "alice-password").status_code == 302

    client.logout()
    sign_in(client, "alice", WRONG)
    sign_in(client, "alice", WRONG)

    assert sign_in(client, "alice", "alice-password").status_code == 302


def test_success_keeps_other_case_failures(client, alice, django_user_model, limits):
    # Usernames are case-sensitive, so "Alice" is another account whose
    # failures a sign-in as "alice" must not clear.
    django_user_model.objects.create_user("Alice", password="other-password")
    limits(LOGIN_FAILURES_PER_USERNAME=2, LOGIN_FAILURES_PER_IP=0)
    sign_in(client, "Alice", WRONG, REMOTE_ADDR="10.0.0.1")
    assert sign_in(Client(), "alice", "alice-password").status_code == 302

    sign_in(client, "Alice", WRONG, REMOTE_ADDR="10.0.0.1")

    assert sign_in(Client(), "Alice", "other-password").status_code == 429


def test_lock_ends_with_window(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=1, LOGIN_FAILURE_WINDOW_S=1)
    sign_in(client, "alice", WRONG)
    assert sign_in(client, "alice", "alice-password").status_code == 429

    time.sleep(1.5)

    assert sign_in(client, "alice", "alice-password").status_code == 302


def test_zero_turns_limits_off(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=0, LOGIN_FAILURES_PER_IP=0)
    for _ in range(30):
        sign_in(client, "alice", WRONG)

    assert sign_in(client, "alice", "alice-password").status_code == 302
    assert list(get_redis().scan_iter(f"{KEY_PREFIX}*")) == []


def test_admin_sign_in_shares_the_count(client, django_user_model, limits):
    django_user_model.objects.create_user(
        "staff", password="staff-password", is_staff=True, is_superuser=True
    )
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    sign_in(client, "staff", WRONG)
    client.post("/admin/login/", {"username": "staff", "password": WRONG})

    response = client.post(
        "/admin/login/", {"username": "staff", "password": "staff-password"}
    )

    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 900
    page = response.content.decode()
    assert "Too many failed sign-ins for this username" in page
    assert "Please enter the correct username and password" not in page
    assert not signed_in(client)


def test_admin_failures_lock_sign_in_page(client, django_user_model, limits):
    django_user_model.objects.create_user(
        "staff", password="staff-password", is_staff=True, is_superuser=True
    )
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    for _ in range(2):
        response = client.post(
            "/admin/login/", {"username": "staff", "password": WRONG}
        )
        assert response.status_code == 200

    assert sign_in(Client(), "staff", "staff-password").status_code == 429


def test_workers_share_the_count(wsgi_server, alice, limits):
    # Failures sent to a gunicorn worker, another process, lock the
    # username for this process too.
    limits(LOGIN_FAILURES_PER_USERNAME=5)
    browser = requests.Session()
    for _ in range(5):
        browser.get(f"{wsgi_server}/accounts/login/")
        response = browser.post(
            f"{wsgi_server}/accounts/login/",
            data={
                "username": "alice",
                "password": WRONG,
                "csrfmiddlewaretoken": browser.cookies["csrftoken"],
            },
        )
        assert response.status_code == 200

    assert sign_in(Client(), "alice", "alice-password").status_code == 429


class GatheringHasher(MD5PasswordHasher):
    """MD5, but each hash waits until ``expected`` hashes have started.

    It makes concurrent sign-ins check their passwords at the same time, as
    a slow hasher does under load. The wait ends after ``timeout_s`` when
    fewer arrive, as they do when the throttle rejects the others first.
    """

    algorithm = "gathering_md5"
    expected = 0
    timeout_s = 2.0
    started = 0
    condition = threading.Condition()

    def encode(self, password, salt):
        with GatheringHasher.condition:
            GatheringHasher.started += 1
            GatheringHasher.condition.notify_all()
            GatheringHasher.condition.wait_for(
                lambda: GatheringHasher.started >= GatheringHasher.expected,
                timeout=GatheringHasher.timeout_s,
            )
        return super().encode(password, salt)


def test_concurrent_failures_within_limit(transactional_db, settings, limits):
    # Ten wrong passwords for one username at once: only as many as the
    # limit may have their password checked, the others get 429.
    limits(LOGIN_FAILURES_PER_USERNAME=3, LOGIN_FAILURES_PER_IP=100)
    settings.PASSWORD_HASHERS = ["tests.test_login_throttle.GatheringHasher"]
    attempts = 10
    GatheringHasher.expected = attempts
    GatheringHasher.started = 0
    statuses = []

    def guess(index: int) -> None:
        response = sign_in(Client(), "mallory", f"guess-{index}")
        statuses.append(response.status_code)

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses.count(200) == 3
    assert statuses.count(429) == attempts - 3
    assert GatheringHasher.started == 3


def test_successful_sign_ins_not_counted(client, alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2, LOGIN_FAILURES_PER_IP=2)
    for _ in range(3):
        assert sign_in(Client(), "alice", "alice-password").status_code == 302

    assert list(get_redis().scan_iter(f"{KEY_PREFIX}username:*")) == []
    [address_key] = get_redis().scan_iter(f"{KEY_PREFIX}ip:*")
    assert int(get_redis().get(address_key)) == 0


def test_long_username_cut_in_log(client, db, limits, caplog):
    # Django's sign-in form does not enforce the 150-character limit.
    username = "m" * 100_000

    with caplog.at_level(logging.WARNING, logger="webapp.login_throttle"):
        assert sign_in(client, username, WRONG).status_code == 200

    [record] = caplog.records
    message = record.getMessage()
    assert f"'{'m' * 150}... (100000 characters)'" in message
    assert len(message) < 500


def change_password(client, old_password, path="/accounts/password_change/"):
    return client.post(
        path,
        {
            "old_password": old_password,
            "new_password1": "a-new-long-password-42",
            "new_password2": "a-new-long-password-42",
        },
    )


@pytest.mark.parametrize(
    "path", ["/accounts/password_change/", "/admin/password_change/"]
)
def test_wrong_old_passwords_locked(client, django_user_model, limits, path):
    user = django_user_model.objects.create_user(
        "staff", password="staff-password", is_staff=True
    )
    client.force_login(user)
    limits(LOGIN_FAILURES_PER_USERNAME=3, LOGIN_FAILURE_WINDOW_S=900)
    for _ in range(3):
        assert change_password(client, WRONG, path).status_code == 200

    response = change_password(client, "staff-password", path)

    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 900
    page = response.content.decode()
    assert "Too many wrong old passwords for this account within 15 minutes" in page
    user.refresh_from_db()
    assert user.check_password("staff-password")


def test_wrong_old_passwords_logged(client, alice, limits, caplog):
    client.force_login(alice)
    limits(LOGIN_FAILURES_PER_USERNAME=2)

    with caplog.at_level(logging.WARNING, logger="webapp.login_throttle"):
        change_password(client, "secret-guess-1")
        change_password(client, "secret-guess-2")

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "Failed password change for username 'alice' from 127.0.0.1" in messages[0]
    assert "1 of 2 for the account within 900 s" in messages[0]
    assert "Password change locked for 900 s for the account" in messages[2]
    for message in messages:
        assert "secret-guess" not in message


def test_password_change_ignores_others_failures(client, alice, bob, limits):
    # Sign-in failures for the username and wrong old passwords of other
    # accounts from the same address do not lock alice's password change.
    limits(LOGIN_FAILURES_PER_USERNAME=2, LOGIN_FAILURES_PER_IP=100)
    for _ in range(2):
        sign_in(Client(), "alice", WRONG, REMOTE_ADDR="10.0.0.9")
    other = Client()
    other.force_login(bob)
    for _ in range(2):
        change_password(other, WRONG)
    assert change_password(other, "bob-password").status_code == 429
    client.force_login(alice)

    response = change_password(client, "alice-password")

    assert response.status_code == 302
    alice.refresh_from_db()
    assert alice.check_password("a-new-long-password-42")


def test_right_old_password_clears_count(client, alice, limits):
    client.force_login(alice)
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    change_password(client, WRONG)
    mismatched = client.post(
        "/accounts/password_change/",
        {
            "old_password": "alice-password",
            "new_password1": "a-new-long-password-42",
            "new_password2": "another-long-password-42",
        },
    )
    assert mismatched.status_code == 200
    change_password(client, WRONG)

    assert change_password(client, "alice-password").status_code == 302


def known_browser_of(username, password) -> Client:
    """Return a signed-out client that signed in as ``username`` before."""
    first = Client()
    assert sign_in(first, username, password).status_code == 302
    browser = Client()
    browser.cookies[KNOWN_BROWSER_COOKIE] = first.cookies[KNOWN_BROWSER_COOKIE].value
    return browser


def lock_out(username, limit):
    for _ in range(limit):
        sign_in(Client(), username, WRONG, REMOTE_ADDR="10.0.0.66")


def test_known_browser_signs_in_during_lock(alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=3)
    browser = known_browser_of("alice", "alice-password")
    lock_out("alice", 3)
    assert sign_in(Client(), "alice", "alice-password").status_code == 429

    response = sign_in(browser, "alice", "alice-password")

    assert response.status_code == 302
    assert signed_in(browser)


def test_admin_sign_in_remembers_browser(django_user_model, limits):
    django_user_model.objects.create_user(
        "staff", password="staff-password", is_staff=True, is_superuser=True
    )
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    first = Client()
    signed = first.post(
        "/admin/login/", {"username": "staff", "password": "staff-password"}
    )
    assert signed.status_code == 302
    browser = Client()
    browser.cookies[KNOWN_BROWSER_COOKIE] = first.cookies[KNOWN_BROWSER_COOKIE].value
    lock_out("staff", 2)

    response = browser.post(
        "/admin/login/", {"username": "staff", "password": "staff-password"}
    )

    assert response.status_code == 302
    assert signed_in(browser)


def test_known_browser_failures_limited(alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2, LOGIN_FAILURE_WINDOW_S=900)
    browser = known_browser_of("alice", "alice-password")
    for _ in range(2):
        assert sign_in(browser, "alice", WRONG).status_code == 200

    response = sign_in(browser, "alice", "alice-password")

    assert response.status_code == 429
    assert 0 < int(response["Retry-After"]) <= 900
    assert "Too many failed sign-ins for this browser" in response.content.decode()
    # The browser's failures did not count against the username.
    assert sign_in(Client(), "alice", "alice-password").status_code == 302


def test_known_browser_keeps_address_limit(alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=100, LOGIN_FAILURES_PER_IP=2)
    browser = known_browser_of("alice", "alice-password")
    for name in ("bob", "carol"):
        sign_in(Client(), name, WRONG)

    response = sign_in(browser, "alice", "alice-password")

    assert response.status_code == 429
    assert "for this IP address" in response.content.decode()


def test_known_browser_of_other_account(alice, bob, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    browser = known_browser_of("bob", "bob-password")
    lock_out("alice", 2)

    assert sign_in(browser, "alice", "alice-password").status_code == 429


def test_forged_browser_cookie_ignored(alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    browser = known_browser_of("alice", "alice-password")
    lock_out("alice", 2)
    value = browser.cookies[KNOWN_BROWSER_COOKIE].value
    digest, _, rest = value.partition(":")
    browser.cookies[KNOWN_BROWSER_COOKIE] = f"{digest}:forged{rest}"

    assert sign_in(browser, "alice", "alice-password").status_code == 429


def test_password_change_forgets_known_browsers(alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    copied = known_browser_of("alice", "alice-password")
    owner = Client()
    assert sign_in(owner, "alice", "alice-password").status_code == 302
    assert change_password(owner, "alice-password").status_code == 302
    lock_out("alice", 2)

    # A cookie issued before the change no longer passes the lockout.
    assert sign_in(copied, "alice", "a-new-long-password-42").status_code == 429
    # The browser that changed the password got a new cookie, which does.
    returning = Client()
    returning.cookies[KNOWN_BROWSER_COOKIE] = owner.cookies[KNOWN_BROWSER_COOKIE].value
    assert sign_in(returning, "alice", "a-new-long-password-42").status_code == 302


def test_known_browser_turned_off(alice, limits):
    limits(LOGIN_FAILURES_PER_USERNAME=2)
    browser = known_browser_of("alice", "alice-password")
    lock_out("alice", 2)
    limits(LOGIN_KNOWN_BROWSER_DAYS=0)

    assert sign_in(browser, "alice", "alice-password").status_code == 429


def test_known_browser_cookie_attributes(alice):
    client = Client()
    sign_in(client, "alice", "alice-password")

    cookie = client.cookies[KNOWN_BROWSER_COOKIE]

    assert cookie["httponly"]
    assert cookie["samesite"] == "Lax"
    assert cookie["path"] == "/"
    assert int(cookie["max-age"]) == 30 * 24 * 3600
    assert "alice" not in cookie.value


def sign_in_over_http(server, browser, username, password):
    browser.get(f"{server}/accounts/login/")
    return browser.post(
        f"{server}/accounts/login/",
        data={
            "username": username,
            "password": password,
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
        },
        allow_redirects=False,
    )


def test_known_browser_over_http(transactional_db, wsgi_server, alice, limits):
    # gunicorn runs with the default limits: 5 failures per username.
    limits(LOGIN_FAILURES_PER_USERNAME=5)
    first = requests.Session()
    signed = sign_in_over_http(wsgi_server, first, "alice", "alice-password")
    assert signed.status_code == 302
    browser = requests.Session()
    browser.cookies.set(KNOWN_BROWSER_COOKIE, first.cookies[KNOWN_BROWSER_COOKIE])
    lock_out("alice", 5)
    stranger = requests.Session()
    locked = sign_in_over_http(wsgi_server, stranger, "alice", "alice-password")
    assert locked.status_code == 429

    response = sign_in_over_http(wsgi_server, browser, "alice", "alice-password")

    assert response.status_code == 302
