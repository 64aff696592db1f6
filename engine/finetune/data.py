"""Fine-tuning data: read CSV / JSONL / TXT, map columns, validate, split train/validation.

No torch here (the page imports this module). Every problem becomes an ``InputError`` whose
one-line message names the file, the row and the fix.

    table = read_table("reviews.csv")                     # Table(columns, rows)
    data = prepare(table, "classification", ColumnMap(text="text", label="label"))
    data.train, data.val, data.labels, data.hash
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from engine import access
from engine.errors import InputError
from engine.files import atomic_write_bytes, disk_error

Task = Literal["classification", "causal-lm"]
TASKS: tuple[Task, ...] = ("classification", "causal-lm")
FORMATS = (".csv", ".jsonl", ".txt")
MIN_PER_CLASS = 4
MAX_BYTES = 200 * 2**20
UPLOADS = "uploads"  # HOME/uploads/<user>/<sha256>-<safe name>
UPLOAD_KEEP = 10  # uploads kept per user (the oldest are deleted beyond this)
TEXT_COLUMN = "text"  # the one column of a .txt file (one example per paragraph)

# Shipped samples (engine/data/): name -> (file, task, what it is)
SAMPLES: dict[str, tuple[str, Task, str]] = {
    "sentiment": ("sentiment.csv", "classification", "labelled review sentences (pos/neg)"),
    "instructions": ("instructions.jsonl", "causal-lm", "short instruction/response pairs"),
    "stories": ("stories.txt", "causal-lm", "short plain-text paragraphs"),
}


@dataclass(frozen=True)
class Table:
    """A file read as rows of strings. ``rows[i]`` maps column -> cell text.

    ``lines[i]``: the file line row ``i`` starts on (1-based; TXT: its first line, or 0 when
    unknown). ``nested``: (row index, column) of JSONL cells that held an object or a list
    (kept as JSON text for display; refused when such a column is used for training).
    """

    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    fmt: str
    sha256: str
    lines: tuple[int, ...] = ()
    nested: frozenset[tuple[int, str]] = frozenset()

    def line_of(self, row: int) -> int:
        """File line of row ``row`` (0-based index), or the 1-based row number if unknown."""
        return self.lines[row] if row < len(self.lines) and self.lines[row] else row + 1

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class ColumnMap:
    """Which columns hold what. Classification: text + label. Causal LM: text, or prompt +
    response (instruction pairs, formatted with the tokenizer's chat template)."""

    text: str | None = None
    label: str | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass(frozen=True)
class Example:
    """One training example. Classification: ``text`` + ``label`` (index into labels).
    Causal LM: ``text`` alone, or ``prompt`` + ``response``."""

    text: str = ""
    label: int | None = None
    prompt: str | None = None
    response: str | None = None


@dataclass(frozen=True)
class Prepared:
    """Validated data, split. ``labels`` is empty for causal LM; ``hash`` covers file and mapping."""

    task: Task
    train: tuple[Example, ...]
    val: tuple[Example, ...]
    labels: tuple[str, ...]
    hash: str
    columns: ColumnMap

    @property
    def instruction(self) -> bool:
        return bool(self.train) and self.train[0].prompt is not None

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.labels, 0)
        for ex in self.train + self.val:
            counts[self.labels[ex.label]] += 1
        return counts


def sample_path(name: str) -> Path:
    """Path of a shipped sample data set (see ``SAMPLES``)."""
    if name not in SAMPLES:
        raise InputError(f"Unknown sample {name!r}: use one of {', '.join(SAMPLES)}.")
    return Path(str(resources.files("engine.data").joinpath(SAMPLES[name][0])))


def samples(task: Task | None = None) -> dict[str, str]:
    """Sample names (for ``task``, or all) -> one-line description."""
    return {k: v[2] for k, v in SAMPLES.items() if task is None or v[1] == task}


def _decode(raw: bytes, name: str) -> str:
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{name} is not UTF-8 text (undecodable byte at offset {exc.start}): "
            "save it as UTF-8 CSV, JSONL or TXT."
        ) from exc


def read_table(source: str | Path, data: bytes | None = None) -> Table:
    """Read a CSV (header row), JSONL (one object a line) or TXT file (paragraphs separated by
    blank lines, else lines) into a ``Table``. ``data`` gives the bytes of an upload named
    ``source``."""
    name = " ".join(Path(source).name.split())[:80]  # shown in one-line messages
    suffix = Path(source).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(
            f"{name}: unsupported file type {suffix or '(none)'}; use CSV, JSONL or TXT."
        )
    if data is None:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"Data file {source} does not exist.")
        if path.stat().st_size > MAX_BYTES:
            raise InputError(f"{name} is larger than {MAX_BYTES // 2**20} MiB: use a smaller file.")
        data = path.read_bytes()
    text = _decode(data, name)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not text.strip():
        raise InputError(f"{name} is empty: it needs at least a few examples.")
    lines: list[int] = []
    nested: set[tuple[int, str]] = set()
    if suffix == ".csv":
        columns, rows, lines = _read_csv(text, name)
    elif suffix == ".jsonl":
        columns, rows, lines, nested = _read_jsonl(text, name)
    else:
        columns, rows = _read_txt(text)
    if not rows:
        raise InputError(f"{name} has a header but no data rows.")
    return Table(
        tuple(columns), tuple(rows), suffix.lstrip("."), digest, tuple(lines), frozenset(nested)
    )


def _read_csv(text: str, name: str) -> tuple[list[str], list[dict[str, str]], list[int]]:
    """Header, rows and the line each row starts on. Strict quoting: a quote that is never
    closed (or closed in the middle of a cell) is refused with the line it was opened on,
    instead of silently swallowing the following rows into one cell."""
    reader = csv.reader(io.StringIO(text), strict=True)
    records: list[tuple[int, list[str]]] = []
    end = 0  # last line consumed so far
    try:
        for cells in reader:
            records.append((end + 1, cells))
            end = reader.line_num
    except csv.Error as exc:
        raise InputError(
            f"{name} line {end + 1}: a quoted cell that starts on this line is not closed "
            f'properly ({exc}): close the quote, and double any quote inside a cell ("").'
        ) from exc
    if not records:
        raise InputError(f"{name} is empty: it needs at least a few examples.")
    header = records[0][1]
    columns = [c.strip() for c in header]
    if not any(columns) or len(set(columns)) != len(columns) or "" in columns:
        raise InputError(
            f"{name}: the first row must be a header of distinct column names (got {header})."
        )
    rows, lines = [], []
    for line_no, cells in records[1:]:
        if not any(c.strip() for c in cells):
            continue  # blank line
        if len(cells) != len(columns):
            raise InputError(
                f"{name} line {line_no} has {len(cells)} cells but the header has "
                f"{len(columns)}: quote cells that contain commas."
            )
        rows.append(dict(zip(columns, (c.strip() for c in cells), strict=True)))
        lines.append(line_no)
    return columns, rows, lines


def _read_jsonl(
    text: str, name: str
) -> tuple[list[str], list[dict[str, str]], list[int], set[tuple[int, str]]]:
    """Columns, rows, the line of each row, and the (row, column) cells that were nested."""
    columns: list[str] = []
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    nested: set[tuple[int, str]] = set()
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{name} line {line_no} is not valid JSON ({exc.msg}).") from exc
        except RecursionError as exc:  # e.g. 100k nested "[": too deep for the parser
            raise InputError(
                f"{name} line {line_no} is nested too deeply to read: each line must be one "
                "flat JSON object of text values."
            ) from exc
        if not isinstance(obj, dict):
            raise InputError(
                f"{name} line {line_no} must be a JSON object, not {type(obj).__name__}."
            )
        row: dict[str, str] = {}
        for key, value in obj.items():
            if key not in columns:
                columns.append(key)
            if isinstance(value, dict | list):
                nested.add((len(rows), key))
                value = json.dumps(value, ensure_ascii=False)
            row[key] = "" if value is None else str(value).strip()
        rows.append(row)
        lines.append(line_no)
    return columns, rows, lines, nested


def _read_txt(text: str) -> tuple[list[str], list[dict[str, str]]]:
    blocks = [b.strip() for b in text.replace("\r\n", "\n").split("\n\n")]
    if len([b for b in blocks if b]) < 2:  # no blank-line paragraphs: one example per line
        blocks = [line.strip() for line in text.splitlines()]
    return [TEXT_COLUMN], [{TEXT_COLUMN: " ".join(b.split())} for b in blocks if b]


def guess_columns(columns: tuple[str, ...] | list[str], task: Task) -> ColumnMap:
    """Sensible default mapping from common column names."""
    lower = {c.lower(): c for c in columns}

    def pick(*names: str) -> str | None:
        return next((lower[n] for n in names if n in lower), None)

    text = pick("text", "sentence", "review", "content", "document") or (
        columns[0] if columns else None
    )
    if task == "classification":
        label = pick("label", "labels", "class", "sentiment", "category", "target")
        if label is None:
            label = next((c for c in columns if c != text), None)
        return ColumnMap(text=text, label=label)
    prompt = pick("prompt", "instruction", "question", "input")
    response = pick("response", "output", "answer", "completion")
    if prompt and response:
        return ColumnMap(prompt=prompt, response=response)
    return ColumnMap(text=text)


def _fill(given: ColumnMap, guess: ColumnMap, task: Task) -> ColumnMap:
    """The user's mapping, with unset columns taken from the guess."""
    if task == "classification":
        return ColumnMap(text=given.text or guess.text, label=given.label or guess.label)
    if given.prompt or given.response:
        return ColumnMap(
            prompt=given.prompt or guess.prompt, response=given.response or guess.response
        )
    if given.text:
        return ColumnMap(text=given.text)
    return guess


def _require(table: Table, column: str | None, role: str, name: str) -> str:
    if not column:
        raise InputError(
            f"Choose the {role} column (columns in {name}: {', '.join(table.columns)})."
        )
    if column not in table.columns:
        raise InputError(
            f"{name} has no column {column!r} for the {role}: "
            f"available columns are {', '.join(table.columns)}."
        )
    nested = sorted(table.line_of(i) for i, col in table.nested if col == column)
    if nested:
        shown = ", ".join(map(str, nested[:5])) + (" …" if len(nested) > 5 else "")
        raise InputError(
            f"{name} line{'s' if len(nested) > 1 else ''} {shown}: the {role} ({column!r}) is a "
            "JSON object or list, not text: "
            "give it as a plain string."
        )
    empty = [
        table.line_of(i) for i, row in enumerate(table.rows) if not row.get(column, "").strip()
    ]
    if empty:
        shown = ", ".join(map(str, empty[:5])) + (" …" if len(empty) > 5 else "")
        where = "lines" if table.lines else "rows"
        raise InputError(
            f"{name}: {len(empty)} row(s) have an empty {role} ({column!r}), {where} {shown}: "
            "fill them in or remove them."
        )
    return column


def prepare(
    table: Table,
    task: Task,
    columns: ColumnMap | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    name: str = "the data",
) -> Prepared:
    """Validate ``table`` for ``task`` and split it (stratified by class for classification)."""
    if task not in TASKS:
        raise InputError(f"Unknown task {task!r}: use one of {', '.join(TASKS)}.")
    if not 0.05 <= val_fraction <= 0.5:
        raise InputError(
            f"The validation fraction must be between 0.05 and 0.5 (got {val_fraction})."
        )
    columns = _fill(columns or ColumnMap(), guess_columns(table.columns, task), task)
    rng = random.Random(seed)
    if task == "classification":
        text_col = _require(table, columns.text, "text", name)
        label_col = _require(table, columns.label, "label", name)
        if text_col == label_col:
            raise InputError("The text and label columns must be different columns.")
        labels = tuple(sorted({row[label_col] for row in table.rows}))
        if len(labels) < 2:
            raise InputError(
                f"{name} has a single class ({labels[0]!r}): classification needs at least two."
            )
        if len(labels) > 100:
            raise InputError(
                f"{name} has {len(labels)} distinct labels in {label_col!r}: is that the "
                "right label column?"
            )
        by_class: dict[str, list[Example]] = {lab: [] for lab in labels}
        for row in table.rows:
            by_class[row[label_col]].append(Example(row[text_col], labels.index(row[label_col])))
        small = {lab: len(v) for lab, v in by_class.items() if len(v) < MIN_PER_CLASS}
        if small:
            detail = ", ".join(f"{lab!r} has {n}" for lab, n in small.items())
            raise InputError(
                f"Too few examples per class ({detail}): each class needs at least "
                f"{MIN_PER_CLASS} (some to train on, some to validate): add examples or drop it."
            )
        train, val = [], []
        for items in by_class.values():
            rng.shuffle(items)
            n_val = max(1, round(len(items) * val_fraction))
            val += items[:n_val]
            train += items[n_val:]
        rng.shuffle(train)
        rng.shuffle(val)
        mapping = ColumnMap(text=text_col, label=label_col)
    else:
        labels = ()
        if columns.prompt or columns.response:
            p = _require(table, columns.prompt, "prompt", name)
            r = _require(table, columns.response, "response", name)
            items = [Example(prompt=row[p], response=row[r]) for row in table.rows]
            mapping = ColumnMap(prompt=p, response=r)
        else:
            t = _require(table, columns.text, "text", name)
            items = [Example(text=row[t]) for row in table.rows]
            mapping = ColumnMap(text=t)
        if len(items) < 4:
            raise InputError(f"{name} has only {len(items)} example(s): use at least 4.")
        rng.shuffle(items)
        n_val = max(1, round(len(items) * val_fraction))
        val, train = items[:n_val], items[n_val:]
    digest = hashlib.sha256(
        json.dumps([table.sha256, task, mapping.__dict__, val_fraction, seed]).encode()
    ).hexdigest()
    return Prepared(task, tuple(train), tuple(val), labels, "sha256:" + digest, mapping)


def load(
    path: str | Path,
    task: Task,
    columns: ColumnMap | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> Prepared:
    """``read_table`` + ``prepare`` for a file on disk."""
    return prepare(read_table(path), task, columns, val_fraction, seed, name=Path(path).name)


# --- uploads ------------------------------------------------------------------------------

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "upload") -> str:
    """A file name that is never a path: the last component of ``name`` (``/`` or ``\\``),
    ASCII letters, digits, ``.``, ``_`` and ``-`` only, no leading dot, at most 80
    characters with the suffix kept. ``../../x.csv`` -> ``x.csv``; nothing left -> ``default``
    (plus the suffix)."""
    base = re.split(r"[/\\]", str(name))[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE_NAME.sub("_", base).strip("._-")
    stem, dot, suffix = base.rpartition(".")
    if not dot:
        stem, suffix = base, ""
    suffix = suffix[:10].lower()
    stem = stem[: 80 - len(suffix) - 1].strip("._-") or default
    return f"{stem}.{suffix}" if suffix else stem


def check_upload_size(size: int, name: str) -> None:
    """``LimitError`` when an upload of ``size`` bytes is over the acting user's upload limit
    (``engine.access.limits_for().upload_bytes``; the local user has none); call it before
    reading the bytes."""
    from engine.runs import enforced_limits

    limits = enforced_limits()
    if limits is None:
        return
    limit = limits.upload_bytes
    if size > limit:
        raise access.LimitError(
            f"{safe_name(name)} is {size / 2**20:.1f} MiB; {access.acting_role()} may upload at "
            f"most {limit / 2**20:.1f} MiB (limits.toml sets this): use a smaller file."
        )


def upload_folder(home: str | Path) -> Path:
    """The acting user's upload folder: ``HOME/uploads/<user>``."""
    return Path(home) / UPLOADS / safe_name(access.current_user().name, "user")


def store_upload(home: str | Path, name: str, data: bytes, keep: int = UPLOAD_KEEP) -> Path:
    """Save an upload as ``HOME/uploads/<user>/<sha256>-<safe name>`` and return its path.

    Checks the size limit first (``LimitError``) and the file type (``InputError``); the same
    bytes are stored once (a repeat upload only refreshes its time). Keeps the user's ``keep``
    most recent uploads and deletes the older ones.
    """
    check_upload_size(len(data), name)
    clean = safe_name(name)
    if Path(clean).suffix.lower() not in FORMATS:
        raise InputError(f"{clean}: unsupported file type; use CSV, JSONL or TXT.")
    folder = upload_folder(home)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}-{clean}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if path.is_file() and path.stat().st_size == len(data):
            if time.time() - path.stat().st_mtime > 600:  # recently used: keep it longest
                os.utime(path)
        else:
            atomic_write_bytes(path, data, "the upload")
    except OSError as exc:
        raise disk_error(exc, "the upload") from exc
    clean_uploads(folder, keep, keep_path=path)
    return path


def clean_uploads(
    folder: str | Path, keep: int = UPLOAD_KEEP, keep_path: Path | None = None
) -> int:
    """Delete all but the ``keep`` most recently used files in ``folder`` (``keep_path``
    always stays). Returns how many were deleted."""
    try:
        files = [p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")]
    except OSError:
        return 0
    files.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    deleted = 0
    for old in files[keep:]:
        if keep_path is not None and old == keep_path:
            continue
        try:
            old.unlink()
            deleted += 1
        except OSError:
            pass
    return deleted


def read_table_once(path: str | Path) -> Table:
    """``read_table`` of a file on disk, parsed once per content: a page that reruns gets
    the same ``Table`` back while the file (size, modification time) is unchanged."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return read_table(path)  # its own message for a missing file
    return _read_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, _size: int, _mtime_ns: int) -> Table:
    return read_table(path)
