"""Stage 8, the edge format: one GGUF file for llama.cpp, and a llama.cpp sample when llama-cpp-python is there.

Q8_0 when every matrix row is a multiple of 32 values, else F16 (`export_gguf` says which tensor breaks Q8_0).
The sample drives llama.cpp's own sampler token by token: create_completion keeps going past max_tokens while
the text ends mid-character, which a barely trained model that repeats a UTF-8 lead byte does forever.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from kfoundry.checkpoint import load_config
from kfoundry.errors import DependencyError
from kfoundry.export.gguf import export_gguf
from kfoundry.speedrun.stage import Section
from kfoundry.text import nfc


def run(ckpt: str | Path, run_dir: str | Path, prompt: str, *, seed: int = 0, max_tokens: int = 48) -> Section:
    """Export CKPT to RUN/export/model-<type>.gguf and sample a continuation of PROMPT with llama.cpp.
    Fields: {"gguf": {path, type, size_bytes, prompt, llama_cpp_sample, ...}} or {"gguf": {"skipped": why}}."""
    errors = []
    for out_type in ("q8_0", "f16"):
        try:
            res = export_gguf(ckpt, Path(run_dir) / "export" / f"model-{out_type}.gguf", out_type=out_type,
                              overwrite=True)
            break
        except (ValueError, DependencyError) as e:  # a type the model cannot take, or no `gguf` package
            errors.append(f"{out_type}: {e}")
    else:
        return _section({"skipped": "; ".join(errors)})
    info: dict[str, Any] = {"path": str(res.path), "type": res.out_type, "size_bytes": res.size_bytes,
                            "prompt": prompt}
    try:
        import llama_cpp  # optional: compiles llama.cpp from source
    except ImportError:
        info["llama_cpp"] = "not installed (pip install llama-cpp-python) -- no llama.cpp sample"
        return _section(info)
    cfg = load_config(ckpt)
    llm = llama_cpp.Llama(model_path=str(res.path), n_ctx=cfg.max_seq_len, n_threads=os.cpu_count(), seed=seed,
                          verbose=False)
    ids = llm.tokenize(nfc(prompt).encode("utf-8"), add_bos=True, special=False)  # llama.cpp does not NFC itself
    stop = {int(llm.metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")}
    out: list[int] = []
    t0 = time.perf_counter()
    budget = min(max_tokens, cfg.max_seq_len - len(ids))
    for t in llm.generate(ids, top_k=50, top_p=0.95, temp=0.8, repeat_penalty=1.0) if budget > 0 else ():
        if t in stop:
            break
        out.append(int(t))
        if len(out) >= budget:
            break
    seconds = time.perf_counter() - t0
    info["llama_cpp_sample"] = llm.detokenize(out).decode("utf-8", errors="replace")
    llm.close()
    info["llama_cpp_tokens_per_sec"] = len(out) / max(seconds, 1e-9)
    info["llama_cpp_version"] = llama_cpp.__version__
    return _section(info)


def _section(info: dict[str, Any]) -> Section:
    fields = {"gguf": info}
    return Section(fields, markdown(fields))


def markdown(report: dict[str, Any]) -> str:
    """The "Edge export" section: the file, its size, and the llama.cpp sample."""
    g = report.get("gguf") or {}
    lines = ["", "## Edge export (GGUF for llama.cpp)", ""]
    if "skipped" in g:
        lines.append(f"Skipped: {g['skipped']}")
    else:
        lines += [f"- file: `{g['path']}` ({g['type']}, {g['size_bytes'] / 1e6:.2f} MB)"]
        if "llama_cpp_sample" in g:
            lines += [f"- llama.cpp {g['llama_cpp_version']}: {g['llama_cpp_tokens_per_sec']:.0f} tokens/s (prompt, "
                      "sampling and decoding together)", "", "```text", g["prompt"] + g["llama_cpp_sample"], "```"]
        else:
            lines.append(f"- llama.cpp: {g.get('llama_cpp')}")
    return "\n".join(lines) + "\n"
