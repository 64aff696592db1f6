"""Entry script: ``streamlit run workbench/app.py`` (or ``workbench serve``).

Draws the shell first (navigation, sidebar), then starts the engine, so the first page shows
at once and the torch import happens behind a spinner.
"""

from pathlib import Path

import streamlit as st

from workbench import ui

PAGES_DIR = Path(__file__).resolve().parents[1] / "pages"

st.set_page_config(page_title="LLMOS Workbench", page_icon="🧪", layout="wide")

# (file in pages/, title, icon, URL path), in menu order; the first is the home page.
PAGE_TABLE = [
    ("generate.py", "Generate", ":material/edit_note:", "generate"),
    ("attention.py", "Attention", ":material/visibility:", "attention"),
    ("attribution.py", "Explain", ":material/insights:", "explain"),
    ("finetune.py", "Fine-tune", ":material/tune:", "finetune"),
    ("models.py", "Models & system", ":material/storage:", "models"),
]
PAGES = [
    st.Page(str(PAGES_DIR / file), title=title, icon=icon, url_path=url, default=i == 0)
    for i, (file, title, icon, url) in enumerate(PAGE_TABLE)
]

navigation = st.navigation(PAGES)
st.sidebar.markdown("### :material/science: LLMOS Workbench")
ui.model_picker()
navigation.run()
