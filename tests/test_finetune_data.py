"""Fine-tuning data: formats, column mapping, split, and the errors users see."""

from __future__ import annotations

import json

import pytest

from engine.errors import InputError
from engine.finetune import data as ftdata
from engine.finetune.config import JobSpec, TrainConfig


def write(tmp_path, name: str, content: str | bytes):
    path = tmp_path / name
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def sentiment_csv(n: int = 10) -> str:
    rows = [f"good movie {i},pos" for i in range(n)] + [f"bad film {i},neg" for i in range(n)]
    return "text,label\n" + "\n".join(rows) + "\n"


def test_csv_split_is_stratified_and_deterministic(tmp_path):
    path = write(tmp_path, "d.csv", sentiment_csv(10))
    a = ftdata.load(path, "classification", val_fraction=0.2, seed=1)
    b = ftdata.load(path, "classification", val_fraction=0.2, seed=1)
    assert a.labels == ("neg", "pos")
    assert len(a.train) == 16 and len(a.val) == 4
    assert sorted(ex.label for ex in a.val) == [0, 0, 1, 1]
    assert a.train == b.train and a.hash == b.hash
    assert ftdata.load(path, "classification", seed=2).hash != a.hash
    assert not {ex.text for ex in a.train} & {ex.text for ex in a.val}


def test_jsonl_instruction_pairs_and_column_guess(tmp_path):
    lines = [json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) for i in range(6)]
    path = write(tmp_path, "d.jsonl", "\n".join(lines) + "\n")
    prepared = ftdata.load(path, "causal-lm")
    assert prepared.instruction
    assert prepared.columns == ftdata.ColumnMap(prompt="instruction", response="output")
    assert len(prepared.train) + len(prepared.val) == 6


def test_txt_paragraphs_are_examples(tmp_path):
    path = write(tmp_path, "d.txt", "one two\nthree\n\nfour\n\nfive\n\nsix\n\nseven\n")
    table = ftdata.read_table(path)
    assert table.columns == ("text",)
    assert [r["text"] for r in table.rows] == ["one two three", "four", "five", "six", "seven"]


def test_shipped_samples_are_valid():
    sentiment = ftdata.load(ftdata.sample_path("sentiment"), "classification")
    assert sentiment.labels == ("negative", "positive")
    assert len(sentiment.train) + len(sentiment.val) >= 300
    assert min(sentiment.class_counts().values()) >= 150
    assert ftdata.load(ftdata.sample_path("instructions"), "causal-lm").instruction
    assert len(ftdata.load(ftdata.sample_path("stories"), "causal-lm").train) >= 20
    assert set(ftdata.samples("classification")) == {"sentiment"}


@pytest.mark.parametrize(
    ("name", "content", "columns", "message"),
    [
        ("d.csv", sentiment_csv(), ftdata.ColumnMap(text="review"), "no column 'review'"),
        ("d.csv", "text,label\ngood,pos\n,neg\n" + sentiment_csv()[11:], None, "empty text"),
        ("d.csv", "text,label\n" + "good,pos\n" * 6 + "bad,neg\n" * 2, None, "'neg' has 2"),
        ("d.csv", "text,label\n" + "good,pos\n" * 6, None, "single class"),
        ("d.csv", b"text,label\n\xff\xfe bad bytes,pos\n", None, "not UTF-8"),
        ("d.csv", "", None, "is empty"),
        ("d.csv", "text,label\na,b,c\n", None, "line 2 has 3 cells"),
        ("d.xlsx", "x", None, "unsupported file type"),
        ("d.jsonl", '{"text": "a"}\nnot json\n', None, "line 2 is not valid JSON"),
    ],
)
def test_clear_errors(tmp_path, name, content, columns, message):
    path = write(tmp_path, name, content)
    with pytest.raises(InputError, match=message):
        ftdata.load(path, "classification", columns)


def test_too_few_lm_examples(tmp_path):
    path = write(tmp_path, "d.txt", "one\ntwo\n")
    with pytest.raises(InputError, match="at least 4"):
        ftdata.load(path, "causal-lm")


def test_config_validation_and_defaults():
    assert TrainConfig().validated().learning_rate == 5e-5
    assert TrainConfig(lora=True).validated().learning_rate == 5e-4
    with pytest.raises(InputError, match="batch_size"):
        TrainConfig(batch_size=0).validated()
    with pytest.raises(InputError, match="Invalid model name"):
        JobSpec(base="x", task="classification", data="d.csv", out="Bad Name").validated()
    spec = JobSpec(base="x", task="causal-lm", data="d", out="y", train=TrainConfig(lora=True))
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
