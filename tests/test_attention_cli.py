"""``workbench attention MODEL TEXT --out FILE.npz [--json]`` on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.test_attention_engine import TEXT, plain_eager_attentions


@pytest.mark.parametrize("name,kind", [("llama", "causal-lm"), ("bert", "encoder")])
def test_cli_npz_equals_plain_transformers(tiny_models, tmp_path, name, kind):
    out_file = tmp_path / "att.npz"
    out = run_cli(
        "attention",
        str(tiny_models[name]),
        TEXT,
        "--out",
        str(out_file),
        "--json",
        home=tmp_path / "home",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    expected = plain_eager_attentions(tiny_models[name], TEXT, kind)
    assert data["shape"] == dict(
        zip(["layer", "head", "query", "key"], expected.shape, strict=True)
    )
    assert len(data["heads"]) == 2 * 4 and {"entropy", "first_token"} <= set(data["heads"][0])
    assert data["provenance"]["model"] == str(tiny_models[name])
    with np.load(out_file) as npz:
        np.testing.assert_allclose(npz["attentions"], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(npz["attentions"].sum(-1), 1.0, atol=1e-5)
        assert list(npz["tokens"]) == data["tokens"]
        assert json.loads(str(npz["provenance"]))["fingerprint"]


def test_cli_bad_input_is_one_line_exit_2(tiny_models, tmp_path):
    out = run_cli(
        "attention",
        str(tiny_models["llama"]),
        "  ",
        "--out",
        str(tmp_path / "a.npz"),
        home=tmp_path / "home",
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: The text is empty")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("bad", ["/proc/nope/a.npz", "{tmp}"])
def test_cli_unwritable_out_fails_at_once_before_loading(tiny_models, tmp_path, bad):
    import time

    started = time.monotonic()
    out = run_cli(
        "attention",
        str(tiny_models["llama"]),
        TEXT,
        "--out",
        bad.format(tmp=tmp_path),  # a folder, not a file
        home=tmp_path / "home",
    )
    seconds = time.monotonic() - started
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "--out" in lines[0] and "Traceback" not in out.stderr
    assert "Loading" not in out.stderr and "%]" not in out.stderr  # no model was loaded
    assert not (tmp_path / "home").exists() or not any((tmp_path / "home").rglob("*.safetensors"))
    assert seconds < 30


def test_cli_truncate_drops_tokens_past_max_tokens(tiny_models, tmp_path):
    out_file = tmp_path / "sub" / "t.npz"
    out = run_cli(
        "attention",
        str(tiny_models["bert"]),
        TEXT,
        "--out",
        str(out_file),
        "--max-tokens",
        "4",
        "--truncate",
        "--json",
        home=tmp_path / "home",
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["shape"]["query"] == 4 and data["dropped_tokens"] == len(TEXT.split()) - 4
    with np.load(out_file) as npz:
        assert npz["attentions"].shape[-1] == 4 and int(npz["dropped_tokens"]) == 6
        expected = plain_eager_attentions(tiny_models["bert"], " ".join(TEXT.split()[:4]), "x")
        np.testing.assert_allclose(npz["attentions"], expected, rtol=1e-5, atol=1e-6)
    assert not [p for p in out_file.parent.iterdir() if p.name.startswith(".")]  # no temp left
