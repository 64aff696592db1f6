"""CLI: ``workbench generate`` greedy JSON equals plain transformers; sampling, stops, scoring."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import run_cli as run_cli_subprocess


class Out:
    def __init__(self, code, stdout, stderr):
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run the CLI in-process (fast: no torch import per call) and capture its output."""
    from workbench.cli import main

    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")

    def run(*args, home):
        monkeypatch.setenv("WORKBENCH_HOME", str(home))
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Out(code, captured.out, captured.err)

    return run


def test_cli_module_runs_as_a_subprocess(tiny_models, tmp_path):
    out = run_cli_subprocess(
        "generate",
        str(tiny_models["llama"]),
        "hello",
        "--max-new-tokens",
        "2",
        "--greedy",
        "--json",
        home=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["tokens"]) == 2


def test_generate_json_greedy_equals_plain_transformers(run_cli, tiny_models, tmp_path):
    folder = str(tiny_models["llama"])
    out = run_cli(
        "generate",
        folder,
        "the movie was",
        "--max-new-tokens",
        "12",
        "--greedy",
        "--json",
        home=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok("the movie was", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
        )
    new = ids[0, enc["input_ids"].shape[1] :].tolist()
    assert [t["id"] for t in data["tokens"]] == new
    assert data["text"] == tok.decode(new, skip_special_tokens=True)
    assert all("logprob" in t and len(t["alternatives"]) == 5 for t in data["tokens"])
    assert data["settings"]["greedy"] is True and data["settings"]["max_new_tokens"] == 12
    assert data["perplexity"] > 1 and data["logprob"] < 0


def test_seeded_sampling_via_cli_is_reproducible(run_cli, tiny_models, tmp_path):
    args = (
        "generate",
        str(tiny_models["llama"]),
        "hello world",
        "--max-new-tokens",
        "10",
        "--temperature",
        "1.3",
        "--top-k",
        "0",
        "--top-p",
        "1",
        "--seed",
        "11",
        "--json",
    )
    first, second = (run_cli(*args, home=tmp_path) for _ in range(2))
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["text"] == b["text"] and a["settings"]["seed"] == 11


def test_plain_text_output_chat_and_bad_input(run_cli, tiny_models, tmp_path):
    folder = str(tiny_models["llama"])
    out = run_cli(
        "generate", folder, "hello", "--chat", "--max-new-tokens", "3", "--greedy", home=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert "3 tokens" in out.stderr
    bad = run_cli("generate", folder, "hello", "--top-p", "1.5", home=tmp_path)
    assert bad.returncode == 2 and "top_p" in bad.stderr and "Traceback" not in bad.stderr


def test_perplexity_and_score_commands(run_cli, tiny_models, tmp_path):
    ppl = run_cli(
        "perplexity", str(tiny_models["llama"]), "the movie was good", "--json", home=tmp_path
    )
    assert ppl.returncode == 0, ppl.stderr
    assert json.loads(ppl.stdout)["perplexity"] > 1
    score = run_cli("score", "the cat sat", "the cat sat", home=tmp_path)
    assert score.returncode == 0 and "BLEU 100.00" in score.stdout
