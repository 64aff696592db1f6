"""Typed fine-tuning configuration: hyper-parameters (``TrainConfig``) and a whole job (``JobSpec``).

``epochs``, ``batch_size`` and ``learning_rate`` default to ``None`` ("automatic"):
``choose_settings`` fills them from the size of the training split, the task and the method
(full fine-tuning vs LoRA), and says why in one sentence. A value the user sets always wins.
``validated()`` checks ranges only and leaves automatic values as ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, replace

from engine.errors import InputError
from engine.finetune.data import TASKS, ColumnMap, Task, load
from engine.store import validate_name

DEFAULT_LR = {False: 5e-5, True: 5e-4}  # full fine-tuning, LoRA (large data, causal LM)
SMALL_SET = 2000  # training examples up to which classification gets the small-set settings
SMALL_LR = 2e-4  # full fine-tuning of a classifier on a small set: the head starts random
MIN_STEPS = 40  # optimizer steps a small classification set gets (more epochs, up to MAX_EPOCHS)
MAX_EPOCHS = 20


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
            kinds = {"None" if t is type(None) else t.__name__ for t in allowed}
            names = " or ".join(sorted(kinds, key=lambda n: (n == "None", n)))  # None last
            raise InputError(
                f"{what} {f.name} must be {names}, not {type(got).__name__} ({got!r})."
            )


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. ``batch_size`` is per process; ``max_steps`` > 0 overrides epochs."""

    epochs: float | None = None  # None: automatic (choose_settings)
    max_steps: int = 0
    batch_size: int | None = None  # None: automatic
    learning_rate: float | None = None  # None: automatic
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
        """The learning rate; an automatic one as for a large set (``choose_settings`` knows the
        data and picks the real one)."""
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.lora]

    @property
    def automatic(self) -> tuple[str, ...]:
        """Names of the settings left to ``choose_settings`` (``None``)."""
        names = ("epochs", "batch_size", "learning_rate")
        return tuple(n for n in names if getattr(self, n) is None)

    def validated(self) -> TrainConfig:
        """Checked copy (automatic values stay ``None``); raises ``InputError`` naming the bad
        value and the allowed range."""
        check_types(self, "TrainConfig")
        epochs = 3.0 if self.epochs is None else self.epochs
        batch = 8 if self.batch_size is None else self.batch_size
        checks = [
            (0 < epochs <= 100, f"epochs must be in (0, 100] (got {self.epochs})"),
            (0 <= self.max_steps <= 1_000_000, f"max_steps must be >= 0 (got {self.max_steps})"),
            (1 <= batch <= 4096, f"batch_size must be 1-4096 (got {self.batch_size})"),
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
        return self


def format_lr(lr: float) -> str:
    """A learning rate as people write it: 2e-4, 1.5e-5, 0.1."""
    if lr >= 0.01:
        return f"{lr:g}"
    mantissa, exponent = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def plan(n_train: int, batch_size: int, epochs: float, max_steps: int, world: int = 1):
    """(total optimizer steps, steps per epoch) for ``n_train`` examples and a global batch of
    ``batch_size * world``; ``max_steps`` > 0 overrides ``epochs``."""
    per_epoch = math.ceil(max(1, n_train) / (batch_size * world))
    if max_steps:
        return max_steps, per_epoch
    return max(1, math.ceil(per_epoch * epochs)), per_epoch


@dataclass(frozen=True)
class Settings:
    """What a job will run with: ``train`` has every value filled; ``steps`` optimizer steps
    of which ``per_epoch`` make one pass; ``automatic`` names the values chosen here rather
    than by the user; ``why`` says in one sentence what was chosen and why."""

    train: TrainConfig
    n_train: int
    steps: int
    per_epoch: int
    automatic: tuple[str, ...]
    why: str

    def to_dict(self) -> dict:
        return {
            "epochs": self.train.epochs,
            "batch_size": self.train.batch_size,
            "learning_rate": self.train.learning_rate,
            "steps": self.steps,
            "n_train": self.n_train,
            "automatic": list(self.automatic),
            "why": self.why,
        }


def choose_settings(train: TrainConfig, n_train: int, task: Task, world: int = 1) -> Settings:
    """Fill the automatic (``None``) epochs, batch size and learning rate of ``train`` from
    ``n_train`` training examples; values the user set are kept as they are.

    Classification with full fine-tuning on a small set (up to ``SMALL_SET`` examples): batch
    8 (global, split over ``world`` processes), enough epochs for ``MIN_STEPS`` optimizer
    steps (3 to ``MAX_EPOCHS``) and ``SMALL_LR``: the classification head starts from random
    weights and a dozen steps at 5e-5 leave it near chance. Otherwise (large sets, causal LM,
    LoRA): 3 epochs, batch 16, 5e-5 (full) or 5e-4 (LoRA).
    """
    small = task == "classification" and not train.lora and n_train <= SMALL_SET
    batch = train.batch_size
    if batch is None:
        batch = max(1, (8 if small else 16) // world)
    epochs = train.epochs
    if epochs is None:
        per_epoch = plan(n_train, batch, 1, 0, world)[1]
        epochs = float(min(MAX_EPOCHS, max(3, math.ceil(MIN_STEPS / per_epoch)))) if small else 3.0
    lr = train.learning_rate
    if lr is None:
        lr = SMALL_LR if small else DEFAULT_LR[train.lora]
    filled = replace(train, epochs=epochs, batch_size=batch, learning_rate=lr)
    steps, per_epoch = plan(n_train, batch, epochs, train.max_steps, world)
    automatic = train.automatic
    where = f" over {world} processes" if world > 1 else ""
    length = f"max_steps {steps}" if train.max_steps else f"{epochs:g} epochs"
    why = f"{n_train} training examples, batch {batch}{where}: {steps} steps ({length}) at "
    why += f"{format_lr(lr)}."
    if small:
        reasons = {
            "batch_size": f"batch {batch} for more steps per pass",
            "epochs": f"{epochs:g} epochs (at least {MIN_STEPS} steps)",
            "learning_rate": f"{format_lr(lr)} since the new classification head starts from "
            "random weights",
        }
        if train.max_steps:
            reasons.pop("epochs")
        chosen = [reasons[n] for n in automatic if n in reasons]
        if chosen:
            why += " Chosen automatically, since a small set needs more passes and a higher "
            why += f"learning rate: {', '.join(chosen)}."
    elif automatic:
        if task != "classification":
            reason = "a causal LM has no new head to train"
        elif train.lora:
            reason = "LoRA adapters already train at a higher rate"
        else:
            reason = f"more than {SMALL_SET} examples give enough steps at the usual rate"
        why += f" The usual defaults, since {reason}."
    names = {"epochs": "epochs", "batch_size": "batch size", "learning_rate": "learning rate"}
    mine = [label for name, label in names.items() if name not in automatic]
    if train.max_steps:
        mine.append("max steps")
    if mine:
        why += f" Set by you: {', '.join(mine)}."
    return Settings(filled, n_train, steps, per_epoch, automatic, why)


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

    def settings(self, world: int | None = None) -> Settings:
        """``choose_settings`` for this job's data (read and split as the job will)."""
        cfg = self.train
        prepared = load(self.data, self.task, self.columns, cfg.val_fraction, cfg.seed)
        return choose_settings(cfg, len(prepared.train), self.task, world or self.processes)

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
