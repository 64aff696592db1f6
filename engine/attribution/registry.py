"""The registry of attribution methods.

Each method is a small ``Method`` subclass registered by its class attribute ``name``; its
options are a frozen dataclass (``Options``) whose fields carry ``metadata`` (label, help,
min/max, choices) so the page can build controls from them. ``available_methods(loaded)``
lists only the methods compatible with a model.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from engine.errors import InputError

BASELINES = ("pad", "zero", "mask")


def option(default: Any, label: str, help: str, **limits: Any) -> Any:
    """A dataclass field with UI metadata (``min``, ``max``, ``choices``)."""
    return field(default=default, metadata={"label": label, "help": help, **limits})


def _type_name(hint: Any, meta: dict) -> str:
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    return {int: "a whole number", float: "a number", bool: "true or false"}.get(hint, "text")


def _check_type(name: str, value: Any, hint: Any, meta: dict) -> None:
    """``InputError`` when ``value`` is not of the option's type (bools are not numbers)."""
    if "choices" in meta or hint not in (int, float, bool):
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise InputError(
            f"Option {name} must be {_type_name(hint, meta)} ({hint.__name__}), "
            f"not {type(value).__name__} {value!r}."
        )


def _coerce(value: Any, hint: Any) -> Any:
    """numpy scalars to Python ones, and whole numbers to float for float options."""
    if isinstance(value, np.generic):
        value = value.item()
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass(frozen=True)
class Options:
    """Base of every method's options. ``validated()`` checks ranges and choices."""

    def validated(self) -> Options:
        """Check every value's type, range and choices; an ``InputError`` names the option."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            _check_type(f.name, value, hints.get(f.name), meta)
            if "choices" in meta and value not in meta["choices"]:
                raise InputError(
                    f"{f.name} must be one of {', '.join(map(str, meta['choices']))} "
                    f"(got {value!r})."
                )
            if "min" in meta and value < meta["min"]:
                raise InputError(f"{f.name} must be at least {meta['min']} (got {value}).")
            if "max" in meta and value > meta["max"]:
                raise InputError(f"{f.name} must be at most {meta['max']} (got {value}).")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the page needs it: name, type, default, label, help, limits."""

    name: str
    type: str  # "int" | "float" | "bool" | "choice"
    default: Any
    label: str
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple = ()


class Method:
    """An attribution method. Subclasses set ``name``, ``title``, ``Options`` and ``run``."""

    name: ClassVar[str]
    title: ClassVar[str]
    summary: ClassVar[str]
    family: ClassVar[str]  # "gradient" | "perturbation" | "attention"
    Options: ClassVar[type[Options]]

    @classmethod
    def incompatibility(cls, loaded) -> str | None:
        """Why this method cannot run on ``loaded``; None when it can."""
        return None

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        hints = typing.get_type_hints(cls.Options)
        specs = []
        for f in dataclasses.fields(cls.Options):
            meta = f.metadata
            hint = hints[f.name]
            kind = (
                "choice"
                if "choices" in meta
                else {int: "int", float: "float", bool: "bool"}.get(hint, "str")
            )
            specs.append(
                OptionSpec(
                    name=f.name,
                    type=kind,
                    default=f.default,
                    label=meta.get("label", f.name),
                    help=meta.get("help", ""),
                    min=meta.get("min"),
                    max=meta.get("max"),
                    choices=tuple(meta.get("choices", ())),
                )
            )
        return specs

    @classmethod
    def make_options(cls, values: dict | None = None) -> Options:
        """Options from a dict of overrides.

        Unknown names and values of the wrong type (``{"steps": "50"}``, a bool for a number)
        are an ``InputError`` naming the option and what it expects.
        """
        values = dict(values or {})
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            hints = typing.get_type_hints(cls.Options)
            expected = ", ".join(
                f"{n} ({_type_name(hints[n], fields[n].metadata)})" for n in sorted(fields)
            )
            raise InputError(
                f"{cls.name} has no option {', '.join(unknown)}; its options are: "
                f"{expected or 'none'}."
            )
        hints = typing.get_type_hints(cls.Options)
        values = {k: _coerce(v, hints[k]) for k, v in values.items()}
        for name, value in values.items():
            _check_type(name, value, hints[name], fields[name].metadata)
        return cls.Options(**values).validated()

    @classmethod
    def attempts(cls, options: Options) -> list[Options]:
        """Option sets to run in turn while the result is not trusted (first: ``options``).

        Only Integrated Gradients refines (doubling its steps, see ``methods``); the explainer
        stops at the first run whose completeness error is within tolerance.
        """
        return [options]

    @classmethod
    def forward_rows(cls, n_features: int, options: Options) -> int:
        """Model rows (forward passes of one sequence) the method needs."""
        raise NotImplementedError

    def run(self, ctx) -> Any:  # -> methods.MethodOutput
        raise NotImplementedError


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to the registry under ``cls.name``."""
    METHODS[cls.name] = cls
    return cls


def _ensure_loaded() -> None:
    from engine.attribution import methods  # noqa: F401  (registers the built-in methods)


def all_methods() -> list[type[Method]]:
    _ensure_loaded()
    return list(METHODS.values())


def get_method(name: str) -> type[Method]:
    """The method called ``name``; an ``InputError`` listing the valid names otherwise."""
    _ensure_loaded()
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    aliases = {"ig": "integrated_gradients", "shap": "kernel_shap"}
    key = aliases.get(key, key)
    if key not in METHODS:
        raise InputError(f"Unknown method {name!r}; choose one of: {', '.join(METHODS)}.")
    return METHODS[key]


def available_methods(loaded) -> list[type[Method]]:
    """Methods that can run on ``loaded`` (a ``LoadedModel`` or ``api.Model``)."""
    loaded = getattr(loaded, "loaded", loaded)
    return [m for m in all_methods() if m.incompatibility(loaded) is None]


def check_compatible(method: type[Method], loaded) -> None:
    reason = method.incompatibility(loaded)
    if reason:
        raise InputError(f"{method.title} cannot run on {loaded.name}: {reason}")
