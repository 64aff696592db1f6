"""Settings and results that survive page changes and browser reloads.

Streamlit forgets a widget's value when its page is not drawn, and a reload starts a new
session. So, on every script run (called from the app shell, before any page draws):

- the values of the widgets listed in ``KEEP`` are copied to shadow keys (``_kept::<key>``)
  and written back when Streamlit has dropped them (their page was not drawn), which keeps
  them through page changes;
- they, and the ledger ids of the results on screen (``<result key>_run_id``), are saved to
  ``$WORKBENCH_HOME/sessions/<token>.json``, where the token is in the URL (``?s=...``): a reload
  keeps the URL, so a new session finds and restores them; results come back from the run
  ledger, nothing is recomputed.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

import streamlit as st

# Widget keys (exact, or a prefix ending in "::") whose values are kept. Buttons, uploads and
# forms can't be set through session state and must never be listed.
KEEP = (
    "gen_max_new_tokens",
    "gen_greedy",
    "gen_temperature",
    "gen_top_k",
    "gen_top_p",
    "gen_repetition_penalty",
    "gen_seed",
    "gen_stop",
    "gen_keep_last",
    "gen_preset",
    "gen_input",
    "gen_system",
    "gen_template::",
    "eval_text",
    "eval_hyp",
    "eval_ref",
    "cmp_models",
    "cmp_prompt",
    "attn_text",
    "attn_text_b",
    "attn_compare",
    "attn_max_tokens",
    "nb_active",
    "model_name",
)
# session keys of results shown on pages; each has "<key>_run_id" when it came from a run
RESULTS = ("gen_result", "eval_ppl_result", "gen_comparison")
TOKEN = re.compile(r"[0-9a-f]{24}")
RESTORED = "_persist_restored"
SHADOW = "_kept::"  # prefix of the copies that outlive their widgets
SAVED = "_persist_saved"


def _kept_keys() -> list[str]:
    prefixes = tuple(k for k in KEEP if k.endswith("::"))
    exact = set(KEEP) - set(prefixes)
    return [k for k in st.session_state if k in exact or str(k).startswith(prefixes)]


def _plain(value):
    """JSON-able widget values only (others are not kept across reloads)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def _path(home: Path, token: str, user: str) -> Path:
    """Each user's saved sessions apart: a URL with another user's token restores nothing."""
    folder = home / "sessions" if user == "local" else home / "sessions" / user
    return folder / f"{token}.json"


def _token() -> str:
    token = st.query_params.get("s", "")
    if not TOKEN.fullmatch(token or ""):
        token = secrets.token_hex(12)
        st.query_params["s"] = token
    return token


def keep(home: Path) -> None:
    """Keep widget values across page changes; save / restore them (and results) by URL.

    Call it for a logged-in user (inside ``engine.access.acting_as``): before login, nothing
    is kept."""
    from engine import access

    try:
        user = access.current_user().name
    except access.AccessError:
        return
    token = _token()
    path = _path(home, token, user)
    if not st.session_state.get(RESTORED):
        st.session_state[RESTORED] = True
        _restore(home, path)
        return
    # Streamlit drops a widget's value when its page is not drawn: bring it back from its
    # shadow copy then. Live widgets are never re-assigned: a re-assignment re-sends the
    # value from the server and could undo what the user typed while a run was going.
    for shadow in [k for k in st.session_state if str(k).startswith(SHADOW)]:
        key = shadow[len(SHADOW) :]
        if key not in st.session_state:
            st.session_state[key] = st.session_state[shadow]
    for key in _kept_keys():
        st.session_state[SHADOW + key] = st.session_state[key]
    _save(path)


def save(home: Path) -> None:
    """Save the kept values and results as they stand at the end of a script run: a result
    collected by the last run of a page (nothing reruns after it) must reach the file too."""
    from engine import access

    try:
        user = access.current_user().name
    except access.AccessError:
        return
    _save(_path(home, _token(), user))


def _restore(home: Path, path: Path) -> None:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # nothing saved yet, or unreadable: start fresh (never an error on the page)
    if not isinstance(saved, dict):
        return
    values = saved.get("values") if isinstance(saved.get("values"), dict) else {}
    prefixes = tuple(k for k in KEEP if k.endswith("::"))
    for key, value in values.items():
        if key in KEEP or key.startswith(prefixes):
            st.session_state[key] = value
    results = saved.get("results") if isinstance(saved.get("results"), dict) else {}
    if results:
        from engine.errors import EngineError
        from engine.ledger import Ledger

        ledger = Ledger(home)
        for key, run_id in results.items():
            if key not in RESULTS or not isinstance(run_id, str):
                continue
            try:
                result = ledger.load_result(ledger.get(run_id))
            except (EngineError, OSError, ValueError):
                continue
            if result is not None:
                st.session_state[key] = result
                st.session_state[f"{key}_run_id"] = run_id
    st.session_state[SAVED] = json.dumps(saved, sort_keys=True)


def _save(path: Path) -> None:
    values = {k: _plain(st.session_state[k]) for k in _kept_keys()}
    results = {
        k: st.session_state[f"{k}_run_id"]
        for k in RESULTS
        if k in st.session_state and f"{k}_run_id" in st.session_state
    }
    state = {"values": {k: v for k, v in values.items() if v is not None}, "results": results}
    text = json.dumps(state, sort_keys=True)
    if st.session_state.get(SAVED) == text:
        return
    from engine.errors import EngineError
    from engine.files import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text, "the session's settings")
        st.session_state[SAVED] = text
    except (OSError, EngineError):
        pass  # a full disk must not break the page: settings are then only kept in memory
