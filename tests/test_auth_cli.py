"""`workbench users` / `workbench keys` through the real CLI, and the serve exposure rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, run_cli

PASSWORD = "correct horse battery"


def cli(*args: str, home, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORKBENCH_HOME": str(home)}
    env.pop("WORKBENCH_AUTH", None)
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_users_add_list_set_role_remove(tmp_path):
    home = tmp_path / "home"
    added = cli(
        "users",
        "add",
        "ana",
        "--role",
        "student",
        "--password-stdin",
        home=home,
        stdin=PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    assert "added ana (student)" in added.stdout and PASSWORD not in added.stdout

    generated = cli("users", "add", "root", "--role", "admin", "--generate-password", home=home)
    assert generated.returncode == 0, generated.stderr
    secret = generated.stdout.split("password: ", 1)[1].split()[0]
    assert len(secret) >= 12

    from engine.auth import UserStore

    assert UserStore(home).authenticate("ana", PASSWORD).role == "student"
    assert UserStore(home).authenticate("root", secret).role == "admin"

    listed = cli("users", "list", "--json", home=home)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"]) for r in rows] == [("ana", "student"), ("root", "admin")]
    plain = cli("users", "list", home=home).stdout
    assert "ana" in plain and "student" in plain and "argon2" not in plain and secret not in plain

    dup = cli(
        "users",
        "add",
        "ana",
        "--role",
        "admin",
        "--password-stdin",
        home=home,
        stdin=PASSWORD + "\n",
    )
    assert dup.returncode == 2 and "already exists" in dup.stderr and "Traceback" not in dup.stderr
    short = cli(
        "users", "add", "bob", "--role", "student", "--password-stdin", home=home, stdin="short\n"
    )
    assert short.returncode == 2 and "too short" in short.stderr
    bad = cli(
        "users",
        "add",
        "../x",
        "--role",
        "student",
        "--password-stdin",
        home=home,
        stdin=PASSWORD + "\n",
    )
    assert bad.returncode == 2 and "Invalid user name" in bad.stderr
    no_tty = cli("users", "add", "bob", "--role", "student", home=home, stdin="")
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr

    assert cli("users", "set-role", "ana", "auditor", home=home).returncode == 0
    assert UserStore(home).get("ana").role == "auditor"

    removed = cli("users", "remove", "ana", home=home)
    assert removed.returncode == 0 and UserStore(home).get("ana") is None
    again = cli("users", "remove", "ana", home=home)
    assert again.returncode == 2 and "No user 'ana'" in again.stderr


def test_keys_create_list_revoke(tmp_path):
    home = tmp_path / "home"
    cli(
        "users",
        "add",
        "ana",
        "--role",
        "student",
        "--password-stdin",
        home=home,
        stdin=PASSWORD + "\n",
    )
    made = cli("keys", "create", "--user", "ana", "--json", home=home)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    from engine.access import User
    from engine.auth import ApiKeys

    assert ApiKeys(home).verify(key["secret"]) == User("ana", "student")
    listed = cli("keys", "list", "--user", "ana", home=home).stdout
    assert key["id"] in listed and key["secret"] not in listed and "active" in listed
    assert cli("keys", "revoke", key["id"], home=home).returncode == 0
    assert ApiKeys(home).verify(key["secret"]) is None
    assert "revoked" in cli("keys", "list", home=home).stdout
    nobody = cli("keys", "create", "--user", "nobody", home=home)
    assert nobody.returncode == 2 and "No user 'nobody'" in nobody.stderr

    # removing the user kills the key
    key2 = json.loads(cli("keys", "create", "--user", "ana", "--json", home=home).stdout)
    assert ApiKeys(home).verify(key2["secret"]) is not None
    cli("users", "remove", "ana", home=home)
    assert ApiKeys(home).verify(key2["secret"]) is None


# --- serve --------------------------------------------------------------------------------


def _admin(home) -> None:
    from engine.access import LOCAL, acting_as
    from engine.auth import UserStore

    with acting_as(LOCAL):
        UserStore(home).add("root", "admin", PASSWORD)


def test_check_exposure_refuses_a_network_address_until_login_is_configured(tmp_path):
    from engine.errors import InputError
    from workbench.cli.serve import check_exposure

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    net = ["--server.address", "0.0.0.0"]
    with pytest.raises(InputError) as refused:
        check_exposure(net, no_auth=False, home=home, cwd=cwd)
    message = str(refused.value)
    assert "\n" not in message
    assert "workbench users add NAME --role admin" in message
    assert "[auth]" in message and "secrets.toml" in message and "--no-auth" in message
    # local: no login, nothing changes; --no-auth: open, said so
    assert check_exposure(["--server.address", "127.0.0.1"], False, home=home, cwd=cwd) is False
    assert check_exposure(net, no_auth=True, home=home, cwd=cwd) is False
    # --auth on localhost with nobody able to log in: refused too
    with pytest.raises(InputError, match="--auth"):
        check_exposure([], False, require_login=True, home=home, cwd=cwd)
    with pytest.raises(InputError, match="contradict"):
        check_exposure(net, True, require_login=True, home=home, cwd=cwd)

    # a built-in admin: served with login required
    _admin(home)
    assert check_exposure(net, no_auth=False, home=home, cwd=cwd) is True
    assert check_exposure([], False, require_login=True, home=home, cwd=cwd) is True
    assert check_exposure([], False, home=home, cwd=cwd) is False


def test_check_exposure_accepts_an_oidc_provider_in_secrets(tmp_path):
    from workbench.cli.serve import check_exposure

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    (cwd / ".streamlit").mkdir(parents=True)
    net = ["--server.address=192.0.2.7"]
    (cwd / ".streamlit" / "secrets.toml").write_text(
        '[auth]\nredirect_uri = "http://x/oauth2callback"\ncookie_secret = "c"\n'
        'client_id = "wb"\nclient_secret = "s"\n'
        'server_metadata_url = "http://127.0.0.1:9/.well-known/openid-configuration"\n'
    )
    assert check_exposure(net, no_auth=False, home=home, cwd=cwd) is True
    # --secrets.files replaces the default places
    other = tmp_path / "empty.toml"
    other.write_text("")
    from engine.errors import InputError

    with pytest.raises(InputError, match="Refusing"):
        check_exposure([*net, "--secrets.files", str(other)], False, home=home, cwd=cwd)


def test_exposure_env():
    from workbench.cli.serve import exposure_env

    env = exposure_env({"WORKBENCH_NO_AUTH": "1"}, login_required=True, no_auth=False)
    assert env == {"WORKBENCH_AUTH": "required"}
    assert exposure_env({}, login_required=False, no_auth=True) == {"WORKBENCH_NO_AUTH": "1"}
    assert exposure_env({}, login_required=False, no_auth=False) == {}


def test_serve_refusal_names_the_ways_to_log_in(tmp_path):
    refused = run_cli(
        "serve", "--server.address", "0.0.0.0", "--server.port", "1", home=tmp_path, timeout=60
    )
    assert refused.returncode == 2
    assert "workbench users add NAME --role admin" in refused.stderr
    assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
