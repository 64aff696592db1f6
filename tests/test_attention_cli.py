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
