"""Fine-tuning jobs end to end on tiny models: each job runs in its own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import EngineError, InputError
from engine.finetune import ColumnMap, JobSpec, JobStore, TrainConfig
from engine.store import ModelStore


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def jobs(home):
    return JobStore(home)


@pytest.fixture
def pairs_data(tmp_path):
    words = ["movie", "film", "plot", "actor", "city", "world", "model", "text"]
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        "".join(
            json.dumps({"prompt": f"hello {w}", "response": f"the {w} is good"}) + "\n"
            for w in words
        )
    )
    return path


def clf_spec(base, data, out="tiny-sentiment", **train) -> JobSpec:
    settings = {"epochs": 4, "batch_size": 8, "learning_rate": 5e-3, "max_length": 16, **train}
    return JobSpec(
        base=str(base),
        task="classification",
        data=str(data),
        out=out,
        train=TrainConfig(**settings),
    )


def wait_for_step(jobs: JobStore, job_id: str, step: int, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = jobs.get(job_id)
        if info.step >= step or not info.active:
            return info
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached step {step}")


def train_steps(jobs: JobStore, job_id: str) -> list[int]:
    return [r["step"] for r in jobs.metrics(job_id) if r["type"] == "train"]


def test_lora_instruction_job_keeps_the_adapter_then_merges_into_the_store(
    jobs, home, tiny_models, pairs_data
):
    from engine import Workbench

    spec = JobSpec(
        base=str(tiny_models["llama"]),
        task="causal-lm",
        data=str(pairs_data),
        out="tiny-chat",
        columns=ColumnMap(prompt="prompt", response="response"),
        train=TrainConfig(epochs=5, batch_size=2, lora=True, learning_rate=2e-2, merge_lora=False),
    )
    info = jobs.wait(jobs.submit(spec).id, timeout_s=120)
    assert info.status == "completed", jobs.log_tail(info.id)
    result = jobs.result(info.id)
    assert result.metrics_after["eval_loss"] < result.metrics_before["eval_loss"]
    assert result.metrics_after["perplexity"] > 1
    assert result.model is None and (info.folder / "adapter" / "adapter_config.json").is_file()
    assert ModelStore(home).names() == set()  # adapter only, until merged

    merged = jobs.merge(info.id)
    assert merged.model == "tiny-chat" and jobs.result(info.id).model == "tiny-chat"
    assert merged.fingerprint == ModelStore(home).get("tiny-chat").manifest.fingerprint
    assert merged.provenance == result.provenance and merged.steps == result.steps
    with pytest.raises(InputError, match="already in the store"):
        jobs.merge(info.id)
    entry = ModelStore(home).get("tiny-chat")
    assert (entry.path / "adapter" / "adapter_config.json").is_file()
    assert not (entry.path / "adapter_config.json").exists()  # stored weights are merged
    model = Workbench(home=home, device="cpu").load("tiny-chat")
    assert model.kind == "causal-lm"
    assert model.generate("hello movie", max_new_tokens=3, greedy=True).tokens


def test_cancel_then_kill_9_then_resume_finishes_the_planned_steps(
    jobs, home, tiny_models, clf_data, monkeypatch
):
    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0.1")
    spec = clf_spec(tiny_models["classifier"], clf_data, epochs=10, checkpoint_every=5)
    job = jobs.submit(spec)
    wait_for_step(jobs, job.id, 2)
    jobs.cancel(job.id)
    cancelled = jobs.wait(job.id, timeout_s=60)
    assert cancelled.status == "cancelled" and "Cancelled at step" in cancelled.error
    assert cancelled.step < cancelled.total_steps == 40
    assert ModelStore(home).names() == set()
    with pytest.raises(InputError, match="not running"):
        jobs.cancel(job.id)

    jobs.resume(job.id)  # from the checkpoint the cancel wrote
    info = wait_for_step(jobs, job.id, 12)
    assert info.status == "running"
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while jobs.get(job.id).status != "interrupted" and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = jobs.get(job.id)
    assert killed.status == "interrupted" and killed.resumable
    assert 12 <= killed.step < 40
    assert "tiny-sentiment" not in ModelStore(home).names()
    checkpoints = sorted(p.name for p in (killed.folder / "checkpoints").glob("step-*.pt"))
    assert len(checkpoints) == 1 and checkpoints[0] >= "step-0000010.pt"

    monkeypatch.setenv("WORKBENCH_FT_STEP_DELAY", "0")
    info = jobs.wait(jobs.resume(job.id).id, timeout_s=120)
    assert info.status == "completed", jobs.log_tail(job.id)
    assert info.step == 40
    assert train_steps(jobs, job.id) == list(range(1, 41))  # redone steps are not duplicated
    assert f"Resumed from {checkpoints[0]}" in jobs.log_tail(job.id, 100)
    assert ModelStore(home).get("tiny-sentiment").manifest.extra["steps"] == 40
    assert not (killed.folder / "checkpoints").exists()  # cleaned once stored


def test_torchrun_two_cpu_processes_ddp(jobs, home, tiny_models, clf_data):
    """The cluster recipe of the README: create the job, start the worker under torchrun."""
    spec = JobSpec.from_dict(
        {**clf_spec(tiny_models["classifier"], clf_data).to_dict(), "processes": 2}
    )
    job = jobs.submit(spec, start=False)
    assert "torch.distributed.run" in jobs.command(job.id)  # what launch() would start
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "engine.finetune.worker",
         job.id],
        env={**os.environ, "WORKBENCH_HOME": str(home), "WORKBENCH_DEVICE": "cpu"},
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    info = jobs.get(job.id)
    assert done.returncode == 0 and info.status == "completed", done.stdout[-3000:]
    state = json.loads((info.folder / "state.json").read_text())
    assert state["world"] == 2
    assert info.total_steps == 8  # global batch 2 x 8: 32 examples -> 2 steps/epoch x 4
    assert "2 process(es)" in done.stdout
    assert ModelStore(home).verify("tiny-sentiment")


def test_bad_input_is_refused_before_a_job_starts(jobs, tiny_models, clf_data, tmp_path):
    with pytest.raises(InputError, match="no column 'review'"):
        jobs.submit(
            JobSpec.from_dict(
                {
                    **clf_spec(tiny_models["classifier"], clf_data).to_dict(),
                    "columns": {"text": "review"},
                }
            )
        )
    with pytest.raises(EngineError, match="Unknown model"):
        jobs.submit(clf_spec(tmp_path / "missing", clf_data))
    assert jobs.list() == []


def test_store_never_holds_a_half_written_model(home):
    """kill -9 while the store is writing: the entry never appears, leftovers are cleaned."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from engine.store import ModelStore\n"
        "def save(tmp):\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
        "ModelStore(Path(sys.argv[1])).write('half', save, kind='classifier', source='t', licence='t')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(home)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = ModelStore(home)
    assert store.names() == set() and store.entries() == []
    assert store.clean_leftovers() == 1
