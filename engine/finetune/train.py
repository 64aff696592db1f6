"""The training loop: a plain PyTorch loop (AdamW, linear warm-up/decay), DDP-aware.

Resumable by construction: the batch order of step ``s`` depends only on the seed and ``s``,
and dropout is reseeded every step, so a job killed at any point and resumed from its last
checkpoint runs exactly the planned number of steps. Process 0 alone writes ``state.json``,
``metrics.jsonl``, checkpoints, ``result.json`` and the store entry; every one of those writes
is atomic (``engine.files``, ``ModelStore.write``): a full disk ends the job with a one-line
``DiskError`` and leaves no partial file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.access import current_user
from engine.catalog import EMBEDDED, resolve
from engine.devices import choose_placement
from engine.errors import CancelledError, InputError
from engine.files import atomic_write, atomic_write_json, atomic_write_text, disk_error
from engine.finetune import data as ftdata
from engine.finetune.config import JobSpec, choose_settings, plan
from engine.finetune.result import FinetuneResult, read_json, record_in_ledger
from engine.provenance import Provenance
from engine.store import ModelStore, fingerprint

IGNORE = -100  # label id ignored by the loss


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Base:
    """The base model's folder and identity."""

    name: str
    folder: Path
    fingerprint: str
    licence: str


# --- base model and data ---------------------------------------------------------------


def find_base(name: str, store: ModelStore, allow_pickle: bool = False) -> Base:
    """Folder of an embedded model (converted into the store once), store entry or local folder.
    ``allow_pickle``: accept a local folder whose weights are pickled (``JobSpec.allow_pickle``)."""
    from engine.loading import LoadOptions, check_local_weights, materialize_embedded

    ref = resolve(name, store.names())
    if ref.source == "embedded":
        entry = materialize_embedded(ref.location, store)
        return Base(name, entry.path, entry.manifest.fingerprint, EMBEDDED[name].licence)
    if ref.source == "store":
        entry = store.get(ref.location)
        return Base(name, entry.path, entry.manifest.fingerprint, entry.manifest.licence)
    if ref.source == "local":
        folder = Path(ref.location)
        check_local_weights(folder, LoadOptions(allow_pickle=allow_pickle))
        return Base(name, folder, fingerprint(folder), "unknown (local folder)")
    raise InputError(
        f"Fine-tuning needs a local base model, not the hub id {name!r}: use an embedded model, "
        "a store entry or a local folder."
    )


def load_model(spec: JobSpec, base: Base, labels: tuple[str, ...]):
    """A fresh float32 copy of the base model and its tokenizer (never the shared instance)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base.folder)
    weights = {"use_safetensors": None if spec.allow_pickle else True}
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if spec.task == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            base.folder,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={lab: i for i, lab in enumerate(labels)},
            ignore_mismatched_sizes=True,
            dtype=torch.float32,
            **weights,
        )
        model.config.pad_token_id = tokenizer.pad_token_id
    else:
        model = AutoModelForCausalLM.from_pretrained(base.folder, dtype=torch.float32, **weights)
    if spec.train.lora:
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS if spec.task == "classification" else TaskType.CAUSAL_LM,
            r=spec.train.lora_r,
            lora_alpha=spec.train.lora_alpha,
            lora_dropout=spec.train.lora_dropout,
            target_modules=_lora_targets(model),
        )
        model = get_peft_model(model, lora)
    return model, tokenizer


def _lora_targets(model: torch.nn.Module) -> list[str]:
    """Attention projections by their usual names (Llama/Mistral/Qwen, BERT, GPT-2)."""
    names = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    for group in (["q_proj", "v_proj"], ["query", "value"], ["c_attn"]):
        if set(group) <= names:
            return group
    raise InputError(
        f"No attention projections found for LoRA in {type(model).__name__}: use full fine-tuning."
    )


def encode(examples, spec: JobSpec, tokenizer) -> list[dict]:
    """Token ids (and labels) per example; long plain texts are split into max_length chunks."""
    n = spec.train.max_length
    out: list[dict] = []
    for ex in examples:
        if spec.task == "classification":
            ids = tokenizer(ex.text, truncation=True, max_length=n)["input_ids"]
            out.append({"input_ids": ids, "label": ex.label})
        elif ex.prompt is not None:
            prompt, full = _chat(tokenizer, ex.prompt, ex.response)
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = tokenizer(full, add_special_tokens=False)["input_ids"][:n]
            labels = [IGNORE] * min(len(p_ids), len(ids)) + ids[len(p_ids) :]
            if any(x != IGNORE for x in labels):
                out.append({"input_ids": ids, "labels": labels})
        else:
            ids = tokenizer(ex.text)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            for start in range(0, len(ids), n):
                chunk = ids[start : start + n]
                if len(chunk) > 1:
                    out.append({"input_ids": chunk, "labels": list(chunk)})
    if not out:
        raise InputError(
            "No usable examples after tokenization: raise max_length or check the data."
        )
    return out


def _chat(tokenizer, prompt: str, response: str) -> tuple[str, str]:
    """(prompt text, prompt + response text), through the chat template when there is one."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": response}], tokenize=False
        )
        if full.startswith(head):
            return head, full
        return head, head + response + (tokenizer.eos_token or "")
    head = f"{prompt}\n"
    return head, head + response + (tokenizer.eos_token or "")


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels, each (batch, seq)."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "label" in features[0]:
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
    else:
        labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
        for i, f in enumerate(features):
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        batch["labels"] = labels
    return batch


def batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Example indices of global optimizer step ``step`` (0-based): a per-epoch permutation,
    wrapped at the end so every batch is full. A pure function of its arguments."""
    per_epoch = math.ceil(n / batch)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    chosen = perm[k * batch : (k + 1) * batch]
    return chosen + perm[: batch - len(chosen)]


def plan_steps(n_train: int, spec: JobSpec, world: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch) for the global batch size; ``spec.train`` has
    its automatic values filled (``choose_settings``)."""
    cfg = spec.train
    return plan(n_train, cfg.batch_size, cfg.epochs, cfg.max_steps, world)


# --- evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model, encoded: list[dict], spec: JobSpec, pad_id: int, device, labels) -> dict:
    """Classification: eval_loss, accuracy, macro F1, confusion matrix (true x predicted).
    Causal LM: eval_loss (mean over target tokens) and perplexity."""
    was_training = model.training
    model.eval()
    total_loss, total_n = 0.0, 0
    preds, golds = [], []
    bs = max(1, spec.train.batch_size)
    for start in range(0, len(encoded), bs):
        feats = encoded[start : start + bs]
        batch = {k: v.to(device) for k, v in collate(feats, pad_id).items()}
        out = model(**batch)
        if spec.task == "classification":
            total_loss += float(out.loss) * len(feats)
            total_n += len(feats)
            preds += out.logits.argmax(-1).tolist()
            golds += batch["labels"].tolist()
        else:
            n_tok = int((batch["labels"][:, 1:] != IGNORE).sum())
            total_loss += float(out.loss) * n_tok
            total_n += n_tok
    model.train(was_training)
    loss = total_loss / max(1, total_n)
    if spec.task != "classification":
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}
    return {"eval_loss": loss, **classification_metrics(golds, preds, len(labels))}


def classification_metrics(golds: list[int], preds: list[int], k: int) -> dict:
    """accuracy, macro F1 and the confusion matrix (rows: true class, columns: predicted)."""
    cm = np.zeros((k, k), dtype=int)
    for g, p in zip(golds, preds, strict=True):
        cm[g, p] += 1
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(0), out=np.zeros(k), where=cm.sum(0) > 0)
    recall = np.divide(tp, cm.sum(1), out=np.zeros(k), where=cm.sum(1) > 0)
    f1 = np.divide(
        2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0
    )
    return {
        "accuracy": float(tp.sum() / max(1, cm.sum())),
        "f1": float(f1.mean()),
        "confusion": cm.tolist(),
    }


# --- the loop ----------------------------------------------------------------------------


class Recorder:
    """Process 0's writer of state.json and metrics.jsonl (no-op on other ranks)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled
        self.state: dict = {}

    def update(self, **fields) -> None:
        if self.enabled:
            self.state.update(fields, updated=time.time())
            atomic_write_json(self.folder / "state.json", self.state, "the job's state")

    def metric(self, record: dict) -> None:
        """Append one record (one line; a reader skips a line caught half-written)."""
        if self.enabled:
            try:
                with open(self.folder / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps({**record, "time": time.time()}) + "\n")
            except OSError as exc:
                raise disk_error(exc, "the job's metrics") from exc

    def truncate(self, step: int) -> None:
        """Drop records after ``step`` (they are redone after a resume); atomic."""
        path = self.folder / "metrics.jsonl"
        if self.enabled and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if line.strip() and json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # the half line of a process killed while appending
            text = "".join(line + "\n" for line in keep)
            atomic_write_text(path, text, "the job's metrics")

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(folder: Path, step: int, model, optimizer, scheduler) -> None:
    """Atomically write the resume point for ``step`` and drop older ones. A full disk raises a
    one-line ``DiskError``; the previous checkpoint stays and no partial file is left."""
    try:
        folder.mkdir(exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, "the checkpoint folder") from exc
    target = folder / f"step-{step:07d}.pt"
    state = {
        "step": step,
        "model": _trainable(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    atomic_write(target, lambda tmp: torch.save(state, tmp), f"checkpoint {target.name}")
    for old in folder.glob("step-*.pt"):
        if old != target:
            old.unlink(missing_ok=True)


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step-*.pt")) if folder.exists() else []
    return found[-1] if found else None


def cancel_requested(folder: Path, dist: Dist) -> bool:
    """The CANCEL flag, agreed on by all processes (so none waits forever in a collective)."""
    flag = (folder / "CANCEL").exists()
    if dist.world > 1:
        t = torch.tensor([1 if flag else 0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def run(folder: Path, home: Path, dist: Dist = Dist()) -> FinetuneResult | None:
    """Run (or resume) the job in ``folder``. Returns the result on process 0."""
    from transformers import get_linear_schedule_with_warmup

    spec = JobSpec.from_dict(read_json(folder / "spec.json"))
    rec = Recorder(folder, dist.main)
    rec.update(phase="loading", message=f"Loading {spec.base} and the data…")
    store = ModelStore(home)
    base = find_base(spec.base, store, spec.allow_pickle)
    cfg = spec.train
    prepared = ftdata.load(spec.data, spec.task, spec.columns, cfg.val_fraction, cfg.seed)
    # automatic epochs / batch size / learning rate from the data size (the same on a resume)
    settings = choose_settings(cfg, len(prepared.train), spec.task, dist.world)
    spec = replace(spec, train=settings.train)
    cfg = spec.train
    rec.update(settings=settings.to_dict())
    rec.log(f"Settings: {settings.why}")

    placement = choose_placement()
    device = torch.device(placement.device)
    if dist.world > 1 and device.type != "cpu":
        device = torch.device(device.type, dist.local_rank)
    autocast = dict(
        device_type=device.type, dtype=placement.dtype, enabled=placement.dtype != torch.float32
    )
    provenance = Provenance(
        model=spec.base,
        fingerprint=base.fingerprint,
        dtype=training_dtype(placement.dtype),
        device=str(device),
        seed=cfg.seed,
    )

    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(spec, base, prepared.labels)
    model.to(device)
    train_set = encode(prepared.train, spec, tokenizer)
    val_set = encode(prepared.val, spec, tokenizer)
    pad_id = tokenizer.pad_token_id
    total, per_epoch = plan_steps(len(train_set), spec, dist.world)
    eval_every = cfg.eval_every or per_epoch

    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)

    step = 0
    ckpt = latest_checkpoint(folder / "checkpoints")
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rec.truncate(step)
        rec.log(f"Resumed from {ckpt.name} (step {step}/{total}).")
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec.log(
        f"{spec.task} on {spec.base}: {len(train_set)} train / {len(val_set)} val examples, "
        f"{total} steps, {dist.world} process(es), {n_train:,} of {n_params:,} parameters trained"
        f"{' (LoRA)' if cfg.lora else ''}, device {device}."
    )

    raw = model  # unwrapped: evaluation and saving
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type != "cpu" else None
        )

    def run_eval(at: int, tag: str) -> dict:
        rec.update(phase="evaluating", message=f"Evaluating on {len(val_set)} examples ({tag})…")
        metrics = {}
        if dist.main:
            with torch.autocast(**autocast):
                metrics = evaluate(raw, val_set, spec, pad_id, device, prepared.labels)
            rec.metric({"type": "eval", "step": at, "tag": tag, **metrics})
            rec.log(
                f"eval @ {at}: "
                + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "confusion")
            )
        if dist.world > 1:
            torch.distributed.barrier()
        return metrics

    before = read_json(folder / "before.json")
    if before is None:
        before = run_eval(0, "before")
        if dist.main:
            atomic_write_json(folder / "before.json", before, "the job's first evaluation")

    delay = float(os.environ.get("WORKBENCH_FT_STEP_DELAY", "0") or 0)  # tests: slow the loop down
    rec.update(
        phase="training", step=step, total_steps=total, segment_start_step=step, world=dist.world,
        segment_started=time.time(), message="Training…",
    )  # fmt: skip
    model.train()
    global_batch = cfg.batch_size * dist.world
    while step < total:
        if cancel_requested(folder, dist):
            if dist.main:
                save_checkpoint(folder / "checkpoints", step, raw, optimizer, scheduler)
            rec.update(phase="cancelled", message=f"Cancelled at step {step}/{total}.")
            raise CancelledError(f"Cancelled at step {step}/{total}; resume to continue.")
        idx = batch_indices(step, len(train_set), global_batch, cfg.seed)
        mine = idx[dist.rank :: dist.world]
        batch = {k: v.to(device) for k, v in collate([train_set[i] for i in mine], pad_id).items()}
        torch.manual_seed(cfg.seed * 100_003 + step * 101 + dist.rank)  # dropout, reproducible
        with torch.autocast(**autocast):
            loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if delay:
            time.sleep(delay)
        if step % cfg.log_every == 0 or step == total:
            value = loss.detach().float()
            if dist.world > 1:
                torch.distributed.all_reduce(value)
                value /= dist.world
            rec.metric(
                {
                    "type": "train", "step": step, "epoch": step / per_epoch, "loss": float(value),
                    "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                    "cpu_s": time.process_time(),  # this process's CPU seconds (benchmarks)
                }
            )  # fmt: skip
            rec.update(
                step=step,
                epoch=step / per_epoch,
                message=f"Step {step}/{total}, loss {float(value):.4f}",
            )
        if step % cfg.checkpoint_every == 0 and step < total:
            if dist.main:
                save_checkpoint(folder / "checkpoints", step, raw, optimizer, scheduler)
            if dist.world > 1:
                torch.distributed.barrier()
        if step % eval_every == 0 and step < total:
            run_eval(step, "during")
            rec.update(phase="training", message="Training…")
    after = run_eval(total, "after")
    if not dist.main:
        return None
    rec.update(phase="saving", step=total, message=f"Saving {spec.out} into the model store…")
    memory = peak_memory(device)
    rec.log("peak memory: " + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items()))
    result = export(
        folder, spec, base, prepared, raw, tokenizer, store, before, after, total,
        provenance=provenance, peak_memory=memory,
    )  # fmt: skip
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    rec.update(phase="done", message=f"Saved {spec.out}.")
    return result


def training_dtype(dtype: torch.dtype) -> str:
    """The provenance dtype of a job: ``float32``, or e.g. ``bfloat16-autocast`` (weights and
    optimizer state stay float32; the forward pass runs under autocast)."""
    name = str(dtype).removeprefix("torch.")
    return name if dtype == torch.float32 else f"{name}-autocast"


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak memory of this process in bytes: ``rss`` (resident, CPU) and, on CUDA, ``cuda``
    (``torch.cuda.max_memory_allocated``)."""
    import resource
    import sys

    try:  # Linux: VmHWM is this program's own peak (ru_maxrss carries the parent's over fork)
        status = Path("/proc/self/status").read_text()
        rss = next(
            int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")
        )
    except (OSError, StopIteration, ValueError):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss = rss if sys.platform == "darwin" else rss * 1024
    out = {"rss": int(rss)}
    if device.type == "cuda":
        out["cuda"] = int(torch.cuda.max_memory_allocated(device))
    return out


def export(
    folder, spec: JobSpec, base: Base, prepared, model, tokenizer, store, before, after, steps,
    *, provenance: Provenance, peak_memory: dict[str, int] | None = None,
) -> FinetuneResult:  # fmt: skip
    """Write the tuned model into the store (atomically) and ``result.json`` into the job folder.

    LoRA: the adapter is saved to ``<job>/adapter`` and copied into the entry's ``adapter/``;
    the stored weights are the merged model, so every page loads it with the normal loader.
    """
    cfg = spec.train

    def finish(stored: str | None, entry_fingerprint: str | None) -> FinetuneResult:
        result = FinetuneResult(
            model=stored,
            base=spec.base,
            base_fingerprint=base.fingerprint,
            task=spec.task,
            labels=tuple(prepared.labels),
            data_hash=prepared.hash,
            steps=steps,
            metrics_before=before,
            metrics_after=after,
            adapter=cfg.lora,
            fingerprint=entry_fingerprint,
            hyperparameters=cfg,
            processes=spec.processes,
            peak_memory=dict(peak_memory or {}),
            job_id=folder.name,
            provenance=provenance,
        )
        atomic_write_json(folder / "result.json", result.to_dict(), "the job's result")
        # the job's wall time so far: since its spec was written at submit
        seconds = time.time() - (folder / "spec.json").stat().st_mtime
        record_in_ledger(folder.parent.parent, spec.to_dict(), result, seconds)
        return result

    if cfg.lora:
        save_adapter(folder / "adapter", model, tokenizer)
        if not cfg.merge_lora:
            return finish(None, None)
        model = model.merge_and_unload()
    extra = {
        "description": f"{spec.task} fine-tune of {spec.base}"
        + (" (LoRA, merged)" if cfg.lora else ""),
        "job_id": folder.name,
        "owner": current_user().name,  # the worker acts as the job's owner
        "task": spec.task,
        "data_file": Path(spec.data).name,
        "data_hash": prepared.hash,
        "labels": list(prepared.labels),
        "hyperparameters": asdict(cfg),
        "processes": spec.processes,
        "steps": steps,
        "metrics_before": before,
        "metrics_after": after,
        "provenance": asdict(provenance),
    }

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if cfg.lora:
            shutil.copytree(folder / "adapter", tmp / "adapter")

    entry = store.write(
        spec.out,
        save,
        kind="classifier" if spec.task == "classification" else "causal-lm",
        source=f"finetune:{folder.name}",
        licence=base.licence,
        base_model=spec.base,
        base_fingerprint=base.fingerprint,
        extra=extra,
    )
    return finish(entry.name, entry.manifest.fingerprint)


def save_adapter(target: Path, model, tokenizer) -> None:
    """Save a LoRA adapter folder atomically: written next to ``target``, then renamed over it.
    A full disk raises a one-line ``DiskError`` and leaves no partial folder."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as exc:
        raise disk_error(exc, "the LoRA adapter") from exc
    except Exception as exc:  # safetensors reports a full disk as its own error type
        if "No space left" not in str(exc):
            raise
        raise disk_error(OSError(errno.ENOSPC, str(exc)), "the LoRA adapter") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def merge_adapter(folder: Path, home: Path) -> FinetuneResult:
    """Merge a job's saved LoRA adapter (``merge_lora=False``) and store the merged model."""
    spec = JobSpec.from_dict(read_json(folder / "spec.json"))
    if not (folder / "adapter").is_dir():
        raise InputError(f"Job {folder.name} has no saved LoRA adapter to merge.")
    store = ModelStore(home)
    base = find_base(spec.base, store, spec.allow_pickle)
    prepared = ftdata.load(
        spec.data, spec.task, spec.columns, spec.train.val_fraction, spec.train.seed
    )
    from peft import PeftModel

    model, tokenizer = load_model(
        replace(spec, train=replace(spec.train, lora=False)), base, prepared.labels
    )
    model = PeftModel.from_pretrained(model, folder / "adapter")
    recorded = read_json(folder / "result.json")
    if not isinstance(recorded, dict):
        raise InputError(f"Job {folder.name} has no recorded result: it has not completed.")
    old = FinetuneResult.from_dict(recorded)
    used = old.hyperparameters or spec.train  # the values the job chose and trained with
    merged = replace(spec, train=replace(used, merge_lora=True))
    return export(
        folder, merged, base, prepared, model, tokenizer, store,
        old.metrics_before, old.metrics_after, old.steps,
        provenance=old.provenance or Provenance(spec.base, base.fingerprint, "float32", "cpu"),
        peak_memory=old.peak_memory,
    )  # fmt: skip
