"""Generate: prompt or chat, full sampling control, streaming with Stop, token probabilities,
evaluation (perplexity, BLEU/chrF) and side-by-side comparison of models.

Every action starts an engine run (generate, perplexity, compare); a fragment draws the
run's snapshot while it goes (streamed text, progress, "waiting for the model", Stop) and the
page collects its typed result when it ends. The run's error stays on the page until replaced.
"""

from dataclasses import replace

import pandas as pd
import streamlit as st

from engine.html import text_html
from workbench import renderers, ui

RUN, RESULT, HISTORIES = "gen_run", "gen_result", "gen_histories"
RUN_PRESET = "gen_run_preset"  # the preset whose conversation the running reply belongs to
COMPARE_RUN, COMPARISON, COMPARE_ERROR = "gen_compare_run", "gen_comparison", "gen_compare_error"
PPL_RUN, PPL_RESULT, PPL_ERROR = "eval_ppl_run", "eval_ppl_result", "eval_ppl_error"
IDLE_S = 30.0  # a run nobody polls for this long (closed tab) stops itself

st.title("Generate")
ui.page_needs("run")
wb = ui.engine()

from engine.generation import (  # noqa: E402
    GENERATIVE_KINDS,
    GenerationSettings,
    conversation,  # noqa: E402
    parse_seed,
    parse_stop_sequences,
)
from engine.generation import presets as presets_mod  # noqa: E402  (after the engine spinner)
from engine.generation.comparison import Variant  # noqa: E402
from engine.generation.evaluation import overlap_scores  # noqa: E402

st.session_state.setdefault(HISTORIES, {})


def history(preset_name: str) -> list[tuple[str, str]]:
    """The conversation of one chat preset (each preset keeps its own: no turns leak between
    "Chat" and "Translate")."""
    return st.session_state[HISTORIES].setdefault(preset_name, [])


def read_settings() -> GenerationSettings:
    """The decoding controls as engine settings (raises InputError for bad seed)."""
    s = st.session_state
    return GenerationSettings(
        max_new_tokens=int(s.gen_max_new_tokens),
        greedy=bool(s.gen_greedy),
        temperature=float(s.gen_temperature),
        top_k=int(s.gen_top_k),
        top_p=float(s.gen_top_p),
        repetition_penalty=float(s.gen_repetition_penalty),
        seed=parse_seed(s.gen_seed),
        stop_sequences=parse_stop_sequences(s.gen_stop),
        keep_last_tokens=bool(s.gen_keep_last),
    )


def table_variants(rows: pd.DataFrame, shared: GenerationSettings) -> list[Variant]:
    """The Compare tab's variant table as engine variants (blank cells: the shared value)."""

    def cell(row: dict, name: str, default):
        return default if pd.isna(row.get(name)) else row[name]

    variants = []
    for row in rows.dropna(subset=["model"]).to_dict("records"):
        seed = cell(row, "seed", shared.seed)
        own = replace(
            shared,
            greedy=bool(cell(row, "greedy", shared.greedy)),
            temperature=float(cell(row, "temperature", shared.temperature)),
            top_p=float(cell(row, "top_p", shared.top_p)),
            seed=None if seed is None else int(seed),
        )
        variants.append(Variant(str(row["model"]), own))
    return variants


# --- decoding controls (shared by Generate and Compare) -----------------------------------
with st.expander("Decoding settings", expanded=True):
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Max new tokens", min_value=1, value=64, step=16, key="gen_max_new_tokens")
    c1.toggle("Greedy (deterministic)", value=False, key="gen_greedy")
    c2.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key="gen_temperature", help="0 means greedy.")
    c2.number_input("Top-k (0 = off)", min_value=0, value=50, key="gen_top_k")
    c3.slider("Top-p (1 = off)", 0.01, 1.0, 0.95, 0.01, key="gen_top_p")
    c3.slider("Repetition penalty", 0.5, 2.0, 1.0, 0.05, key="gen_repetition_penalty")
    c4.text_input("Seed (empty = random)", value="", key="gen_seed")
    c4.text_input(
        "Stop sequences", value="", key="gen_stop", help=r"Separate with |; \n is a newline."
    )
    c4.checkbox(
        "Keep last tokens if the prompt is too long",
        key="gen_keep_last",
        help="Drop the start of a prompt that does not fit the context window.",
    )
    if not st.session_state.gen_greedy and st.session_state.gen_temperature == 0:
        st.caption("Temperature 0: decoding is greedy.")

tab_gen, tab_eval, tab_compare = st.tabs(["Generate", "Evaluate", "Compare models"])


def collect(run_key: str, result_key: str, error_key: str):
    """Move a finished run's result (or its one-line error) into the page's state.

    Returns the run while it is still going, else None. An error stays until the next run.
    """
    run = st.session_state.get(run_key)
    if run is None or not run.done:
        return run
    st.session_state.pop(run_key)
    snap = run.snapshot()
    if snap.result is not None:
        st.session_state[result_key] = snap.result
        st.session_state[f"{result_key}_run_id"] = run.id
    else:
        st.session_state[error_key] = snap.error
    return None


def outcome(run_key: str, result_key: str, error_key: str, key: str) -> None:
    """A run's progress while it goes, then its error or its result (drawn by its renderer)
    with "Add to notebook"."""
    ui.poll_run(run_key, lambda r: ui.run_progress(r, key=f"{key}_stop"))
    if st.session_state.get(error_key):
        ui.show_error(st.session_state[error_key])
    result = st.session_state.get(result_key)
    if result is not None:
        renderers.render(result, key)
        ui.add_to_notebook(st.session_state.get(f"{result_key}_run_id"), f"{key}_add_to_notebook")


# --- collect finished runs (main body, so the whole page shows their results) -------------
had_run = st.session_state.get(RUN) is not None
run = collect(RUN, RESULT, "gen_error")
if had_run and run is None:
    done = st.session_state.get(RESULT)
    if done is not None and done.mode == "chat" and "gen_error" not in st.session_state:
        history(st.session_state.get(RUN_PRESET, "")).append(("assistant", done.text))

with tab_gen:
    home = wb.home
    with ui.guard():
        all_presets = presets_mod.list_presets(home)
    names = [p.name for p in all_presets]
    left, right = st.columns([3, 2])
    preset_name = left.selectbox("Task preset", names, key="gen_preset")
    preset = all_presets[names.index(preset_name)]
    chat_mode = preset.mode == "chat"
    template = right.text_area(
        "Template ({input} is replaced by your text)",
        value=preset.template,
        key=f"gen_template::{preset.name}",
        height=68,
    )
    with st.expander("Save this template as a preset"):
        new_name = st.text_input("Preset name", key="gen_preset_name")
        b1, b2 = st.columns(2)
        if b1.button("Save preset"):
            with ui.guard():
                saved = presets_mod.save_preset(
                    home,
                    presets_mod.Preset(
                        new_name, template, preset.mode, int(st.session_state.gen_max_new_tokens)
                    ),
                )
            st.success(f"Saved preset {saved.name!r} in {home}.")
        if not preset.builtin and b2.button("Delete this preset"):
            with ui.guard():
                presets_mod.delete_preset(home, preset.name)
            st.rerun()

    if chat_mode:
        st.text_input("System message (optional)", key="gen_system")
        turns = history(preset.name)
        if turns:
            st.caption(f"Conversation with the {preset.name!r} preset")
        for role, content in turns:
            with st.chat_message(role):  # user and model text: text, never Markdown
                st.markdown(f"<div>{text_html(content)}</div>", unsafe_allow_html=True)
        if turns and st.button("Clear conversation"):
            turns.clear()
            st.session_state.pop(RESULT, None)
            st.rerun()
    prompt_label = "Your message" if chat_mode else "Prompt"
    example = "The Eiffel Tower is located in the city of"
    if not st.session_state.get("gen_input") and not chat_mode:
        st.button(
            f"Try: “{example}”",
            key="gen_example",
            on_click=lambda: st.session_state.update(gen_input=example),
            help="A first prompt: SmolLM2 answers it in a second or two.",
        )
    user_text = st.text_area(
        prompt_label, key="gen_input", height=120, placeholder=f"e.g. {example}"
    )
    go = st.button(
        "Send" if chat_mode else "Generate",
        type="primary",
        disabled=run is not None,
        key="gen_go",
    )
    if go:
        st.session_state.pop("gen_error", None)
        with ui.guard():
            settings = read_settings()
            model = ui.current_model()
            if preset.mode == "chat":
                message = presets_mod.Preset(preset.name, template, "chat").render(user_text)
                system = st.session_state.get("gen_system", "")
                messages = conversation(history(preset.name), message, system)
                run = model.start_generation(message, settings, messages, idle_timeout_s=IDLE_S)
                history(preset.name).append(("user", message))
                st.session_state[RUN_PRESET] = preset.name
            else:
                prompt = presets_mod.Preset(preset.name, template, "text").render(user_text)
                run = model.start_generation(prompt, settings, idle_timeout_s=IDLE_S)
        st.session_state[RUN] = run
        st.session_state.pop(RESULT, None)

    def live_output(current) -> None:
        """While a run is going: its text so far (or what it waits for) and Stop."""
        snap = current.snapshot()
        text = snap.partial.text if snap.partial is not None else ""
        n_tokens = len(snap.partial.tokens) if snap.partial is not None else 0
        with st.container(key="gen_stream", border=True):
            if snap.waiting:
                st.info(snap.message, icon="⏳")
            st.markdown(f"<div>{text_html(text)}▌</div>" if text else "…", unsafe_allow_html=True)
            stopping = " · stopping…" if current.context.cancel_event.is_set() else ""
            st.caption(f"{n_tokens} tokens · {snap.seconds:.1f} s{stopping}")
        st.button("Stop", key="gen_stop_button", on_click=current.cancel, type="secondary")

    ui.poll_run(RUN, live_output)

    if st.session_state.get("gen_error"):
        ui.show_error(st.session_state["gen_error"])
    result = st.session_state.get(RESULT)
    if result is not None and run is None:
        renderers.render(result, "gen")
        ui.add_to_notebook(st.session_state.get(f"{RESULT}_run_id"), "gen_add_to_notebook")

with tab_eval:
    st.subheader("Perplexity of a text")
    last = st.session_state.get(RESULT)
    if last is not None and not st.session_state.get("eval_text"):
        st.session_state["eval_text"] = (last.model_input or last.prompt) + last.text
    text = st.text_area("Text to score", key="eval_text", height=100)
    ppl_run = collect(PPL_RUN, PPL_RESULT, PPL_ERROR)
    if st.button("Compute perplexity", key="eval_ppl", disabled=ppl_run is not None):
        for stale in (PPL_RESULT, PPL_ERROR):
            st.session_state.pop(stale, None)
        with ui.guard():
            st.session_state[PPL_RUN] = ui.current_model().start_perplexity(text)
    outcome(PPL_RUN, PPL_RESULT, PPL_ERROR, "eval_ppl")
    st.subheader("BLEU and chrF against a reference")
    last = st.session_state.get(RESULT)
    hyp = st.text_area(
        "Output", value=last.text if last is not None else "", key="eval_hyp", height=80
    )
    ref = st.text_area("Reference", key="eval_ref", height=80)
    if st.button("Score", key="eval_score"):
        with ui.guard():
            renderers.render(overlap_scores(hyp, ref), "eval_scores")

with tab_compare:
    options = [e.name for e in wb.catalog() if e.kind in GENERATIVE_KINDS]
    if ui.can("models.manage"):  # "Other models" (folders, hub ids) are admins' only
        options += [
            m.name for m in wb.loaded() if m.kind in GENERATIVE_KINDS and m.name not in options
        ]
    current = ui.selected_model_name()
    if current not in options:
        options.append(current)
    # a fine-tuned version of the current model is suggested next to it (base vs tuned)
    tuned = [
        e.name
        for e in wb.store.entries()
        if e.manifest.base_model == current and e.manifest.kind in GENERATIVE_KINDS
    ]
    chosen = st.multiselect(
        "Models (with the decoding settings above)",
        options,
        default=[current, *tuned[:1]],
        key="cmp_models",
    )
    st.caption("Variants with their own settings (e.g. the same model greedy vs sampled):")
    variant_rows = st.data_editor(
        pd.DataFrame(
            [{"model": current, "greedy": False, "temperature": 1.0, "top_p": 0.95, "seed": 0}]
            if len(chosen) < 2
            else [],
            columns=["model", "greedy", "temperature", "top_p", "seed"],
        ),
        column_config={
            "model": st.column_config.SelectboxColumn("model", options=options, required=True),
            "greedy": st.column_config.CheckboxColumn("greedy"),
            "temperature": st.column_config.NumberColumn(
                "temperature", min_value=0.0, max_value=2.0
            ),
            "top_p": st.column_config.NumberColumn("top-p", min_value=0.01, max_value=1.0),
            "seed": st.column_config.NumberColumn("seed", min_value=0, step=1),
        },
        num_rows="dynamic",
        hide_index=True,
        key="cmp_variants",
    )
    cmp_prompt = st.text_area("Prompt to compare", key="cmp_prompt", height=80)
    cmp_run = collect(COMPARE_RUN, COMPARISON, COMPARE_ERROR)
    if st.button("Compare", key="cmp_go", disabled=cmp_run is not None):
        for stale in (COMPARISON, COMPARE_ERROR):
            st.session_state.pop(stale, None)
        with ui.guard():
            settings = read_settings()
            variants = [*chosen, *table_variants(variant_rows, settings)]
            st.session_state[COMPARE_RUN] = wb.start_comparison(variants, cmp_prompt, settings)
        st.rerun()
    outcome(COMPARE_RUN, COMPARISON, COMPARE_ERROR, "cmp")
