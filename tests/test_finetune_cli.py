"""``workbench finetune`` and ``workbench classify`` end to end on a tiny classifier."""

from __future__ import annotations

import json

from engine.store import ModelStore
from workbench.cli import main


def test_finetune_then_classify(tmp_path, tiny_models, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    good = ["good movie", "great film", "i love this film", "a fun plot", "very good actor"]
    bad = ["bad movie", "terrible film", "i hate this film", "a boring plot", "very bad actor"]
    data = tmp_path / "reviews.csv"
    data.write_text(
        "review,sentiment\n"
        + "\n".join([f"{t},positive" for t in good * 4] + [f"{t},negative" for t in bad * 4])
    )
    code = main(
        [
            "finetune", "--base", str(tiny_models["classifier"]), "--task", "classification",
            "--data", str(data), "--text-column", "review", "--label-column", "sentiment",
            "--epochs", "4", "--batch-size", "8", "--lr", "5e-3", "--out", "tiny-cli", "--json",
        ]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    job = json.loads(captured.out)
    assert job["status"] == "completed" and job["step"] == job["total_steps"] == 16
    assert "step 16/16" in captured.err  # progress was shown
    settings = job["settings"]  # what the job ran with, and why (all explicit here)
    assert (settings["epochs"], settings["batch_size"], settings["learning_rate"]) == (4, 8, 5e-3)
    assert settings["automatic"] == [] and settings["steps"] == 16
    assert "settings: 32 training examples, batch 8: 16 steps (4 epochs) at 5e-3." in captured.err
    result = job["result"]
    before, after = result["metrics_before"], result["metrics_after"]
    assert after["eval_loss"] < before["eval_loss"]
    assert set(after) >= {"accuracy", "f1", "confusion"} and sum(map(sum, after["confusion"])) == 8

    store = ModelStore(home)
    manifest = store.get("tiny-cli").manifest
    assert manifest.kind == "classifier" and manifest.base_model == str(tiny_models["classifier"])
    assert manifest.base_fingerprint.startswith("sha256:")
    assert manifest.extra["data_hash"] == result["data_hash"]
    assert manifest.extra["hyperparameters"]["learning_rate"] == 5e-3
    assert manifest.extra["metrics_after"] == after
    assert store.verify("tiny-cli")

    assert main(["classify", "tiny-cli", "a good movie", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] in ("negative", "positive")
    assert set(out["scores"]) == {"negative", "positive"}
    assert abs(sum(out["scores"].values()) - 1) < 1e-5
    assert out["provenance"]["model"] == "tiny-cli"


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "home"))
    code = main(
        ["finetune", "--base", "minilm-l6", "--task", "classification", "--data",
         str(tmp_path / "missing.csv"), "--out", "x"]
    )  # fmt: skip
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
