"""Entry script: ``streamlit run workbench/app.py`` (or ``workbench serve``).

Draws the shell first (navigation, sidebar), then starts the engine, so the first page shows
at once and the torch import happens behind a spinner.
"""

from pathlib import Path

import streamlit as st

from workbench import ui

PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="LLMOS Workbench", page_icon="🧪", layout="wide")

PAGES = [
    st.Page(
        str(PAGES_DIR / "generate.py"),
        title="Generate",
        icon=":material/edit_note:",
        url_path="generate",
        default=True,
    ),
    st.Page(
        str(PAGES_DIR / "finetune.py"),
        title="Fine-tune",
        icon=":material/tune:",
        url_path="finetune",
    ),
    st.Page(
        str(PAGES_DIR / "models.py"),
        title="Models & system",
        icon=":material/storage:",
        url_path="models",
    ),
    st.Page(
        str(PAGES_DIR / "attention.py"),
        title="Attention",
        icon=":material/visibility:",
        url_path="attention",
    ),
    st.Page(
        str(PAGES_DIR / "attribution.py"),
        title="Explain",
        icon=":material/insights:",
        url_path="explain",
    ),
]

navigation = st.navigation(PAGES)
st.sidebar.markdown("### :material/science: LLMOS Workbench")
ui.model_picker()
navigation.run()
