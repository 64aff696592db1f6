"""Entry script: ``streamlit run workbench/app.py`` (or ``workbench serve``).

Draws the shell first (navigation, sidebar), then starts the engine, so the first page shows
at once and the torch import happens behind a spinner.
"""

import gc
import os
import threading
import time
from pathlib import Path

import streamlit as st

from engine import access
from engine.store import workbench_home
from workbench import login, persist, ui

PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="LLMOS Workbench", page_icon="🧪", layout="wide")

# (file in pages/, title, icon, URL path), in menu order; the first is the home page.
PAGE_TABLE = [
    ("notebook.py", "Notebook", ":material/menu_book:", "notebook"),
    ("generate.py", "Generate", ":material/edit_note:", "generate"),
    ("attention.py", "Attention", ":material/visibility:", "attention"),
    ("attribution.py", "Explain", ":material/insights:", "explain"),
    ("finetune.py", "Fine-tune", ":material/tune:", "finetune"),
    ("history.py", "History", ":material/history:", "history"),
    ("models.py", "Models & system", ":material/storage:", "models"),
]
PAGES = [
    st.Page(str(PAGES_DIR / file), title=title, icon=icon, url_path=url, default=i == 0)
    for i, (file, title, icon, url) in enumerate(PAGE_TABLE)
]
# URL path -> the action a role needs to see that page (other pages: every role; they hide
# their own buttons, and the engine refuses what a role may not do).
PAGE_NEEDS = {"finetune": "finetune"}


def visible_pages(user: access.User | None) -> list:
    """The pages ``user``'s role may use (``None``: the local user, every page)."""
    user = user or access.LOCAL
    return [
        page
        for page in PAGES
        if page.url_path not in PAGE_NEEDS or access.can(PAGE_NEEDS[page.url_path], user)
    ]


# Streamlit's per-rerun gc.collect(2) is off (.streamlit/config.toml, `workbench serve`): with
# torch loaded a full collection holds the GIL for ~200 ms, which starved decoding when polling
# fragments reran it several times a second. Python's generational collector still frees
# cycles as usual; on top of that, a full collection runs at most once every few minutes, here
# on a full rerun (a user action) and never in a fragment's polling rerun, which skips this file.
FULL_COLLECTION_EVERY_S = 300.0


@st.cache_resource(show_spinner=False)
def _collection_clock() -> dict:
    """Process-wide time of the last full collection (shared by every session)."""
    return {"last": time.monotonic(), "lock": threading.Lock()}


def collect_garbage_now_and_then(every_s: float = FULL_COLLECTION_EVERY_S) -> bool:
    """Run ``gc.collect()`` if the last one here was more than ``every_s`` seconds ago."""
    clock = _collection_clock()
    with clock["lock"]:
        if time.monotonic() - clock["last"] < every_s:
            return False
        clock["last"] = time.monotonic()
    gc.collect()
    return True


collect_garbage_now_and_then()
login.install_fragment_identity()  # fragment reruns act as the session's user too
# Login required (a served class): nobody gets past here without a login. Else None (LOCAL).
user = login.gate()
if os.environ.get("WORKBENCH_NO_AUTH") == "1":
    st.warning(
        "Open access: this workbench was started with --no-auth, so everyone who can reach "
        "it shares every model, notebook and run.",
        icon="🔓",
    )
with access.acting_as(user):
    persist.keep(workbench_home())  # before any widget: settings survive page changes, reloads
    navigation = st.navigation(visible_pages(user))
    st.sidebar.markdown("### :material/science: LLMOS Workbench")
    login.sidebar(user)
    ui.model_picker()
    try:
        navigation.run()
    finally:  # also when the page stops or reruns: what it collected is saved for a reload
        persist.save(workbench_home())
