"""The run ledger: every run recorded once, a hash chain that names the first tampered record,
no lost records under concurrent writers (threads and processes), consistency after kill -9,
and the ``workbench history`` commands."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from engine.errors import InputError
from engine.ledger import GENESIS, Ledger
from tests.conftest import REPO, run_cli


def add(ledger: Ledger, n: int, prefix: str = "r") -> list[str]:
    ids = []
    for i in range(n):
        record = ledger.append(
            run_id=f"{prefix}{i}",
            operation="generate" if i % 2 == 0 else "attention",
            spec={"model": "m", "text": f"text number {i}", "settings": {"steps": i}},
            result={"value": i},
            seconds=0.1,
        )
        ids.append(record.id)
    return ids


def test_records_chain_and_filter(tmp_path):
    ledger = Ledger(tmp_path)
    ids = add(ledger, 5)
    records = ledger.records()
    assert [r.id for r in records] == ids
    assert records[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(records, records[1:], strict=False))
    assert [r.id for r in ledger.records(kind="attention")] == ["r1", "r3"]
    assert [r.id for r in ledger.records(text="number 4")] == ["r4"]
    assert [r.id for r in ledger.records(text="%")] == []  # LIKE wildcards are literal
    assert [r.id for r in ledger.records(limit=2)] == ["r3", "r4"]
    assert ledger.get("r2").spec["settings"] == {"steps": 2}
    assert json.loads(ledger.result_file(ledger.get("r2")).read_text()) == {"value": 2}
    with pytest.raises(InputError, match="No run"):
        ledger.get("nope")
    with pytest.raises(InputError, match="already"):
        ledger.append(run_id="r0", operation="generate", spec={})
    report = ledger.verify()
    assert report.ok and report.checked == 5


def _sql(ledger: Ledger, statement: str, *params) -> None:
    con = sqlite3.connect(ledger.path)
    con.execute(statement, params)
    con.commit()
    con.close()


def test_verify_names_the_first_edited_record(tmp_path):
    ledger = Ledger(tmp_path)
    add(ledger, 4)
    _sql(ledger, "UPDATE runs SET input_text = 'forged' WHERE id = 'r2'")
    report = ledger.verify()
    assert not report.ok and report.first_bad == "r2" and "edited" in report.reason


def test_verify_notices_a_removed_record(tmp_path):
    ledger = Ledger(tmp_path)
    add(ledger, 4)
    _sql(ledger, "DELETE FROM runs WHERE id = 'r1'")
    report = ledger.verify()
    assert not report.ok and report.first_bad == "r2" and "link" in report.reason


def test_verify_notices_a_changed_or_missing_result_file(tmp_path):
    ledger = Ledger(tmp_path)
    add(ledger, 3)
    ledger.result_file(ledger.get("r1")).write_text('{"value": 999}')
    ledger.result_file(ledger.get("r2")).unlink()
    report = ledger.verify()
    assert not report.ok and report.first_bad == "r1"
    assert "sha256" in report.problems[0] and "missing" in report.problems[1]


def test_concurrent_threads_and_a_process_lose_nothing(tmp_path):
    ledger = Ledger(tmp_path)
    script = textwrap.dedent(
        f"""
        from engine.ledger import Ledger
        ledger = Ledger({str(tmp_path)!r})
        for i in range(30):
            ledger.append(run_id=f"p{{i}}", operation="generate", spec={{"text": "p"}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    threads = [
        threading.Thread(target=add, args=(Ledger(tmp_path), 30, f"t{k}-")) for k in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proc.wait(120) == 0
    records = ledger.records()
    assert len(records) == 120 and len({r.id for r in records}) == 120
    assert ledger.verify().ok


def test_kill_9_during_writes_leaves_a_consistent_ledger(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        from engine.ledger import Ledger
        ledger = Ledger({str(tmp_path)!r})
        i = 0
        while True:
            ledger.append(run_id=f"k{{i}}", operation="generate", spec={{"text": "x" * 5000}},
                          result={{"payload": list(range(2000))}})
            i += 1
            if i == 5:
                print("writing", flush=True)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    ledger = Ledger(tmp_path)
    records = ledger.records()
    assert len(records) >= 5
    assert ledger.verify().ok
    # no half-written result files are left where verify would look
    leftovers = [p for p in ledger.results.iterdir() if p.name.endswith(".tmp")]
    assert all(not p.name.startswith("k") for p in leftovers)


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    ledger = Ledger(tmp_path)
    _sql(ledger, "UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    from engine.ledger import LedgerError

    with pytest.raises(LedgerError, match="newer workbench"):
        Ledger(tmp_path)


# --- recording through the API --------------------------------------------------------------


def test_every_api_run_is_recorded_with_its_identity(tmp_path, tiny_models):
    from engine import Workbench
    from engine.store import fingerprint

    wb = Workbench(home=tmp_path / "home", device="cpu")
    model = wb.load(str(tiny_models["llama"]))
    result = model.generate("the capital of france is", max_new_tokens=5, greedy=False, seed=7)
    with pytest.raises(InputError):
        model.perplexity("   ")
    generate, failed = wb.ledger.records()[:2]
    assert generate.operation == "generate" and generate.status == "done"
    assert (
        generate.fingerprint == fingerprint(tiny_models["llama"]) == result.provenance.fingerprint
    )
    assert generate.seed == 7 and generate.dtype == "float32" and generate.device == "cpu"
    assert generate.tokenizer_hash.startswith("sha256:") and generate.versions["torch"]
    ids = model.loaded.tokenizer("the capital of france is")["input_ids"]
    assert generate.input_ids == ids and generate.input_text == "the capital of france is"
    stored = json.loads(wb.ledger.result_file(generate).read_text())
    assert stored["text"] == result.text
    model.perplexity("the capital of france is paris")
    scored = wb.ledger.records(kind="perplexity")[-1]
    assert scored.input_ids == model.loaded.tokenizer("the capital of france is paris")["input_ids"]
    assert failed.operation == "perplexity" and failed.status == "failed"
    assert "empty" in failed.error and failed.result_path is None
    assert wb.ledger.verify().ok


def test_history_cli_lists_exports_and_verifies(tmp_path):
    home = tmp_path / "home"
    ledger = Ledger(home)
    add(ledger, 3)
    listed = run_cli("history", "list", "--json", home=home)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2"]
    assert all({"id", "kind", "model", "created", "user"} <= set(r) for r in rows)
    out = tmp_path / "run.json"
    exported = run_cli("history", "export", "r1", "--out", str(out), home=home)
    assert exported.returncode == 0, exported.stderr
    bundle = json.loads(out.read_text())
    assert bundle["record"]["id"] == "r1" and bundle["result"] == {"value": 1}
    bad_path = run_cli("history", "export", "r1", "--out", "/proc/nope/x.json", home=home)
    assert bad_path.returncode == 2 and "does not exist" in bad_path.stderr
    assert "Traceback" not in bad_path.stderr
    assert run_cli("history", "verify", home=home).returncode == 0
    _sql(ledger, "UPDATE runs SET model = 'other' WHERE id = 'r0'")
    broken = run_cli("history", "verify", home=home)
    assert broken.returncode == 1 and "r0" in broken.stdout
