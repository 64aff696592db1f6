"""``POST /v1/embeddings``: mean-pooled, L2-normalised sentence vectors from an encoder
(default the embedded all-MiniLM-L6, "minilm-l6"), recorded as an "embed" run."""

from __future__ import annotations

from engine import access, runs
from engine.catalog import DEFAULT_ENCODER
from engine.errors import InputError
from workbench.http.common import JSON, Call, get_str
from workbench.http.errors import bad_request

MAX_INPUTS = 256
MAX_TOKENS = 512  # longer inputs are truncated (the MiniLM context)


def embed(loaded, texts: list[str]) -> dict:
    """Mean of the last hidden states over real tokens, L2-normalised: (len(texts), hidden).

    Returns plain data: ``{"vectors": [[float, ...], ...], "token_counts": [int, ...]}``."""
    import torch

    if loaded.kind not in ("encoder", "classifier"):
        raise InputError(
            f"{loaded.name} is a {loaded.kind} model: embeddings need an encoder, e.g. "
            f"{DEFAULT_ENCODER}."
        )
    batch = loaded.encode(
        texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
    )
    with loaded.use(), torch.inference_mode():
        inputs = {k: v.to(loaded.device) for k, v in batch.items()}
        model = getattr(loaded.model, "base_model", loaded.model)
        hidden = model(**inputs).last_hidden_state  # (batch, tokens, hidden)
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, tokens, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (batch, hidden)
        vectors = torch.nn.functional.normalize(pooled.float(), dim=-1).cpu()
    counts = batch["attention_mask"].sum(1).tolist()
    return {"vectors": vectors.tolist(), "token_counts": [int(c) for c in counts]}


def start_embedding(model, texts: list[str]) -> runs.Run:
    """The "embed" run for ``texts`` on ``model`` (an ``engine.api.Model``), recorded in its
    workbench's ledger."""
    access.require("run")
    loaded = model.loaded
    spec = {"model": loaded.name, "fingerprint": loaded.fingerprint, "texts": texts}
    workbench = model._workbench
    with runs.recording(lambda run: workbench.record(run, loaded)):
        return runs.start("embed", lambda _ctx: embed(loaded, texts), spec=spec, cost=len(texts))


def _encode(vector: list[float], form: str) -> list[float] | str:
    """A vector as floats, or as base64 of its little-endian float32 bytes (what the openai
    package asks for by default)."""
    if form == "float":
        return vector
    import base64

    import numpy as np

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


async def embeddings(call: Call):
    """POST /v1/embeddings: ``input`` (a string or a list of strings), ``model``."""
    body = await call.body()
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if (
        not isinstance(texts, list)
        or not texts
        or len(texts) > MAX_INPUTS
        or not all(isinstance(t, str) and t.strip() for t in texts)
    ):
        raise bad_request(
            f"'input' must be a non-empty string or a list of 1 to {MAX_INPUTS} non-empty strings.",
            "invalid_input",
        )
    form = get_str(body, "encoding_format", "float")
    if form not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'.")
    model = await call.model(body.get("model") or DEFAULT_ENCODER)
    run = await call.blocking(start_embedding, model, texts)
    out = await call.finish(run)
    tokens = sum(out["token_counts"])
    return JSON(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, form)}
                for i, v in enumerate(out["vectors"])
            ],
            "model": model.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "run_id": run.id,
        }
    )
