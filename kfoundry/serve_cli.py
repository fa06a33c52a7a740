"""`kfoundry serve --model CKPT`: the OpenAI-compatible API and the web chat page on uvicorn.

This command sits above the packages it composes, not inside `serve/`: with `--engine llama.cpp` (no `--gguf`) or
`--engine vllm` (no `--hf-dir`) it first exports the checkpoint with `export/` and then serves the export with
`serve/`, and those two consumers of a checkpoint do not import each other (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from kfoundry.checkpoint import load_config, load_tokenizer
from kfoundry.errors import ConfigError, MissingPathError
from kfoundry.export.gguf import export_gguf
from kfoundry.export.hf import export_hf
from kfoundry.extras import require
from kfoundry.serve.engines import ENGINES
from kfoundry.serve.hosts import LOOPBACK_NAMES, is_loopback

KEY_ENV = "KFOUNDRY_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible API and a web chat page")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", type=Path, default=None,
                   help="require 'Authorization: Bearer KEY' on /v1, KEY being this file's first line")
    p.add_argument("--api-key", default=None,
                   help=f"the key itself (visible to anyone who can run `ps`; prefer ${KEY_ENV} or --api-key-file). "
                        f"Default: ${KEY_ENV}; none = open")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept this name in the Host header (loopback servers accept only localhost, "
                        "127.0.0.1 and ::1, against DNS rebinding; a public server given --allow-host accepts only "
                        "the names given)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together in one forward pass")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get HTTP 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--max-connections", type=int, default=512, help="open connections; one more gets 503")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds for a request's headers to arrive")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds for a request's body to arrive")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="on SIGTERM, seconds requests in flight may take before they are answered 503")
    p.add_argument("--model-name", default=None, help="name in /v1/models (default: the checkpoint folder's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only matrices (CPU serving)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (torch.set_num_threads; default: torch's choice)")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="what runs the model behind our API: torch (ours), llama.cpp (its llama-server on a GGUF) "
                        "or vllm (vLLM's OpenAI server on the Hugging Face export; GPU)")
    p.add_argument("--gguf", default=None, help="llama.cpp: serve this GGUF export of --model instead of exporting")
    p.add_argument("--gguf-type", choices=["f32", "f16", "q8_0", "q4_0"], default="f32",
                   help="llama.cpp: storage type when exporting --model (default f32: the checkpoint's own weights)")
    p.add_argument("--llama-server", default=None,
                   help="llama.cpp: the llama-server binary (default: $KFOUNDRY_LLAMA_SERVER, beside python, PATH)")
    p.add_argument("--vllm", default=None,
                   help="vllm: the `vllm` executable (default: $KFOUNDRY_VLLM, the vllm package in this Python, PATH)")
    p.add_argument("--hf-dir", default=None, help="vllm: serve this Hugging Face export of --model instead of exporting")
    p.add_argument("--tensor-parallel", type=int, default=1, help="vllm: GPUs one model is split over")
    p.add_argument("--vllm-dtype", default=None,
                   help="vllm: its --dtype (default: vLLM's auto, float16 for our float32 exports; float32 for parity)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)


def api_key(args) -> str | None:
    """The key from --api-key-file, --api-key or $KFOUNDRY_API_KEY (in that order); None when none is set."""
    if args.api_key_file is not None:
        if not args.api_key_file.is_file():
            raise MissingPathError(f"--api-key-file: no such file: {args.api_key_file}")
        lines = args.api_key_file.read_text(encoding="utf-8").splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file}: the first line is empty")
        return key
    return args.api_key or os.environ.get(KEY_ENV) or None


def allowed_hosts(host: str, extra: list[str]) -> tuple[str, ...] | None:
    """Names accepted in the Host header: loopback names on a loopback server (plus --allow-host), only
    --allow-host names on a public one, and any name on a public one without --allow-host."""
    if is_loopback(host):
        return (*LOOPBACK_NAMES, *extra)
    return tuple(extra) or None


def _serve(args) -> int:
    require("serve", "kfoundry serve")
    from kfoundry.serve.app import ServeConfig  # the [serve] extra (FastAPI, uvicorn)
    from kfoundry.serve.server import serve

    path = Path(args.model)
    if not path.is_dir():
        raise MissingPathError(f"checkpoint directory not found: {path}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    for name, value in (("--max-batch", args.max_batch), ("--timeout", args.timeout), ("--threads", args.threads or 1),
                        ("--max-connections", args.max_connections), ("--header-timeout", args.header_timeout),
                        ("--body-timeout", args.body_timeout)):
        if value <= 0:
            raise ConfigError(f"{name} must be positive")
    if args.shutdown_grace < 0:
        raise ConfigError("--shutdown-grace must be >= 0")
    if args.api_key is not None:
        print(f"kfoundry serve: warning: --api-key is visible in the process list; prefer ${KEY_ENV} or "
              "--api-key-file", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ServeConfig(model_name=args.model_name or path.resolve().name, api_key=api_key(args),
                      request_timeout=args.timeout, max_tokens=args.max_tokens,
                      default_max_tokens=args.default_max_tokens,
                      allowed_hosts=allowed_hosts(args.host, args.allow_host),
                      max_connections=args.max_connections, header_timeout=args.header_timeout,
                      body_timeout=args.body_timeout, shutdown_grace=args.shutdown_grace)
    workdir = tempfile.TemporaryDirectory(prefix="kfoundry-serve-")
    app, scheduler = engine_app(path, cfg, Path(workdir.name), engine=args.engine, max_batch=args.max_batch,
                                max_queue=args.max_queue, device=args.device, quantize=args.quantize,
                                threads=args.threads, gguf=args.gguf, gguf_type=args.gguf_type,
                                llama_server=args.llama_server, hf_dir=args.hf_dir, vllm=args.vllm,
                                tensor_parallel=args.tensor_parallel, vllm_dtype=args.vllm_dtype)
    if cfg.api_key is None and not is_loopback(args.host):
        print(f"kfoundry serve: warning: listening on {args.host} without an API key", file=sys.stderr)
    print(f"kfoundry serve: {cfg.model_name} on {args.engine} (context {scheduler.max_len}, batch {args.max_batch}) on "
          f"http://{args.host}:{args.port}/  (API: /v1)", file=sys.stderr, flush=True)
    try:
        serve(app, args.host, args.port, log_level=args.log_level)
    finally:
        scheduler.stop()
        workdir.cleanup()
    return 0


def engine_app(path: Path, cfg, workdir: Path, *, engine: str = "torch", max_batch: int = 8, max_queue: int = 64,
               device: str = "cpu", quantize: str | None = None, threads: int | None = None, gguf=None,
               gguf_type: str = "f32", llama_server=None, hf_dir=None, vllm=None, tensor_parallel: int = 1,
               vllm_dtype: str | None = None):
    """The app over `engine` for checkpoint `path`, and the started engine (the caller stops it). llama.cpp
    exports the checkpoint to GGUF in `workdir` unless `gguf` names an export; vLLM exports it to Hugging Face
    unless `hf_dir` names one. A missing binary or package fails in one line before any export."""
    from kfoundry.serve.app import app_from_checkpoint, create_app  # the [serve] extra (FastAPI)

    if engine == "torch":
        return app_from_checkpoint(path, cfg, device=device, max_batch=max_batch, max_queue=max_queue,
                                   quantize=quantize)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r} (choose from {', '.join(ENGINES)})")
    if quantize:
        raise ConfigError(f"--quantize is for the torch engine; {engine} has its own quantized formats")
    tokenizer, model_cfg = load_tokenizer(path), load_config(path)
    common = {"max_len": model_cfg.max_seq_len, "max_batch": max_batch, "max_queue": max_queue,
              "banned_ids": range(tokenizer.vocab_size, model_cfg.vocab_size)}
    if engine == "llama.cpp":
        from kfoundry.serve.engines.llama_cpp import LlamaCppEngine
        from kfoundry.serve.engines.llama_server import find_llama_server

        binary = find_llama_server(llama_server)  # before a possibly long export: fail fast without a binary
        if gguf is None:
            gguf = export_gguf(path, workdir / f"model-{gguf_type}.gguf", out_type=gguf_type).path
        elif not Path(gguf).is_file():
            raise MissingPathError(f"GGUF file not found: {gguf}")
        server = LlamaCppEngine(gguf, threads=threads, binary=binary, **common)
    else:
        from kfoundry.serve.engines.vllm import VllmEngine, find_vllm

        find_vllm(vllm)  # before a possibly long export: fail fast, in one line, without vLLM
        if hf_dir is None:
            hf_dir = export_hf(path, workdir / "hf")
        elif not (Path(hf_dir) / "config.json").is_file():
            raise MissingPathError(f"--hf-dir: not a Hugging Face export (no config.json): {hf_dir}")
        server = VllmEngine(hf_dir, tensor_parallel=tensor_parallel, dtype=vllm_dtype, vllm=vllm, **common)
    return create_app(server.start(), tokenizer, cfg), server
