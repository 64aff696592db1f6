"""The CLI: JSON contracts, one-line errors with exit code 2."""

import json

import pytest

from tests.conftest import run_cli


def test_models_list_json(tmp_path):
    out = run_cli("models", "list", "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    names = {e["name"]: e for e in json.loads(out.stdout)}
    assert names["smollm2-135m"]["kind"] == "causal-lm"
    assert names["minilm-l6"]["kind"] == "encoder"


def test_generate_json_on_a_local_folder(tiny_models, tmp_path):
    out = run_cli(
        "generate",
        str(tiny_models["llama"]),
        "the movie was",
        "--max-new-tokens",
        "5",
        "--greedy",
        "--json",
        home=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert isinstance(data["text"], str)
    assert len(data["tokens"]) == 5 and all("logprob" in t for t in data["tokens"])
    assert data["settings"]["greedy"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (("generate", "no-such-model", "hi"), "Unknown model"),
        (("generate", "HuggingFaceTB/SmolLM2-135M", "hi"), "offline"),
        (("models", "remove", "ghost"), "No model named"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path, args, message):
    out = run_cli(*args, home=tmp_path)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0


def test_corrupt_store_entry_is_a_one_line_error(tiny_models, tmp_path):
    from engine.store import ModelStore

    store = ModelStore(tmp_path)
    import shutil

    entry = store.write(
        "broken",
        lambda f: [shutil.copy(p, f) for p in tiny_models["llama"].iterdir()],
        kind="causal-lm",
        source="test",
        licence="MIT",
    )
    (entry.path / "model.safetensors").write_bytes(b"truncated")
    out = run_cli("generate", "broken", "hi", home=tmp_path)
    assert out.returncode == 2
    assert "corrupt" in out.stderr and "workbench models remove broken" in out.stderr
    assert "Traceback" not in out.stderr


def test_pickled_weights_need_the_cli_opt_in(tiny_models, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_models["llama"], folder)
    state = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    refused = run_cli("generate", str(folder), "hello", "--max-new-tokens", "2", home=tmp_path)
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr
    allowed = run_cli(
        "--allow-pickle", "generate", str(folder), "hello", "--max-new-tokens", "2", home=tmp_path
    )
    assert allowed.returncode == 0, allowed.stderr


def test_models_prepare_converts_once(tmp_path):
    first = run_cli("models", "prepare", "minilm-l6", home=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "minilm-l6: converted" in first.stdout and "%]" in first.stderr  # with progress
    assert (tmp_path / "models" / "minilm-l6" / "manifest.json").is_file()
    again = run_cli("models", "prepare", "minilm-l6", home=tmp_path)
    assert "minilm-l6: already in the store" in again.stdout
    unknown = run_cli("models", "prepare", "no-such-model", home=tmp_path)
    assert unknown.returncode == 2 and "not an embedded model" in unknown.stderr


@pytest.mark.parametrize(
    "address", [["--server.address", "0.0.0.0"], ["--server.address=192.0.2.7"]]
)
def test_serve_refuses_a_network_address_without_login(tmp_path, address):
    refused = run_cli("serve", *address, "--server.port", "1", home=tmp_path, timeout=60)
    assert refused.returncode == 2
    assert "Refusing to serve" in refused.stderr and "--no-auth" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_serve_exposure_rules():
    from engine.errors import InputError
    from workbench.cli.serve import check_exposure, listen_address

    assert listen_address([]) == "localhost"
    assert listen_address(["--server.port", "9", "--server.address", "0.0.0.0"]) == "0.0.0.0"
    check_exposure(["--server.address", "127.0.0.1"], no_auth=False)  # local: fine
    check_exposure(["--server.address", "0.0.0.0"], no_auth=True)  # said so explicitly
    with pytest.raises(InputError, match="without a login"):
        check_exposure(["--server.address", "0.0.0.0"], no_auth=False)
