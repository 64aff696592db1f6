"""Class data collection: a "collect" cell gathers labelled sentences from students.

The instructor adds a collect cell (its labels and a prompt for the students); anyone with its
link (``?collect=NOTEBOOK_ID:CELL_ID``) types a sentence and picks a label; the rows go into a
CSV next to the notebooks, appended under a file lock; the instructor sees the table grow,
removes bad rows, and a fine-tune cell trains on it (reference: output ``data``).

Input limits: a sentence is 1-500 characters of text (control characters removed, spaces
collapsed), the label one of the cell's labels, at most ``MAX_ROWS`` rows a cell.
"""

from __future__ import annotations

import csv
import io
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from engine.errors import InputError
from engine.files import atomic_write_text
from engine.results import Result

MAX_TEXT = 500
MAX_ROWS = 2000
FIELDS = ("id", "time", "text", "label")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class CollectedData(Result):
    """A frozen snapshot of a collection: the training CSV (``text,label``), how many rows
    per label, and the file's sha256 (what a fine-tune cell trained on)."""

    path: str
    rows: int
    per_label: dict[str, int]
    sha256: str


@dataclass(frozen=True)
class Row:
    id: str
    time: float
    text: str
    label: str


def labels_of(spec: dict) -> list[str]:
    """A collect cell's labels: 2-10 distinct non-empty names."""
    labels = [str(x).strip() for x in spec.get("labels") or [] if str(x).strip()]
    if not 2 <= len(set(labels)) <= 10 or len(set(labels)) != len(labels):
        raise InputError("A collect cell needs 2 to 10 different labels, e.g. positive, negative.")
    return labels


class Collection:
    """The rows of one collect cell, in ``home/notebooks/collect/<cell id>.csv``."""

    def __init__(self, home: str | Path, cell_id: str) -> None:
        if not re.fullmatch(r"[0-9a-f]{12}", cell_id or ""):
            raise InputError(f"{cell_id!r} is not a cell id.")
        folder = Path(home) / "notebooks" / "collect"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{cell_id}.csv"
        self._lock = FileLock(str(folder / f".{cell_id}.lock"), timeout=30)

    def rows(self) -> list[Row]:
        if not self.path.exists():
            return []
        with self.path.open(newline="", encoding="utf-8") as fh:
            return [
                Row(r["id"], float(r["time"]), r["text"], r["label"])
                for r in csv.DictReader(fh)
                if r.get("id") and r.get("text") and r.get("label")
            ]

    def _write(self, rows: list[Row]) -> None:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"id": row.id, "time": row.time, "text": row.text, "label": row.label})
        atomic_write_text(self.path, out.getvalue(), "the collected sentences")

    def add(self, text: str, label: str, labels: list[str]) -> Row:
        """Append one sentence (checked and cleaned); returns the stored row."""
        if not isinstance(text, str):
            raise InputError("Type a sentence.")
        clean = " ".join(_CONTROL.sub(" ", text).split())
        if not clean:
            raise InputError("Type a sentence before sending it.")
        if len(clean) > MAX_TEXT:
            raise InputError(
                f"A sentence is at most {MAX_TEXT} characters (this one has {len(clean)})."
            )
        if label not in labels:
            raise InputError(f"Pick one of the labels: {', '.join(labels)}.")
        row = Row(secrets.token_hex(6), time.time(), clean, label)
        with self._lock:
            rows = self.rows()
            if len(rows) >= MAX_ROWS:
                raise InputError(f"This collection is full ({MAX_ROWS} sentences).")
            self._write([*rows, row])
        return row

    def remove(self, row_ids: list[str]) -> int:
        """Drop rows by id (the instructor removing bad ones); returns how many went."""
        gone = set(row_ids)
        with self._lock:
            rows = self.rows()
            kept = [r for r in rows if r.id not in gone]
            self._write(kept)
        return len(rows) - len(kept)

    def training_file(self) -> Path:
        """A CSV with ``text,label`` columns for a fine-tune cell (written now)."""
        target = self.path.with_name(self.path.stem + "-train.csv")
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for row in self.rows():
            writer.writerow([row.text, row.label])
        atomic_write_text(target, out.getvalue(), "the collected training data")
        return target

    def snapshot(self, labels: list[str]) -> CollectedData:
        """Write the training CSV now and describe it."""
        import hashlib

        rows = self.rows()
        if len(rows) < 2 * len(labels):
            raise InputError(
                f"Only {len(rows)} sentences so far: collect at least {2 * len(labels)} "
                "(a few for every label) before using them."
            )
        target = self.training_file()
        return CollectedData(
            path=str(target),
            rows=len(rows),
            per_label={lab: sum(r.label == lab for r in rows) for lab in labels},
            sha256=hashlib.sha256(target.read_bytes()).hexdigest(),
        )
