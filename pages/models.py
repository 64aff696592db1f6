"""Models & system: what is loaded, what is stored, and how much memory is in use."""

import pandas as pd
import streamlit as st

from workbench import ui

st.title("Models & system")
wb = ui.engine()
# Loading, unloading, the store's folder and the machine's memory are for admins; other roles
# see which models exist and are loaded (the engine refuses the rest anyway).
manager = ui.can("models.manage")

st.subheader("Loaded models")
loaded = wb.loaded()
if loaded:
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "name": m.name,
                    "kind": m.kind,
                    "architecture": m.architecture,
                    "parameters (M)": round(m.parameters / 1e6, 1),
                    "dtype": m.dtype,
                    "device": m.device,
                    "memory": ui.human_bytes(m.memory_bytes),
                    "load time (s)": round(m.load_seconds, 2),
                    "busy": m.busy,
                    "fingerprint": m.fingerprint[:23] + "…",
                }
                for m in loaded
            ]
        ),
        hide_index=True,
        width="stretch",
    )
else:
    st.info("No model is loaded yet. Load one below or open any page to load the sidebar's model.")

catalog = wb.catalog()
names = [entry.name for entry in catalog]


def load_controls(loaded) -> None:
    load_col, unload_col = st.columns(2)
    with load_col:
        to_load = st.selectbox("Load a model", names, key="load_choice")
        if st.button("Load", type="primary"):
            ui.load_model(to_load)
            st.success(f"{to_load} is loaded.")
            st.rerun()
    with unload_col:
        loaded_names = [m.name for m in loaded]
        to_unload = st.selectbox(
            "Unload a model", loaded_names, key="unload_choice", disabled=not loaded_names
        )
        if st.button("Unload", disabled=not loaded_names):
            with ui.guard():
                wb.unload(to_unload)
            st.rerun()


st.subheader("Available models")
st.dataframe(
    pd.DataFrame(
        [
            {
                "name": e.name,
                "source": e.source,
                "kind": e.kind,
                "description": e.description,
                "installed": e.installed,
                "in store": e.in_store,
                "loaded": e.loaded,
            }
            for e in catalog
        ]
    ),
    hide_index=True,
    width="stretch",
)


def store_section() -> None:
    st.subheader("Model store")
    st.caption(f"Folder: `{wb.store.root}`")
    entries, damaged = wb.store.scan()
    for bad in damaged:
        st.warning(f"Damaged store entry {bad.name!r}: {bad.reason}", icon="⚠️")
    if entries:
        st.dataframe(
            pd.DataFrame(
                [
                    {
                        "name": e.name,
                        "kind": e.manifest.kind,
                        "source": e.manifest.source,
                        "base model": e.manifest.base_model or "",
                        "licence": e.manifest.licence,
                        "size": ui.human_bytes(e.size_bytes),
                        "fingerprint": e.manifest.fingerprint,
                    }
                    for e in entries
                ]
            ),
            hide_index=True,
            width="stretch",
        )
        to_verify = st.selectbox("Verify an entry's fingerprint", [e.name for e in entries])
        if st.button("Verify"):
            with ui.guard(), st.spinner("Hashing weights…"):
                ok = wb.store.verify(to_verify)
            (st.success if ok else st.error)(
                f"{to_verify}: fingerprint {'matches' if ok else 'DOES NOT match'} the manifest."
            )
    else:
        st.info("The store is empty: embedded models are converted into it on first load.")


def system_section() -> None:
    st.subheader("System")
    mem = wb.memory()
    cols = st.columns(4)
    cols[0].metric("Process memory (RSS)", ui.human_bytes(mem.process_rss))
    cols[1].metric(
        "System RAM used", f"{ui.human_bytes(mem.system_used)} / {ui.human_bytes(mem.system_total)}"
    )
    cols[2].metric("Memory budget for models", ui.human_bytes(wb.manager.budget_bytes))
    if mem.gpu_total is not None:
        cols[3].metric(
            "GPU memory allocated",
            ui.human_bytes(mem.gpu_allocated),
            help=f"{mem.gpu_name}: {ui.human_bytes(mem.gpu_total)} in all, "
            f"{ui.human_bytes(mem.gpu_reserved)} reserved by torch",
        )
    else:
        cols[3].metric("GPU", "none", help="No CUDA or MPS device: running on the CPU.")


if manager:
    load_controls(loaded)
    store_section()
    system_section()
else:
    st.caption("Loading and unloading models, the model store and the machine are for admins.")
