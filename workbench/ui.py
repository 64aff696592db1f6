"""Shared UI pieces: the one cached engine, the model picker, and the one place errors show.

Heavy modules (torch, transformers) are imported inside functions, after the shell has drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import streamlit as st

from engine.errors import EngineError

if TYPE_CHECKING:
    from engine.api import Model, Workbench

MODEL_KEY = "model_name"
DEFAULT_MODEL = "smollm2-135m"


@st.cache_resource(show_spinner=False)
def get_workbench() -> Workbench:
    """The process-wide engine, shared by every session and page."""
    from engine.api import Workbench

    return Workbench()


def engine() -> Workbench:
    """The shared engine, with a spinner the first time (torch import, about 8 s)."""
    with st.spinner("Starting the engine (importing torch and transformers)…"):
        return get_workbench()


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Turn an ``EngineError`` into a one-line message on the page and stop this run.

    This is the only place engine errors become ``st.error``: bad input never shows a traceback.
    """
    try:
        yield
    except EngineError as exc:
        show_error(str(exc))
        st.stop()


def can(action: str) -> bool:
    """Whether the logged-in user's role allows ``action`` (``engine.access.PERMISSIONS``):
    pages hide what it does not (the engine refuses it anyway)."""
    from engine import access

    return access.can(action)


def user_name() -> str:
    """The logged-in user's name ("local" without login)."""
    from engine import access

    return access.current_user().name


def may_change(owner: str) -> bool:
    """Whether the user may change something ``owner`` made (own work, or an admin)."""
    from engine import access

    return can("notebooks.write") and access.may_control(owner)


RUN_REFUSED = (
    "Your role reads and re-runs recorded work (History, Notebook); running models is for "
    "students, instructors and admins."
)


def page_needs(action: str, why: str = RUN_REFUSED) -> None:
    """Stop the page with an explanation when the user's role may not ``action``."""
    if not can(action):
        st.info(why, icon="🔒")
        st.stop()


def show_error(message: str) -> None:
    """A one-line error on the page without stopping it (e.g. a worker thread's failure).
    Messages quote user text (names, labels): shown literally, never as Markdown."""
    from engine.html import markdown_literal

    st.error(markdown_literal(message), icon="⚠️")


POLL_S = 0.5  # how often a page redraws a running run (the view needs no more)


def run_progress(run, cancel_label: str = "Stop", key: str = "run_cancel") -> None:
    """Draw a running run's snapshot: progress bar with its message (or what it waits for)
    and a cancel button. Call from a polling fragment."""
    snap = run.snapshot()
    label = snap.message or "Working…"
    if snap.waiting:
        st.info(label, icon="⏳")
    st.progress(min(max(snap.fraction, 0.0), 1.0), text=f"{label} · {snap.seconds:.0f} s")
    st.button(cancel_label, key=key, on_click=run.cancel, disabled=snap.cancelled)


def poll_run(key: str, draw, every: float = POLL_S) -> None:
    """While ``st.session_state[key]`` holds an unfinished run, redraw ``draw(run)`` every
    ``every`` seconds in a fragment; once it has finished, rerun the whole page (once) so
    the page can collect the result. Nothing polls when no run is going."""
    run = st.session_state.get(key)
    if run is None:
        return

    def body() -> None:
        current = st.session_state.get(key)
        if current is None:
            return
        if current.done:
            st.rerun(scope="app")
        draw(current)

    st.fragment(body, run_every=every)()


ACTIVE_NOTEBOOK = "nb_active"


def add_to_notebook(run_id: str | None, key: str) -> None:
    """An "Add to notebook" button: the finished run becomes a cell of the active notebook
    (the one last opened on the Notebook page; a new "My notebook" when there is none)."""
    if not run_id:
        return
    if not st.button("Add to notebook", key=key, icon=":material/playlist_add:"):
        return
    from engine.notebooks import cells_from_runs

    wb = engine()
    with guard():
        active = st.session_state.get(ACTIVE_NOTEBOOK)
        known = {i.id for i in wb.notebooks.list() if not i.damaged}
        if active not in known:
            active = wb.notebooks.create("My notebook").id
            st.session_state[ACTIVE_NOTEBOOK] = active
        book = cells_from_runs(wb, active, [run_id])
    st.success(f"Added to notebook {book.name!r} as cell {len(book.cells)}.")


def selected_model_name() -> str:
    return st.session_state.get(MODEL_KEY) or DEFAULT_MODEL


def load_model(name: str) -> Model:
    """Load (or fetch from the cache) ``name`` with a visible progress bar."""
    wb = engine()
    cached = wb.manager.get(name)
    if cached is not None:
        return wb.model(cached)
    bar = st.progress(0.0, text=f"Loading {name}…")
    with guard():
        model = wb.load(
            name, progress=lambda fraction, message: bar.progress(min(fraction, 1.0), text=message)
        )
    bar.empty()
    return model


def current_model() -> Model:
    """The model chosen in the sidebar, loaded."""
    return load_model(selected_model_name())


def _use_other_model() -> None:
    # A callback runs before the script, so it may set the picker's key.
    other = st.session_state.get("other_model", "").strip()
    if other:
        st.session_state[MODEL_KEY] = other


PENDING_MODEL = "_pending_model"


def pick_model_next_run(name: str) -> None:
    """Select ``name`` in the sidebar picker from the next script run on (the picker's own
    value cannot change once it is drawn in this run)."""
    st.session_state[PENDING_MODEL] = name


def model_picker() -> None:
    """Sidebar: choose the active model (embedded, stored, or any folder / hub id)."""
    pending = st.session_state.pop(PENDING_MODEL, None)
    if pending:
        st.session_state[MODEL_KEY] = pending
    wb = engine()
    names = [entry.name for entry in wb.catalog()]
    current = selected_model_name()
    if current not in names:
        names.append(current)
    st.sidebar.selectbox(
        "Model",
        names,
        index=names.index(current),
        key=MODEL_KEY,
        help="Embedded models and models saved in the store. Add a folder or hub id below.",
    )
    if can("models.manage"):  # a folder or hub id: admins only (it reaches the file system)
        with st.sidebar.expander("Other model"), st.form("other_model_form", border=False):
            st.text_input("Local folder or hub id", key="other_model", placeholder="org/name")
            st.form_submit_button("Use this model", on_click=_use_other_model)
    place = wb.placement
    st.sidebar.caption(f"Device: **{place.device}** · dtype: **{place.dtype_name}**")
    try:
        path = wb.decode_path(current)
    except EngineError as exc:  # a bad WORKBENCH_DECODE: said here, and by every generation
        st.sidebar.warning(str(exc))
        path = None
    if path is not None:
        from engine.generation.paths import DESCRIPTIONS

        st.sidebar.caption(f"Decode path: **{path}**", help=DESCRIPTIONS[path])


def human_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
