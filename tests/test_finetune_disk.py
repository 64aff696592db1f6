"""A full disk during a job: the worker records its own failure (one line, visible in the job,
its run snapshot and the CLI) and leaves no partial file."""

from __future__ import annotations

import errno
import json
import signal

import pytest
import torch

from engine.finetune import JobStore, worker
from tests.test_finetune_jobs import clf_spec
from workbench.cli import main as cli

# What the file system / torch raise when the disk fills up during torch.save.
FAULTS = {
    "oserror": (
        OSError(errno.ENOSPC, "No space left on device"),
        "No space left on the device while writing checkpoint step-0000002.pt",
    ),
    "torch": (
        RuntimeError(
            "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing "
            "file data/3: file write failed"
        ),
        "Cannot write checkpoint step-0000002.pt: the disk may be full",
    ),
}


@pytest.fixture
def clf_data(tmp_path):
    words = ["good movie", "great film", "fun plot", "bad movie", "awful film", "dull plot"]
    rows = [f"{w} {i},{'pos' if w in words[:3] else 'neg'}" for w in words for i in range(6)]
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("fault", list(FAULTS))
def test_full_disk_at_a_checkpoint_fails_the_job_with_one_line_and_no_partial_file(
    fault, tmp_path, tiny_models, clf_data, monkeypatch, capsys
):
    home = tmp_path / "home"
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_DEVICE", "cpu")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    jobs = JobStore(home)
    job = jobs.submit(clf_spec(tiny_models["classifier"], clf_data, checkpoint_every=2), False)
    error, expected = FAULTS[fault]
    written = []

    def full_disk_save(obj, path, *args, **kwargs):  # half a file, then the disk is full
        with open(path, "wb") as fh:
            fh.write(b"\x80\x02partial checkpoint")
        written.append(str(path))
        raise error

    monkeypatch.setattr(torch, "save", full_disk_save)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = worker.main([job.id])  # the job's own process entry point, run here
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert code == 1 and len(written) == 1  # the first checkpoint (step 2) hit the full disk

    info = jobs.get(job.id)
    assert info.status == "failed"
    assert expected in info.error and "\n" not in info.error
    assert info.step == 2 and info.phase == "failed"
    # no partial file anywhere in the job folder: not the checkpoint, not its temp file
    leftovers = [p.name for p in info.folder.rglob("*") if p.is_file()]
    assert not [n for n in leftovers if n.endswith((".tmp", ".pt"))], leftovers
    assert not (info.folder / "result.json").exists()
    for name in ("state.json", "spec.json", "before.json"):
        json.loads((info.folder / name).read_text())  # every kept file is whole

    snap = jobs.run(job.id).snapshot()
    assert snap.state == "failed" and snap.error == info.error and snap.result is None
    capsys.readouterr()  # the training's own output
    assert cli(["finetune", "--status", job.id]) == 1
    assert capsys.readouterr().err.strip() == f"job {job.id} failed: {info.error}"
    assert cli(["finetune", "--status", job.id, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == info.error


class FullDiskSaver:
    """Writes half an adapter file, then fails as ``error`` (a full disk)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def save_pretrained(self, folder) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"half")
        raise self.error


class FakeSafetensorError(Exception):
    pass


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), FakeSafetensorError("No space left on device (os error 28)")],
)  # fmt: skip
def test_full_disk_saving_an_adapter_keeps_the_old_one_and_leaves_no_partial_folder(
    tmp_path, error
):
    from engine.files import DiskError
    from engine.finetune.train import save_adapter

    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_config.json").write_text("{}")  # from an earlier save
    with pytest.raises(DiskError, match="No space left on the device while writing the LoRA"):
        save_adapter(target, FullDiskSaver(error), tokenizer=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert [p.name for p in target.iterdir()] == ["adapter_config.json"]
