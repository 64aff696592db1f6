"""llama.cpp (``llama-cpp-python``) as the baseline of ``bench/generation.py``.

``make bench-deps`` installs it (it compiles llama.cpp: about 4 minutes on 2 cores, once per
pip cache). Absent, the bench skips these rows and says so.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def shipped_gguf() -> Path:
    """The Q4_1 GGUF file the embedded SmolLM2 comes from (``engine.catalog`` knows where)."""
    from engine.catalog import EMBEDDED

    smollm = EMBEDDED["smollm2-135m"]
    return smollm.folder() / smollm.gguf_file


def f32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every tensor dequantized to F32: llama.cpp at the workbench's precision
    (the values are the same; only their storage differs). Written once, then reused."""
    if dst.is_file():
        return dst
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(dst) + ".part", arch=arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(gguf.LlamaFileType.ALL_F32)
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    tensors = []
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        tensors.append((tensor.name, data))
        writer.add_tensor_info(
            tensor.name, data.shape, data.dtype, data.nbytes, gguf.GGMLQuantizationType.F32
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, data in tensors:
        writer.write_tensor_data(data)
    writer.close()
    Path(str(dst) + ".part").rename(dst)
    return dst


class LlamaCpp:
    """One GGUF file loaded in llama.cpp with the machine's torch thread count."""

    def __init__(self, path: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)

    def run(self, prompt: str, tokens: int) -> tuple[float, float, str]:
        """(time to first token s, decode tokens/s after the first, text), greedy."""
        started = time.perf_counter()
        times, pieces = [], []
        for chunk in self.llm(prompt, max_tokens=tokens, temperature=0.0, top_k=1, stream=True):
            times.append(time.perf_counter())
            pieces.append(chunk["choices"][0]["text"])
        decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
        return times[0] - started, decode, "".join(pieces)
