"""LLMOS Workbench: the Streamlit app shell, shared UI pieces, the cached engine and the CLI."""
