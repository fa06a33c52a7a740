"""The vLLM engine (GPU): our front, vLLM's OpenAI server doing the arithmetic on the Hugging Face export.

`VllmEngine` is the forwarding engine (forward.py) over a `VllmUpstream`: vLLM's OpenAI-compatible server,
started as a child process on a loopback port (process.py) on the checkpoint's Hugging Face export (a Llama
architecture, so vLLM needs nothing of ours), and spoken to on `/v1/completions` with the prompt as token ids
and `return_token_ids` (vLLM >= 0.10.2), so vLLM's tokenizer is never used for what the client sees. vLLM
batches every request it holds (continuous batching with paged attention and CUDA graphs).

The command: `vllm serve HF_DIR ...` when a `vllm` executable is named (`--vllm PATH`, `$KFOUNDRY_VLLM`) or
on PATH; `python -m vllm.entrypoints.openai.api_server --model HF_DIR ...` when the package is importable in
this Python. vLLM pins its own torch, so it often lives in an environment of its own: point `--vllm` at that
environment's `vllm`. With neither, `find_vllm` raises a one-line `DependencyError` naming the install.

Sampling means what it means in our engine: temperature (0 = greedy), top-k (0 = off), top-p, a seed per
choice; the penalties and min-p that a `generation_config.json` could turn on are sent at their neutral values.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from kfoundry.errors import ConfigError, DependencyError, MissingPathError
from kfoundry.model.generate import SamplingParams
from kfoundry.serve.engines.forward import ForwardingEngine, ProcessUpstream, UpstreamError, error_message
from kfoundry.serve.engines.process import ServerProcess

INSTALL_HINT = ("--engine vllm needs vLLM on a CUDA GPU machine: pip install vllm (or pass --vllm PATH to the "
                "`vllm` of another environment, or set KFOUNDRY_VLLM)")
SERVED_NAME = "kfoundry"  # the upstream's model name; clients see ours (--model-name) through the front
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0,
           "min_tokens": 0, "ignore_eos": False, "n": 1}


def find_vllm(explicit: str | Path | None = None) -> list[str]:
    """The command prefix that starts vLLM's OpenAI server, up to (not including) the model; DependencyError
    (one line, with the install) when there is none. See the module docstring for the order."""
    path = explicit or os.environ.get("KFOUNDRY_VLLM")
    if path:
        if not (Path(path).is_file() and os.access(path, os.X_OK)):
            raise DependencyError(f"vllm executable not found or not executable: {path}")
        return [str(path), "serve"]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    found = shutil.which("vllm")
    if found:
        return [found, "serve"]
    raise DependencyError(INSTALL_HINT)


class VllmServer(ServerProcess):
    """vLLM's OpenAI server on `hf_dir` with `max_num_seqs` sequences of up to `max_model_len` tokens."""

    name = "vllm"

    def __init__(self, hf_dir: str | Path, *, max_num_seqs: int, max_model_len: int, tensor_parallel: int = 1,
                 dtype: str | None = None, vllm: str | Path | None = None, extra_args: list[str] | None = None,
                 start_timeout: float = 900):
        self.hf_dir = Path(hf_dir)
        if not (self.hf_dir / "config.json").is_file():
            raise MissingPathError(f"not a Hugging Face model folder (no config.json): {self.hf_dir}")
        if tensor_parallel < 1:
            raise ConfigError("--tensor-parallel must be >= 1")
        self.prefix = find_vllm(vllm)
        self.max_num_seqs, self.max_model_len = max_num_seqs, max_model_len
        self.tensor_parallel, self.dtype = tensor_parallel, dtype
        self.extra_args = list(extra_args or [])
        super().__init__(start_timeout)  # loading weights and capturing CUDA graphs takes minutes

    def command(self) -> list[str]:
        cmd = [*self.prefix, str(self.hf_dir), "--served-model-name", SERVED_NAME, "--host", "127.0.0.1",
               "--port", str(self.port), "--max-num-seqs", str(self.max_num_seqs),
               "--max-model-len", str(self.max_model_len)]
        if self.tensor_parallel > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + self.extra_args


class VllmUpstream(ProcessUpstream):
    """vLLM's OpenAI server as a forwarding engine's upstream (see forward.Upstream)."""

    name = "vllm"
    path = "/v1/completions"

    def body(self, prompt: list[int], params: SamplingParams, seed: int | None, banned: list[int],
             stop_ids: frozenset[int], stream: bool) -> dict:
        body = {"model": SERVED_NAME, "prompt": prompt, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k or -1,
                "stream": stream, "return_token_ids": True, "stop_token_ids": sorted(stop_ids), **NEUTRAL}
        if seed is not None:
            body["seed"] = seed
        if banned:  # ids our tokenizer cannot decode (a padded vocabulary) are never chosen
            body["logit_bias"] = {str(i): -100 for i in banned}
        return body

    def parse(self, data: dict) -> tuple[list[int], str | None]:
        if "error" in data or data.get("object") == "error":
            raise UpstreamError(f"vllm: {error_message(data)}")
        choices = data.get("choices") or []
        if not choices:  # a usage-only chunk
            return [], None
        choice = choices[0]
        tokens = choice.get("token_ids")
        if tokens is None and choice.get("text"):
            raise UpstreamError("vllm returned text without token ids: return_token_ids needs vLLM >= 0.10.2")
        reason = choice.get("finish_reason")
        if reason not in (None, "stop", "length"):
            raise UpstreamError(f"vllm ended the request with finish_reason {reason!r}")
        return tokens or [], reason


class VllmEngine(ForwardingEngine):
    """Runs vLLM's OpenAI server on the Hugging Face export `hf_dir` and answers tickets through it."""

    def __init__(self, hf_dir: str | Path, *, max_len: int, max_batch: int = 64, max_queue: int = 256,
                 tensor_parallel: int = 1, dtype: str | None = None, vllm: str | Path | None = None, banned_ids=()):
        self.server = VllmServer(hf_dir, max_num_seqs=max_batch, max_model_len=max_len,
                                 tensor_parallel=tensor_parallel, dtype=dtype, vllm=vllm)
        super().__init__(VllmUpstream(self.server), max_len=max_len, max_batch=max_batch, max_queue=max_queue,
                         banned_ids=banned_ids)
