"""Measured seconds per row on this machine, for the pre-flight estimate.

A *row* is one sequence through the model: a forward pass (perturbation methods, faithfulness
curves) or a forward pass plus a backward pass to the input embeddings (gradient methods).
Its cost is measured, not modelled: a one-off micro-benchmark per (model fingerprint, device,
dtype, thread count, sequence-length bucket) times a few batches of both kinds at the bucket's
length (a power of two, at least 16 tokens), and every finished explanation adds its own
measured seconds per row (``observe``), so the figures follow the machine's real load.

Rates are kept in the process, and on disk under ``WORKBENCH_HOME/cache`` (one JSON file,
written atomically; entries older than a week are measured again). A shorter sequence is
costed linearly from its bucket (``tokens / bucket`` of the bucket's rate).

``rates(loaded, tokens, wait=True)`` measures in the caller's thread (about a second under the
model's lock). ``wait=False`` never blocks: it starts the measurement as a background run
(``engine.runs``, operation "calibrate"; it waits its turn for the model like any run) and
returns None, so the caller shows the arithmetic estimate until the rates are there.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from engine.files import DiskError, atomic_write_json

MIN_BUCKET = 16
TOKENS_PER_PASS = 256  # benchmark batch: about this many tokens per pass (at least one row)
KEEP = 8  # samples kept per kind (the benchmark's first, then the latest observed runs)
MAX_AGE_S = 7 * 24 * 3600
# The range shown: fastest sample x LOW to slowest sample x HIGH. Runs batch more rows per pass
# than the benchmark (cheaper per row); the first pass of a new shape costs 4-25x a later one
# (fresh memory), and a shared machine's load changes within seconds (measured on 2 shared
# cores: the same IG run on SmolLM2 took 31.7 s, then 4.0 s).
LOW, HIGH = 0.5, 2.0

_RATES: dict[str, Rates] = {}
_LOCK = threading.Lock()
_MEASURING: dict[str, threading.Lock] = {}
_DISK_LOADED: set[str] = set()


def bucket(tokens: int) -> int:
    """The length bucket of ``tokens``: the next power of two, at least ``MIN_BUCKET``."""
    return max(MIN_BUCKET, 2 ** math.ceil(math.log2(max(tokens, 1))))


@dataclass(frozen=True)
class Rates:
    """Seconds per row at ``bucket`` tokens: samples of forward-only and forward+backward rows.

    forward / backward: seconds per row: the benchmark's first (cold: a new shape) and second
    (warm) pass, then observed runs (at most ``KEEP`` each); batch: rows per pass of the
    benchmark; measured: when (epoch seconds).
    """

    key: str
    bucket: int
    batch: int
    forward: tuple[float, ...]
    backward: tuple[float, ...]
    measured: float

    def seconds(self, rows: int, tokens: int, gradient: bool) -> tuple[float, float, float]:
        """(low, expected, high) seconds of ``rows`` rows of ``tokens`` tokens."""
        samples = sorted(self.backward if gradient else self.forward)
        scale = rows * min(tokens, self.bucket) / self.bucket
        middle = samples[(len(samples) - 1) // 2]  # the lower median: warm passes
        return samples[0] * scale * LOW, middle * scale, samples[-1] * scale * HIGH


def _key(loaded, tokens: int) -> str:
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    return "|".join(
        [
            loaded.fingerprint,
            str(loaded.device),
            dtype,
            f"{torch.get_num_threads()}t",
            str(bucket(tokens)),
        ]
    )


def cached(loaded, tokens: int) -> Rates | None:
    """The rates for this model and length if measured already (process, then disk)."""
    key = _key(loaded, tokens)
    with _LOCK:
        hit = _RATES.get(key)
    if hit is None:
        hit = _from_disk(key)
        if hit is not None:
            with _LOCK:
                hit = _RATES.setdefault(key, hit)
    return hit


def rates(loaded, tokens: int, *, wait: bool = True) -> Rates | None:
    """Measured rates for ``tokens``-token rows on ``loaded``, measuring them once if needed.

    ``wait=True``: measure now, in this thread (the model's lock for about a second; waits
    for a measurement already under way). ``wait=False``: return the rates if measured, else
    start measuring in a background run and return None at once.
    """
    hit = cached(loaded, tokens)
    if hit is not None or not wait:
        if hit is None:
            _start_background(loaded, tokens)
        return hit
    key = _key(loaded, tokens)
    with _LOCK:
        measuring = _MEASURING.setdefault(key, threading.Lock())
    with measuring:  # one measurement per key; a second caller waits and reads it
        hit = cached(loaded, tokens)
        if hit is not None:
            return hit
        with loaded.use():
            measured = _measure(loaded, key, bucket(tokens))
        with _LOCK:
            _RATES[key] = measured
        _to_disk(measured)
        return measured


def _start_background(loaded, tokens: int):
    """Measure in a background run, unless one is measuring this key already."""
    from engine import runs

    key = _key(loaded, tokens)
    with _LOCK:
        measuring = _MEASURING.setdefault(key, threading.Lock())
    if measuring.locked():
        return None

    def work(_ctx) -> Rates | None:
        return rates(loaded, tokens, wait=True)

    return runs.start("calibrate", work, spec={"model": loaded.name, "tokens": tokens})


def observe(loaded, tokens: int, gradient: bool, rows: int, seconds: float) -> None:
    """Add a finished run's seconds per row (scaled to its bucket) to the cached rates."""
    if rows <= 0 or seconds <= 0:
        return
    key = _key(loaded, tokens)
    per_row = seconds / rows * bucket(tokens) / max(tokens, 1)
    with _LOCK:
        old = _RATES.get(key)
        if old is None:
            return
        kind = "backward" if gradient else "forward"
        samples = (*getattr(old, kind), per_row)[-KEEP:]
        _RATES[key] = Rates(**{**old.__dict__, kind: samples})


def forget() -> None:
    """Drop the rates kept in this process (tests; the disk cache stays)."""
    with _LOCK:
        _RATES.clear()
        _DISK_LOADED.clear()


# --- measuring ----------------------------------------------------------------------------


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Gradients flow to the input embeddings only: skipping the weights' gradients saves about
    a third of each backward pass. Restored afterwards (call inside ``loaded.use()``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _score_fn(loaded):
    """(B, n, d) embeddings -> (B,) a log-probability, the way attribution targets score."""
    model = loaded.model
    causal = loaded.kind == "causal-lm"

    def score(x: torch.Tensor) -> torch.Tensor:
        if causal:
            logits = model(inputs_embeds=x, logits_to_keep=1, use_cache=False).logits[:, -1]
        else:
            logits = model(inputs_embeds=x).logits
        return torch.log_softmax(logits.float(), -1)[:, 0]

    return score


def _measure(loaded, key: str, length: int) -> Rates:
    """Time two forward+backward and two forward batches of ``length``-token rows.

    The first pass of a shape allocates fresh memory and picks kernels (measured here at 4-25x
    a later pass), and a real run's first pass at a new length pays the same: both the cold
    and the warm pass are kept as samples. Call inside ``loaded.use()``.
    """
    model = loaded.model
    embedding = model.get_input_embeddings()
    vocab = int(embedding.weight.shape[0])
    ids = (torch.arange(length) * 7919 % vocab).view(1, -1).to(loaded.device)
    batch = max(1, TOKENS_PER_PASS // length)
    score = _score_fn(loaded)
    cuda = loaded.device.type == "cuda"

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize(loaded.device)
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(loaded.device)
        return (time.perf_counter() - started) / batch

    with frozen_parameters(model):
        with torch.no_grad():
            x = embedding(ids).expand(batch, -1, -1).contiguous()

        def forward() -> None:
            with torch.no_grad():
                score(x)

        def backward() -> None:
            xg = x.detach().clone().requires_grad_()
            torch.autograd.grad(score(xg).sum(), xg)

        backward_s = (timed(backward), timed(backward))  # cold, then warm
        forward_s = (timed(forward), timed(forward))
    return Rates(
        key=key,
        bucket=length,
        batch=batch,
        forward=forward_s,
        backward=backward_s,
        measured=time.time(),
    )


# --- disk cache ---------------------------------------------------------------------------


def _cache_file():
    from engine.store import workbench_home

    return workbench_home() / "cache" / "attribution-calibration.json"


def _read_disk() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_disk(key: str) -> Rates | None:
    with _LOCK:
        if key in _DISK_LOADED:
            return None
        _DISK_LOADED.add(key)
    raw = _read_disk().get(key)
    try:
        found = Rates(
            key=key,
            bucket=int(raw["bucket"]),
            batch=int(raw["batch"]),
            forward=tuple(float(v) for v in raw["forward"]),
            backward=tuple(float(v) for v in raw["backward"]),
            measured=float(raw["measured"]),
        )
    except (TypeError, KeyError, ValueError):
        return None
    fresh = time.time() - found.measured < MAX_AGE_S
    valid = found.forward and found.backward and min(found.forward + found.backward) > 0
    return found if fresh and valid else None


def _to_disk(rates: Rates) -> None:
    """Add ``rates`` to the disk cache; a failed write only loses the cache."""
    path = _cache_file()
    with _LOCK:
        data = _read_disk()
        data[rates.key] = {k: v for k, v in rates.__dict__.items() if k != "key"}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, data, "the attribution timing cache")
        except (OSError, DiskError):
            pass
