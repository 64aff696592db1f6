"""Typed fine-tuning configuration: hyper-parameters (``TrainConfig``) and a whole job (``JobSpec``).

Defaults are chosen for the embedded models on a laptop CPU; ``validated()`` checks ranges and
fills the learning rate from the method (full fine-tuning vs LoRA) when left at ``None``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field, replace

from engine.errors import InputError
from engine.finetune.data import TASKS, ColumnMap, Task
from engine.store import validate_name

DEFAULT_LR = {False: 5e-5, True: 5e-4}  # full fine-tuning, LoRA


def _allowed(hint) -> tuple[type, ...]:
    """Python types a field of type ``hint`` accepts (an int where a float is expected too)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(hint) for t in _allowed(arg))
    if typing.get_origin(hint) is typing.Literal:
        return (str,)
    if hint is float:
        return (int, float)
    if hint is type(None):
        return (type(None),)
    return (hint,) if isinstance(hint, type) else (object,)


def check_types(value, what: str) -> None:
    """``InputError`` naming the first field of dataclass ``value`` whose value has the wrong
    type (e.g. ``{"epochs": "3"}`` from a JSON file), instead of a ``TypeError`` later."""
    hints = typing.get_type_hints(type(value))
    for f in dataclasses.fields(value):
        got = getattr(value, f.name)
        allowed = _allowed(hints[f.name])
        wrong = not isinstance(got, allowed) or (isinstance(got, bool) and bool not in allowed)
        if wrong:
            names = " or ".join(
                sorted({"None" if t is type(None) else t.__name__ for t in allowed})
            )
            raise InputError(
                f"{what} {f.name} must be {names}, not {type(got).__name__} ({got!r})."
            )


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. ``batch_size`` is per process; ``max_steps`` > 0 overrides epochs."""

    epochs: float = 3.0
    max_steps: int = 0
    batch_size: int = 16
    learning_rate: float | None = None  # None: 5e-5 full, 5e-4 LoRA
    max_length: int = 128  # tokens per example
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    val_fraction: float = 0.2
    eval_every: int = 0  # optimizer steps between evaluations; 0: once per epoch
    checkpoint_every: int = 50  # optimizer steps between checkpoints (resume points)
    log_every: int = 1
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    merge_lora: bool = True  # store the merged model (loadable everywhere); the adapter is kept too

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.lora]

    def validated(self) -> TrainConfig:
        """Checked copy; raises ``InputError`` naming the bad value and the allowed range."""
        check_types(self, "TrainConfig")
        checks = [
            (0 < self.epochs <= 100, f"epochs must be in (0, 100] (got {self.epochs})"),
            (0 <= self.max_steps <= 1_000_000, f"max_steps must be >= 0 (got {self.max_steps})"),
            (1 <= self.batch_size <= 4096, f"batch_size must be 1-4096 (got {self.batch_size})"),
            (0 < self.lr <= 1, f"learning_rate must be in (0, 1] (got {self.lr})"),
            (8 <= self.max_length <= 32768, f"max_length must be 8-32768 (got {self.max_length})"),
            (
                0 <= self.warmup_ratio < 1,
                f"warmup_ratio must be in [0, 1) (got {self.warmup_ratio})",
            ),
            (
                0 <= self.weight_decay <= 1,
                f"weight_decay must be in [0, 1] (got {self.weight_decay})",
            ),
            (
                0.05 <= self.val_fraction <= 0.5,
                f"val_fraction must be in [0.05, 0.5] (got {self.val_fraction})",
            ),
            (self.eval_every >= 0, f"eval_every must be >= 0 (got {self.eval_every})"),
            (
                self.checkpoint_every >= 1,
                f"checkpoint_every must be >= 1 (got {self.checkpoint_every})",
            ),
            (self.log_every >= 1, f"log_every must be >= 1 (got {self.log_every})"),
            (1 <= self.lora_r <= 512, f"lora_r must be 1-512 (got {self.lora_r})"),
            (self.lora_alpha >= 1, f"lora_alpha must be >= 1 (got {self.lora_alpha})"),
            (
                0 <= self.lora_dropout < 1,
                f"lora_dropout must be in [0, 1) (got {self.lora_dropout})",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message + ".")
        return replace(self, learning_rate=self.lr)


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs: base model, task, data file and mapping, hyper-parameters, the
    store name of the result, and how many processes (``torchrun``) to run."""

    base: str
    task: Task
    data: str  # path of the data file (copied into the job folder on submit)
    out: str
    columns: ColumnMap = field(default_factory=ColumnMap)
    train: TrainConfig = field(default_factory=TrainConfig)
    processes: int = 1
    allow_pickle: bool = False  # a local base folder with pickled (.bin) weights may load

    def validated(self) -> JobSpec:
        check_types(self, "JobSpec")
        check_types(self.columns, "ColumnMap")
        if not self.base.strip():
            raise InputError("Choose a base model to fine-tune.")
        if self.task not in TASKS:
            raise InputError(f"Unknown task {self.task!r}: use one of {', '.join(TASKS)}.")
        validate_name(self.out)
        if not 1 <= self.processes <= 64:
            raise InputError(f"processes must be 1-64 (got {self.processes}).")
        return replace(self, base=self.base.strip(), train=self.train.validated())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> JobSpec:
        """From ``to_dict``'s form (e.g. JSON); an unknown key is an ``InputError``."""
        for kind, given in (
            (cls, data),
            (ColumnMap, data.get("columns") or {}),
            (TrainConfig, data.get("train") or {}),
        ):
            if not isinstance(given, dict):
                raise InputError(f"{kind.__name__} must be a mapping, not {type(given).__name__}.")
            unknown = set(given) - {f.name for f in dataclasses.fields(kind)}
            if unknown:
                raise InputError(
                    f"Unknown {kind.__name__} setting(s) {', '.join(sorted(unknown))}: use "
                    f"{', '.join(f.name for f in dataclasses.fields(kind))}."
                )
        return cls(
            **{
                **data,
                "columns": ColumnMap(**(data.get("columns") or {})),
                "train": TrainConfig(**(data.get("train") or {})),
            }
        )
