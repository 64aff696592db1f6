"""Architecture rules: engine/ never imports streamlit; pages/ never import tensor libraries."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TENSOR_LIBS = {"torch", "transformers", "captum", "bertviz", "peft", "accelerate", "numpy"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


ENGINE_FILES = sorted((REPO / "engine").rglob("*.py"))
PAGE_FILES = sorted((REPO / "pages").glob("*.py"))


def test_there_is_something_to_check():
    assert ENGINE_FILES and PAGE_FILES


@pytest.mark.parametrize("path", ENGINE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_engine_does_not_import_streamlit(path):
    assert "streamlit" not in imported_roots(path)


@pytest.mark.parametrize("path", PAGE_FILES, ids=lambda p: p.name)
def test_pages_do_not_import_tensor_libraries(path):
    assert not imported_roots(path) & TENSOR_LIBS


def test_checker_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.nn as nn\nfrom streamlit import title\n")
    assert {"torch", "streamlit"} <= imported_roots(bad)


def test_app_shell_imports_no_torch():
    """The app shell must draw before torch is imported (fast first page)."""
    import subprocess
    import sys

    code = "import sys, workbench.ui; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_project_config_turns_streamlit_post_script_gc_off():
    """A full gc after every rerun (~200 ms of GIL with torch loaded) starved decoding."""
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["runner"]["postScriptGC"] is False


def test_serve_applies_the_project_config_from_another_folder(tmp_path, monkeypatch):
    import subprocess
    import sys

    from workbench.cli import serve

    monkeypatch.chdir(tmp_path)
    command, cwd, env = serve.serve_command(["--server.port", "8600"])
    env = {**env, "HOME": str(tmp_path)}  # no user-level ~/.streamlit/config.toml
    assert (
        Path(cwd) == REPO
        and Path(command[command.index("run") + 1]) == REPO / "workbench" / "http" / "asgi.py"
    )
    flag = command.index("--runner.postScriptGC")
    assert command[flag + 1] == "false" and flag < command.index("--server.port")
    # Streamlit started where serve starts it reads the project's config file
    code = "from streamlit import config; print(config.get_option('runner.postScriptGC'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    # ...which a server started from this other folder would not (the flag covers that case)
    elsewhere = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert elsewhere.stdout.strip() == "True"
