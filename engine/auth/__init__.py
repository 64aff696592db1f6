"""Built-in accounts, login sessions and API keys, kept in ``HOME/auth.db`` (SQLite).

    users = UserStore(home)
    users.add("ana", "student", "a long password")
    user = users.authenticate("ana", "a long password", client="10.0.0.7")  # -> access.User
    token = Sessions(home).create(user)            # kept by the page, never in a URL
    Sessions(home).user_for(token)                 # -> User | None (expired, revoked, removed)
    key_id, secret = ApiKeys(home).create("ana")   # secret shown once
    ApiKeys(home).verify(secret)                   # -> User | None

Only hashes are stored: argon2id for passwords, sha256 for session tokens and API keys (both
are 256-bit random strings, so a fast hash is enough). OIDC logins (``st.login``) map to a
``User`` with ``oidc_user``.
"""

from engine.auth.keys import ApiKey, ApiKeys
from engine.auth.oidc import login_configured, oidc_configured, oidc_user
from engine.auth.sessions import Sessions, session_hours
from engine.auth.users import StoredUser, UserStore

__all__ = [
    "ApiKey",
    "ApiKeys",
    "Sessions",
    "StoredUser",
    "UserStore",
    "login_configured",
    "oidc_configured",
    "oidc_user",
    "session_hours",
]
