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

``rates(loaded, tokens, wait=False)`` never waits for the model: when another run holds it,
there is no measurement yet and the caller falls back to the arithmetic estimate.
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
KEEP = 8  # samples kept per kind (benchmark reps first, then the latest observed runs)
MAX_AGE_S = 7 * 24 * 3600
# The range shown: fastest sample x LOW to slowest sample x HIGH. A shared machine's load
# changes within seconds (measured here: the same batch took 1x to 6x its fastest time).
LOW, HIGH = 0.8, 1.6

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

    forward / backward: seconds per row, benchmark repetitions and observed runs (at most
    ``KEEP`` each); batch: rows per pass of the benchmark; measured: when (epoch seconds).
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
        middle = samples[len(samples) // 2]
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


def rates(loaded, tokens: int, *, wait: bool = False) -> Rates | None:
    """Measured rates for ``tokens``-token rows on ``loaded``, measuring them once if needed.

    The measurement takes the model's lock for about a second (a few batches). With
    ``wait=False`` it is skipped (None) while another run holds the model.
    """
    hit = cached(loaded, tokens)
    if hit is not None:
        return hit
    key = _key(loaded, tokens)
    with _LOCK:
        measuring = _MEASURING.setdefault(key, threading.Lock())
    if not measuring.acquire(blocking=wait):
        return None  # another thread is measuring it right now
    try:
        hit = cached(loaded, tokens)
        if hit is not None:
            return hit
        with _model(loaded, wait) as got:
            if not got:
                return None
            measured = _measure(loaded, key, bucket(tokens))
        with _LOCK:
            _RATES[key] = measured
        _to_disk(measured)
        return measured
    finally:
        measuring.release()


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
def _model(loaded, wait: bool) -> Iterator[bool]:
    """The model's lock: yields False at once when busy and ``wait`` is off."""
    if not wait:
        if not loaded.lock.acquire(blocking=False):
            yield False
            return
        try:
            with loaded.use():
                yield True
        finally:
            loaded.lock.release()
        return
    with loaded.use():
        yield True


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


def _measure(loaded, key: str, length: int, reps: int = 2) -> Rates:
    """Time forward and forward+backward batches of ``length``-token rows (call in ``use()``)."""
    from engine.attribution.explainer import frozen_parameters

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
        return time.perf_counter() - started

    with frozen_parameters(model):
        with torch.no_grad():
            x = embedding(ids).expand(batch, -1, -1).contiguous()
            score(x[:1])  # warm-up: the first pass allocates and picks kernels

        def forward() -> None:
            with torch.no_grad():
                score(x)

        def backward() -> None:
            xg = x.detach().clone().requires_grad_()
            torch.autograd.grad(score(xg).sum(), xg)

        backward_s = [timed(backward) / batch for _ in range(reps)]
        forward_s = [timed(forward) / batch for _ in range(reps)]
    return Rates(
        key=key,
        bucket=length,
        batch=batch,
        forward=tuple(forward_s),
        backward=tuple(backward_s),
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
