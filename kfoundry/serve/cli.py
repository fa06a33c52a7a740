"""`kfoundry serve --model CKPT`: the OpenAI-compatible API and the web chat page on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint: OpenAI-compatible API and a web chat page")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KFOUNDRY_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $KFOUNDRY_API_KEY; none = open)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together in one forward pass")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait; more get HTTP 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take, queueing included")
    p.add_argument("--max-tokens", type=int, default=None, help="largest max_tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request gives none")
    p.add_argument("--model-name", default=None, help="name in /v1/models (default: the checkpoint folder's name)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only matrices (CPU serving)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for the model (torch.set_num_threads; default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    import uvicorn

    from kfoundry.serve.app import ServeConfig, app_from_checkpoint

    path = Path(args.model)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    for name, value in (("--max-batch", args.max_batch), ("--timeout", args.timeout), ("--threads", args.threads or 1)):
        if value <= 0:
            raise ValueError(f"{name} must be positive")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = ServeConfig(model_name=args.model_name or path.resolve().name, api_key=args.api_key or None,
                      request_timeout=args.timeout, max_tokens=args.max_tokens,
                      default_max_tokens=args.default_max_tokens)
    app, scheduler = app_from_checkpoint(path, cfg, device=args.device, max_batch=args.max_batch,
                                         max_queue=args.max_queue, quantize=args.quantize)
    if cfg.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"kfoundry serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"kfoundry serve: {cfg.model_name} (context {scheduler.max_len}, batch {args.max_batch}) on "
          f"http://{args.host}:{args.port}/  (API: /v1)", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    finally:
        scheduler.stop()
    return 0
