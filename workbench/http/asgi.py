"""The served app: the Streamlit pages and the ``/v1`` HTTP API in one process.

``workbench serve`` runs ``streamlit run workbench/http/asgi.py``; Streamlit finds ``app``
(an ``st.App``) and serves it with uvicorn. Both sides use the one engine: the routes call
``workbench.ui.get_workbench``, the ``st.cache_resource`` the pages use.

This file is imported as a top-level module ``asgi`` (Streamlit puts its folder on
``sys.path``), so it only imports through absolute package paths.
"""

from pathlib import Path

import streamlit as st

from workbench.http import routes
from workbench.ui import get_workbench

APP = Path(__file__).resolve().parents[1] / "app.py"

app = st.App(APP, routes=routes(get_workbench))
