"""The serving app over either engine, for the tests that run against both (the chat page, schema fuzzing).

`engine_app` is what `kfoundry serve --engine ...` runs (the checkpoint exported to GGUF for llama.cpp).
The llama.cpp side needs the real `llama-server` binary (scripts/build_llama_server.sh): without it these
tests skip with the build command, and in CI (`KFOUNDRY_REQUIRE_SHARED=1`, set by .ci/run) they fail.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest

from kfoundry.serve_cli import engine_app
from kfoundry.serve.engines.llama_server import find_llama_server
from kfoundry.serve.server import BackgroundServer

ENGINES = ["torch", "llama.cpp"]


def llama_server_or_skip() -> Path:
    try:
        return find_llama_server()
    except FileNotFoundError as e:
        if os.environ.get("KFOUNDRY_REQUIRE_SHARED"):
            pytest.fail(str(e))
        pytest.skip(str(e))


@contextlib.contextmanager
def serving(ckpt, cfg, engine: str, *, max_batch: int, max_queue: int):
    """A running BackgroundServer over `engine` (llama-server gets one thread); everything stops at the end."""
    if engine == "llama.cpp":
        llama_server_or_skip()
    with tempfile.TemporaryDirectory(prefix="kfoundry-test-engine-") as work:
        app, eng = engine_app(Path(ckpt), cfg, Path(work), engine=engine, max_batch=max_batch, max_queue=max_queue,
                              threads=1)
        try:
            with BackgroundServer(app) as srv:
                yield srv
        finally:
            eng.stop()
