"""Accounts, login sessions and API keys (engine.auth): hashes, limits, expiry, removal."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from engine.access import LOCAL, AccessError, LimitError, User, acting_as
from engine.auth import ApiKeys, Sessions, UserStore, login_configured, oidc_user
from engine.auth.oidc import identity_name
from engine.auth.users import MAX_CLIENT_FAILURES, MAX_FAILURES, WINDOW_S
from engine.errors import InputError

PASSWORD = "correct horse battery"


class Clock:
    """A settable unix clock."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def admin():
    with acting_as(LOCAL):
        yield


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


def test_passwords_are_argon2id_hashes_never_plain_text(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    raw = b"".join(p.read_bytes() for p in home.glob("auth.db*"))
    assert PASSWORD.encode() not in raw
    with sqlite3.connect(home / "auth.db") as db:
        (hashed,) = db.execute("SELECT hash FROM users WHERE name = 'ana'").fetchone()
    assert hashed.startswith("$argon2id$")
    from argon2 import PasswordHasher

    assert PasswordHasher().verify(hashed, PASSWORD)  # an independent check of the hash
    assert (home / "auth.db").stat().st_mode & 0o077 == 0  # owner-only file
    listed = store.list()
    assert [(u.name, u.role, u.has_password) for u in listed] == [("ana", "student", True)]
    assert "argon2" not in repr(listed)


def test_add_refuses_bad_input(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    with pytest.raises(InputError, match="already exists"):
        store.add("ana", "admin", PASSWORD)
    with pytest.raises(InputError, match="too short"):
        store.add("bob", "student", "1234567")
    with pytest.raises(InputError, match="Unknown role"):
        store.add("bob", "root", PASSWORD)
    for hostile in ("../etc", "Ana", "a/b", "", "x\n", "a" * 65):
        with pytest.raises(InputError, match="Invalid user name"):
            store.add(hostile, "student", PASSWORD)
    assert [u.name for u in store.list()] == ["ana"]


def test_managing_accounts_needs_an_admin(home, admin):
    UserStore(home).add("ana", "student", PASSWORD)
    with acting_as(User("ms-t", "instructor")), pytest.raises(AccessError, match="manage users"):
        UserStore(home).add("eve", "admin", PASSWORD)
    with acting_as(User("ana", "student")), pytest.raises(AccessError):
        UserStore(home).set_role("ana", "admin")


def test_wrong_password_and_unknown_name_read_the_same(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    assert store.authenticate("ana", PASSWORD) == User("ana", "student")
    with pytest.raises(InputError) as wrong:
        store.authenticate("ana", PASSWORD + "!")
    with pytest.raises(InputError) as unknown:
        store.authenticate("nobody", PASSWORD)
    assert str(wrong.value) == str(unknown.value) == "Wrong name or password."
    store.set_disabled("ana")
    with pytest.raises(InputError, match="Wrong name or password"):
        store.authenticate("ana", PASSWORD)


def test_unknown_names_cost_a_real_hash_check(home, admin, monkeypatch):
    """No shortcut for an unknown name: argon2 verify runs exactly as for a known one."""
    from engine.auth import users as users_module

    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    calls = []
    real = users_module._verify
    monkeypatch.setattr(users_module, "_verify", lambda h, p: calls.append(h) or real(h, p))
    for name in ("ana", "nobody"):
        with pytest.raises(InputError):
            store.authenticate(name, "wrong password")
    assert len(calls) == 2 and all(h.startswith("$argon2id$") for h in calls)


def test_rate_limit_after_failures_then_retry_after(home, admin):
    clock = Clock()
    store = UserStore(home, clock=clock)
    store.add("ana", "student", PASSWORD)
    for _ in range(MAX_FAILURES):
        with pytest.raises(InputError):
            store.authenticate("ana", "wrong password", client="10.0.0.1")
        clock.now += 10
    with pytest.raises(LimitError) as limited:
        store.authenticate("ana", PASSWORD, client="10.0.0.2")  # even the right one
    first_failure = 1_800_000_000.0
    assert limited.value.retry_after_s == pytest.approx(first_failure + WINDOW_S - clock.now)
    # other names from that client still get their tries (a class shares one NAT address)
    with pytest.raises(InputError):
        store.authenticate("bob", PASSWORD, client="10.0.0.1")
    # once the first failure leaves the window, one more try is allowed, and it works
    clock.now = first_failure + WINDOW_S + 1
    assert store.authenticate("ana", PASSWORD, client="10.0.0.2") == User("ana", "student")


def test_one_client_guessing_many_names_is_limited(home, admin):
    store = UserStore(home, clock=Clock())
    store.add("ana", "student", PASSWORD)
    for i in range(MAX_CLIENT_FAILURES):
        with pytest.raises(InputError):
            store.authenticate(f"name{i}", "wrong password", client="10.0.0.9")
    with pytest.raises(LimitError):
        store.authenticate("ana", PASSWORD, client="10.0.0.9")
    assert store.authenticate("ana", PASSWORD, client="10.0.0.8") == User("ana", "student")


def test_unknown_names_are_rate_limited_too(home, admin):
    store = UserStore(home, clock=Clock())
    for _ in range(MAX_FAILURES):
        with pytest.raises(InputError):
            store.authenticate("ghost", "wrong password")
    with pytest.raises(LimitError):
        store.authenticate("ghost", "wrong password")


def test_sessions_expire(home, admin, monkeypatch):
    clock = Clock()
    UserStore(home).add("ana", "student", PASSWORD)
    monkeypatch.setenv("WORKBENCH_SESSION_HOURS", "2")
    sessions = Sessions(home, clock=clock)
    token = sessions.create(User("ana", "student"))
    assert len(token) >= 43
    assert sessions.user_for(token) == User("ana", "student")
    raw = b"".join(p.read_bytes() for p in home.glob("auth.db*"))
    assert token.encode() not in raw  # only its sha256 is stored
    clock.now += 2 * 3600 - 1
    assert sessions.user_for(token) == User("ana", "student")
    clock.now += 2
    assert sessions.user_for(token) is None
    assert sessions.user_for("made-up-token") is None
    assert sessions.user_for("") is None


def test_session_revoke_and_role_change(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    sessions = Sessions(home)
    token = sessions.create(User("ana", "student"))
    store.set_role("ana", "auditor")
    assert sessions.user_for(token) == User("ana", "auditor")  # at once
    assert sessions.revoke(token)
    assert sessions.user_for(token) is None


def test_removed_or_disabled_users_sessions_and_keys_die(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    sessions, keys = Sessions(home), ApiKeys(home)
    token = sessions.create(User("ana", "student"))
    key_id, secret = keys.create("ana")
    assert keys.verify(secret) == User("ana", "student")
    store.set_disabled("ana")
    assert sessions.user_for(token) is None and keys.verify(secret) is None
    store.set_disabled("ana", False)
    assert sessions.user_for(token) == User("ana", "student")
    store.remove("ana")
    assert sessions.user_for(token) is None and keys.verify(secret) is None
    # a new account with the same name does not inherit the old session or key
    store.add("ana", "admin", PASSWORD)
    assert sessions.user_for(token) is None and keys.verify(secret) is None
    assert keys.list() == []


def test_api_keys_create_verify_list_revoke(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    store.add("bob", "instructor", PASSWORD)
    keys = ApiKeys(home)
    key_id, secret = keys.create("ana")
    other_id, other = keys.create("bob")
    assert secret.startswith("wb-") and len(secret) >= 46 and secret != other
    raw = b"".join(p.read_bytes() for p in home.glob("auth.db*"))
    assert secret.encode() not in raw
    assert keys.verify(secret) == User("ana", "student")
    assert keys.verify(other) == User("bob", "instructor")
    for hostile in (None, "", "wb-", secret[:-1], secret + "x", "x" * 10_000, secret.upper()):
        assert keys.verify(hostile) is None
    assert [k.id for k in keys.list(user="ana")] == [key_id]
    assert {k.user for k in keys.list()} == {"ana", "bob"}
    keys.revoke(key_id)
    assert keys.verify(secret) is None and keys.verify(other) is not None
    assert [k.revoked for k in keys.list(user="ana")] == [True]
    with pytest.raises(InputError, match="No API key"):
        keys.revoke("key-000000000000")
    with pytest.raises(InputError, match="No user"):
        keys.create("nobody")


def test_users_manage_only_their_own_keys(home, admin):
    store = UserStore(home)
    store.add("ana", "student", PASSWORD)
    store.add("bob", "student", PASSWORD)
    bob_key, _ = ApiKeys(home).create("bob")
    with acting_as(User("ana", "student")):
        ApiKeys(home).create("ana")  # her own: fine
        with pytest.raises(AccessError):
            ApiKeys(home).create("bob")
        with pytest.raises(AccessError):
            ApiKeys(home).revoke(bob_key)
        with pytest.raises(AccessError):
            ApiKeys(home).list()


def test_concurrent_logins_and_sessions_from_many_threads(home, admin):
    store = UserStore(home)
    for i in range(4):
        store.add(f"u{i}", "student", PASSWORD)
    results: dict[int, User | None] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            user = UserStore(home).authenticate(f"u{i % 4}", PASSWORD)
            token = Sessions(home).create(user)
            results[i] = Sessions(home).user_for(token)
        except BaseException as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == {i: User(f"u{i % 4}", "student") for i in range(12)}


def test_oidc_identities(home, admin):
    assert identity_name({"email": "Zoe@School.org"}) == "zoe@school.org"
    assert identity_name({"sub": "abc/../x", "iss": "http://127.0.0.1:9"}) == "abc-.-x@127.0.0.1"
    hostile = identity_name({"email": "<script>@x/../../y" + "a" * 100})
    assert "/" not in hostile and "<" not in hostile and len(hostile) <= 64 and "@" in hostile
    # an unverified email is not trusted for the name or a link
    assert identity_name({"email": "admin@x", "email_verified": False, "sub": "s"}) == "s@oidc"
    assert oidc_user({"email": "zoe@school.org"}, home) == User("zoe@school.org", "student")
    UserStore(home).add("ms-zoe", "instructor", None, identity="ZOE@school.org")
    assert oidc_user({"email": "zoe@school.org"}, home, "auditor") == User("ms-zoe", "instructor")
    assert oidc_user(
        {"email": "zoe@school.org", "email_verified": False, "sub": "q"}, home
    ) == User("q@oidc", "student")
    UserStore(home).set_disabled("ms-zoe")
    with pytest.raises(AccessError, match="disabled"):
        oidc_user({"email": "zoe@school.org"}, home)


def test_login_configured(home, admin, tmp_path):
    secrets = tmp_path / "secrets.toml"
    assert not login_configured(home, [secrets])
    secrets.write_text('[auth]\ncookie_secret = "x"\n')  # no provider in it
    assert not login_configured(home, [secrets])
    secrets.write_text('[auth.school]\nclient_id = "wb"\nclient_secret = "s"\n')
    assert login_configured(home, [secrets])
    UserStore(home).add("root", "admin", PASSWORD)
    assert login_configured(home, [])
    UserStore(home).set_disabled("root")
    assert not login_configured(home, [])
