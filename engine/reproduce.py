"""Reproduce a recorded run and say how close the new numbers are: the verdict.

    verdict = reproduce(workbench, "3f2a9c...")      # a ledger run id
    verdict = reproduce(workbench, "run.json")       # `history export` bundle or a saved result
    verdict.verdict   # "exact" | "within tolerance" | "mismatch" | "cannot reproduce"

``exact``: the same tokens / labels and bit-identical numbers. ``within tolerance``: the same
discrete outputs and numbers equal within the operation's stated tolerance (``TOLERANCES``).
``mismatch``: something differs (``differences`` says what, first difference first).
``cannot reproduce``: the model is missing or its weights' fingerprint differs from the
recorded one, or the record holds no result to compare with.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import access
from engine.errors import EngineError, InputError
from engine.files import read_json_file
from engine.ledger import RunRecord
from engine.results import Result

# operation -> (rtol, atol) for "within tolerance" on its numbers
TOLERANCES: dict[str, tuple[float, float]] = {
    "generate": (1e-4, 1e-5),
    "compare": (1e-4, 1e-5),
    "perplexity": (1e-4, 1e-6),
    "classify": (1e-4, 1e-6),
    "attention": (1e-4, 1e-6),
    "explain": (1e-4, 1e-6),
}
VERDICTS = ("exact", "within tolerance", "mismatch", "cannot reproduce")


@dataclass(frozen=True)
class Verdict(Result):
    """How a re-run compares with its record. ``match`` is True for exact or within tolerance.

    ``tolerance``: the rule applied for "within tolerance" (e.g. "rtol 1e-4, atol 1e-5 on
    log-probabilities"); ``differences``: human-readable, first difference first;
    ``new_run_id``: the ledger id of the re-run (None when nothing was run).
    """

    run_id: str | None
    operation: str
    verdict: str
    match: bool
    tolerance: str
    differences: list[str] = field(default_factory=list)
    new_run_id: str | None = None


@dataclass(frozen=True)
class Recorded:
    """What a reproduction needs: the operation, its spec, the recorded identity and result."""

    run_id: str | None
    operation: str
    spec: dict
    model: str | None
    fingerprint: str | None
    seed: int | None
    result: dict | None
    result_file: Path | None = None


def _tolerance_text(operation: str) -> str:
    rtol, atol = TOLERANCES.get(operation, (0.0, 0.0))
    return f"rtol {rtol:g}, atol {atol:g} on the numbers; discrete outputs must be identical"


# --- reading what was recorded ----------------------------------------------------------------


def from_record(ledger, record: RunRecord) -> Recorded:
    path = ledger.result_file(record)
    result = None
    if path is not None and path.suffix == ".json" and path.is_file():
        result = json.loads(path.read_text())
    return Recorded(
        record.id,
        record.operation,
        record.spec,
        record.model,
        record.fingerprint,
        record.seed,
        result,
        path if path is not None and path.suffix != ".json" else None,
    )


def from_file(path: str | Path) -> Recorded:
    """A ``history export`` bundle, or a result saved with ``Result.save`` (generation)."""
    path = Path(path)
    data = read_json_file(path, "a run id or a JSON file to re-run")
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a run record or a saved result.")
    if isinstance(data.get("record"), dict):  # history export bundle
        record = data["record"]
        side = data.get("result_file")
        return Recorded(
            record.get("id"),
            str(record.get("operation")),
            record.get("spec") or {},
            record.get("model"),
            record.get("fingerprint"),
            record.get("seed"),
            data.get("result"),
            path.parent / side if side else None,
        )
    if data.get("type") == "GenerationResult":
        prov = data.get("provenance") or {}
        spec = {
            "model": prov.get("model"),
            "prompt": data.get("prompt", ""),
            "messages": data.get("messages") or [],
            "settings": data.get("settings") or {},
        }
        return Recorded(
            None,
            "generate",
            spec,
            prov.get("model"),
            prov.get("fingerprint"),
            prov.get("seed"),
            data,
        )
    raise InputError(
        f"{path} is neither a `workbench history export` file nor a saved generation result."
    )


# --- re-running -------------------------------------------------------------------------------


def _settings(spec: dict, seed: int | None, decode_path: str | None = None):
    """The recorded settings, with the recorded seed and the decode path the run took (a
    different path gives other rounding; an unknown one is left to the workbench)."""
    from engine.generation import GenerationSettings
    from engine.generation.paths import DECODE_PATHS

    raw = dict(spec.get("settings") or {})
    raw["stop_sequences"] = tuple(raw.get("stop_sequences") or ())
    if seed is not None:
        raw["seed"] = seed
    if decode_path in DECODE_PATHS:
        raw["decode_path"] = decode_path
    known = GenerationSettings.__dataclass_fields__
    return GenerationSettings(**{k: v for k, v in raw.items() if k in known})


def _messages(spec: dict):
    from engine.generation import ChatMessage

    return [ChatMessage(m["role"], m["content"]) for m in spec.get("messages") or []] or None


def _rerun(workbench, rec: Recorded):
    """Start the recorded request again; returns the new run."""
    spec, op = rec.spec, rec.operation
    if op == "compare":
        variants = spec.get("variants") or spec["models"]
        return workbench.start_comparison(
            variants, spec.get("prompt", ""), _settings(spec, rec.seed), _messages(spec)
        )
    model = workbench.load(rec.model)
    if op == "generate":
        path = ((rec.result or {}).get("provenance") or {}).get("decode_path")
        return model.start_generation(
            spec.get("prompt", ""), _settings(spec, rec.seed, path), _messages(spec)
        )
    if op == "perplexity":
        return model.start_perplexity(spec["text"])
    if op == "classify":
        return model.start_classification(spec["text"], int(spec.get("max_length", 512)))
    starter = RERUNS.get(op)
    if starter is None:
        raise InputError(f"Runs of kind {op!r} cannot be re-run yet.")
    return starter(workbench, spec, rec)


# operation -> starter(workbench, spec, recorded) -> Run, for capabilities that register one
RERUNS: dict[str, Callable[[Any, dict, Recorded], Any]] = {}


# --- comparing --------------------------------------------------------------------------------


def _numbers(a, b, rtol: float, atol: float, what: str) -> tuple[str, list[str]]:
    """("exact" | "within tolerance" | "mismatch", differences) for two arrays of numbers."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return "mismatch", [f"{what}: shape {a.shape} recorded, {b.shape} now"]
    if np.array_equal(a, b, equal_nan=True):
        return "exact", []
    if np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
        worst = float(np.nanmax(np.abs(a - b))) if a.size else 0.0
        return "within tolerance", [f"{what}: largest difference {worst:.3g}"]
    worst = float(np.nanmax(np.abs(a - b)))
    at = int(np.nanargmax(np.abs(a - b).ravel()))
    return "mismatch", [f"{what}: differ by up to {worst:.3g} (first worst at flat index {at})"]


def _worst(*verdicts: str) -> str:
    order = {"exact": 0, "within tolerance": 1, "mismatch": 2}
    return max(verdicts, key=order.__getitem__) if verdicts else "exact"


def _compare_generation(old: dict, new: dict, rtol: float, atol: float) -> tuple[str, list[str]]:
    old_ids = [t["id"] for t in old.get("tokens", [])]
    new_ids = [t["id"] for t in new.get("tokens", [])]
    if old_ids != new_ids:
        at = next(
            (i for i, (a, b) in enumerate(zip(old_ids, new_ids, strict=False)) if a != b),
            min(len(old_ids), len(new_ids)),
        )
        return "mismatch", [
            f"tokens differ from position {at} ({len(old_ids)} recorded, {len(new_ids)} now): "
            f"recorded {old.get('text', '')!r}, now {new.get('text', '')!r}"
        ]
    old_lp = [t["logprob"] for t in old.get("tokens", [])]
    new_lp = [t["logprob"] for t in new.get("tokens", [])]
    return _numbers(old_lp, new_lp, rtol, atol, "token log-probabilities")


def compare_results(operation: str, old: Any, new: Any) -> tuple[str, list[str]]:
    """Verdict and differences between a recorded result and a new one.

    ``old``: the recorded result as plain data (``{"file": path}`` for an npz result);
    ``new``: the new result object, or its ``to_dict()``.
    """
    rtol, atol = TOLERANCES.get(operation, (0.0, 0.0))
    comparer = COMPARERS.get(operation)
    if comparer is not None:
        return comparer(old, new, rtol, atol)
    if not isinstance(new, dict):
        new = _as_dict(new)
    if operation == "generate":
        return _compare_generation(old, new, rtol, atol)
    if operation == "compare":
        verdicts, notes = [], []
        old_out, new_out = old.get("outcomes", []), new.get("outcomes", [])
        if [o["model"] for o in old_out] != [o["model"] for o in new_out]:
            return "mismatch", ["the compared models differ"]
        if len(old_out) != len(new_out):
            return "mismatch", [f"{len(old_out)} outcomes recorded, {len(new_out)} now"]
        for a, b in zip(old_out, new_out, strict=True):
            if (a.get("result") is None) != (b.get("result") is None):
                verdicts.append("mismatch")
                notes.append(f"{a['model']}: failed in one run and not in the other")
                continue
            if a.get("result") is None:
                continue
            verdict, diffs = _compare_generation(a["result"], b["result"], rtol, atol)
            verdicts.append(verdict)
            notes += [f"{a['model']}: {d}" for d in diffs]
        return _worst(*verdicts), notes
    if operation == "perplexity":
        if old.get("token_ids") != new.get("token_ids"):
            return "mismatch", ["the text tokenizes differently"]
        return _numbers(old["token_logprobs"], new["token_logprobs"], rtol, atol, "log-probs")
    if operation == "classify":
        if old.get("label") != new.get("label"):
            return "mismatch", [f"label {old.get('label')!r} recorded, {new.get('label')!r} now"]
        return _numbers(old["logits"], new["logits"], rtol, atol, "logits")
    raise InputError(f"Runs of kind {operation!r} cannot be compared yet.")


# operation -> comparer(old, new, rtol, atol), for capabilities that register one
COMPARERS: dict[str, Callable[[Any, Any, float, float], tuple[str, list[str]]]] = {}


def _rerun_attention(workbench, spec: dict, rec: Recorded):
    from engine.attention import AttentionSettings, start_attention

    jobs = [(label, workbench.load(name).loaded, text) for label, name, text in spec["sides"]]
    settings = AttentionSettings(**(spec.get("settings") or {}))
    with workbench.recording():
        return start_attention(jobs, settings, idle_timeout_s=None)


def _compare_attention(old: Any, new: Any, rtol: float, atol: float) -> tuple[str, list[str]]:
    from engine.attention.run import AttentionComparison

    if not isinstance(old, dict) or "file" not in old:
        return "cannot reproduce", ["the attention tensors of this run were not kept (size)"]
    recorded = AttentionComparison.load_npz(old["file"])
    verdicts, notes = [], []
    for a, b in zip(recorded.sides, new.sides, strict=False):
        if a.result.token_ids != b.result.token_ids:
            return "mismatch", [f"{a.label}: the text tokenizes differently"]
        verdict, diffs = _numbers(
            a.result.attentions, b.result.attentions, rtol, atol, f"{a.label}: attention weights"
        )
        verdicts.append(verdict)
        notes += diffs
    if len(recorded.sides) != len(new.sides):
        return "mismatch", ["a different number of inputs"]
    return _worst(*verdicts), notes


def _rerun_explain(workbench, spec: dict, rec: Recorded):
    from engine.attribution import ExplanationSpec, MethodRun, TargetSpec

    target = {
        k: v for k, v in (spec.get("target") or {}).items() if k in TargetSpec.__dataclass_fields__
    }
    # the options each method ran with (its automatic batch size filled in), so the re-run
    # batches its forward passes the same way and sums in the same order
    used = {a["method"]: a.get("options") or {} for a in (rec.result or {}).get("attributions", [])}
    methods = tuple(
        MethodRun(m["method"], {**dict(m.get("options") or []), **_batch_of(used, m["method"])})
        for m in spec.get("methods") or []
    )
    explanation = ExplanationSpec(
        spec.get("text", ""),
        TargetSpec(**target),
        methods,
        per_token=bool(spec.get("per_token", False)),
        faithfulness=bool(spec.get("faithfulness", True)),
        seed=int(spec.get("seed", 0)),
    )
    return workbench.load(rec.model).start_explanation(explanation)


def _batch_of(used: dict, method: str) -> dict:
    from engine.attribution import get_method

    batch = used.get(get_method(method).name, {}).get("internal_batch_size")
    return {"internal_batch_size": int(batch)} if batch else {}


def _compare_explain(old: Any, new: Any, rtol: float, atol: float) -> tuple[str, list[str]]:
    new = new if isinstance(new, dict) else _as_dict(new)
    verdicts, notes = [], []
    old_sets, new_sets = old.get("attributions", []), new.get("attributions", [])
    if [a["method"] for a in old_sets] != [a["method"] for a in new_sets]:
        return "mismatch", ["the methods differ"]
    for a, b in zip(old_sets, new_sets, strict=True):
        if a["tokens"] != b["tokens"]:
            return "mismatch", [f"{a['method']}: the input tokenizes differently"]
        verdict, diffs = _numbers(a["scores"], b["scores"], rtol, atol, f"{a['method']} scores")
        verdicts.append(verdict)
        notes += diffs
    return _worst(*verdicts), notes


RERUNS["attention"] = _rerun_attention
COMPARERS["attention"] = _compare_attention
RERUNS["explain"] = _rerun_explain
COMPARERS["explain"] = _compare_explain


# --- the verdict ------------------------------------------------------------------------------


def _cannot(rec: Recorded, why: str) -> Verdict:
    return Verdict(
        rec.run_id, rec.operation, "cannot reproduce", False, _tolerance_text(rec.operation), [why]
    )


def reproduce(workbench, source: str | Path | RunRecord) -> Verdict:
    """Re-run a recorded run (ledger id, record, or JSON file) and give the verdict.

    Needs the "reproduce" permission only (an auditor may re-run what others ran)."""
    with access.reproducing():
        return _reproduce(workbench, source)


def _reproduce(workbench, source: str | Path | RunRecord) -> Verdict:
    if isinstance(source, RunRecord):
        rec = from_record(workbench.ledger, source)
    elif Path(str(source)).suffix == ".json" or Path(str(source)).is_file():
        rec = from_file(source)
    else:
        rec = from_record(workbench.ledger, workbench.ledger.get(str(source)))
    if rec.result is None and rec.result_file is None:
        return _cannot(rec, "the record holds no result to compare with (the run failed)")
    if isinstance(rec.result, dict) and rec.result.get("tensors_kept") is False:
        return _cannot(rec, "the result's tensors were too large to keep in the ledger")
    if rec.operation != "compare":
        if not rec.model:
            return _cannot(rec, "the record names no model")
        try:
            loaded = workbench.load(rec.model).loaded
        except EngineError as exc:
            return _cannot(rec, f"model {rec.model!r} is not available: {exc}")
        if rec.fingerprint and loaded.fingerprint != rec.fingerprint:
            return _cannot(
                rec,
                f"the weights of {rec.model!r} changed: fingerprint {loaded.fingerprint} now, "
                f"{rec.fingerprint} recorded",
            )
    try:
        run = _rerun(workbench, rec)
        new = run.wait()
    except EngineError as exc:
        return _cannot(rec, f"the re-run failed: {exc}")
    old = rec.result
    if old is None and rec.result_file is not None:
        old = {"file": str(rec.result_file)}
    verdict, differences = compare_results(rec.operation, old, new)
    return Verdict(
        rec.run_id,
        rec.operation,
        verdict,
        verdict in ("exact", "within tolerance"),
        _tolerance_text(rec.operation),
        differences,
        run.id,
    )


def _as_dict(result: Any) -> dict:
    return json.loads(result.to_json()) if hasattr(result, "to_json") else dict(result)
