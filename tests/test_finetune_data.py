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
    assert TrainConfig().validated().learning_rate is None  # automatic: choose_settings
    assert TrainConfig(learning_rate=5e-5).validated().learning_rate == 5e-5
    with pytest.raises(InputError, match="batch_size"):
        TrainConfig(batch_size=0).validated()
    with pytest.raises(InputError, match="Invalid model name"):
        JobSpec(base="x", task="classification", data="d.csv", out="Bad Name").validated()
    spec = JobSpec(base="x", task="causal-lm", data="d", out="y", train=TrainConfig(lora=True))
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# --- hostile files: refused with the line, never a crash or a silent merge ------------------


def rows(n: int, text: str, label: str) -> list[str]:
    return [json.dumps({"text": f"{text} {i}", "label": label}) for i in range(n)]


@pytest.mark.parametrize("opener", ["[", '{"a": '])
def test_jsonl_line_nested_100k_deep_is_an_input_error_naming_the_line(tmp_path, opener):
    lines = rows(6, "good", "pos") + [opener * 100_000] + rows(6, "bad", "neg")
    path = write(tmp_path, "deep.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"deep\.jsonl line 7 is nested too deeply"):
        ftdata.load(path, "classification")


def test_unterminated_csv_quote_is_refused_with_its_line_not_merged(tmp_path):
    # Without strict quoting, lines 3-4 were swallowed into line 2's text: one example of
    # "good movie,pos\nbad film\"" labelled neg, and no error at all.
    body = "".join(f"fine film {i},pos\nawful film {i},neg\n" for i in range(6))
    path = write(tmp_path, "q.csv", 'text,label\n"good movie,pos\n"bad film",neg\n' + body)
    with pytest.raises(InputError, match=r"q\.csv line 2: a quoted cell .* not closed"):
        ftdata.load(path, "classification")
    # A quote never closed before the end of the file: named by the line it was opened on.
    path = write(tmp_path, "eof.csv", "text,label\n" + body + '"bad film,neg\nok film,pos\n')
    with pytest.raises(InputError, match=r"eof\.csv line 14: a quoted cell"):
        ftdata.load(path, "classification")


def test_multiline_quoted_cells_stay_valid_and_later_lines_are_counted_right(tmp_path):
    body = "".join(f"fine film {i},pos\nawful film {i},neg\n" for i in range(5))
    path = write(tmp_path, "m.csv", 'text,label\n"two\nlines",pos\n' + body)
    table = ftdata.read_table(path)
    assert table.rows[0] == {"text": "two\nlines", "label": "pos"}
    assert table.lines[:3] == (2, 4, 5)  # the quoted cell spans lines 2-3
    assert ftdata.load(path, "classification").labels == ("neg", "pos")
    bad = write(tmp_path, "m2.csv", 'text,label\n"two\nlines",pos\nx,y,z\n' + body)
    with pytest.raises(InputError, match=r"m2\.csv line 4 has 3 cells"):
        ftdata.read_table(bad)


@pytest.mark.parametrize(
    ("field", "value", "role"),
    [("label", {"k": "neg"}, "label"), ("text", ["bad", "film"], "text")],
)
def test_nested_jsonl_values_used_for_training_are_refused_with_the_line(
    tmp_path, field, value, role
):
    lines = rows(5, "good", "pos") + rows(5, "bad", "neg")
    lines.insert(3, json.dumps({"text": "bad film", "label": "neg", field: value}))
    path = write(tmp_path, "n.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=rf"n\.jsonl line 4: the {role} .* JSON object or list"):
        ftdata.load(path, "classification")


def test_nested_jsonl_values_in_unused_columns_are_fine(tmp_path):
    lines = [
        json.dumps({"text": f"{w} {i}", "label": w, "meta": {"source": ["a", i]}})
        for w in ("good", "bad")
        for i in range(5)
    ]
    path = write(tmp_path, "u.jsonl", "\n".join(lines) + "\n")
    prepared = ftdata.load(path, "classification", ftdata.ColumnMap(text="text", label="label"))
    assert prepared.labels == ("bad", "good")
    table = ftdata.read_table(path)
    assert json.loads(table.rows[0]["meta"]) == {"source": ["a", 0]}  # JSON, not Python repr


def test_empty_cells_are_reported_by_file_line(tmp_path):
    lines = rows(5, "good", "pos") + [""] + rows(5, "bad", "neg")
    lines.insert(8, json.dumps({"text": "", "label": "neg"}))
    path = write(tmp_path, "e.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(InputError, match=r"empty text \('text'\), lines 9:"):
        ftdata.load(path, "classification")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"train": {"epochs": "3"}}, "epochs must be float or int or None, not str"),
        ({"train": {"steps": "50"}}, "Unknown TrainConfig setting"),
        ({"train": {"lora": "yes"}}, "lora must be bool"),
        ({"processes": "2"}, "processes must be int"),
        ({"allow_pickle": 1}, "allow_pickle must be bool"),
    ],
)
def test_wrong_option_types_are_input_errors(data, message):
    spec = {"base": "x", "task": "classification", "data": "d.csv", "out": "y", **data}
    with pytest.raises(InputError, match=message):
        JobSpec.from_dict(spec).validated()
