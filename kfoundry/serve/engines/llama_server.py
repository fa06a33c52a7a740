"""Find and run llama.cpp's `llama-server` as a child process on a loopback port.

The binary is not on PyPI; `scripts/build_llama_server.sh` builds it with cmake from the llama.cpp source that
the llama-cpp-python sdist carries (the version the test extra pins) and installs it next to the venv's
python. `find_llama_server` looks, in order, at an explicit path, `$KFOUNDRY_LLAMA_SERVER`, the directory of
the running python (the venv's bin/), and `PATH`.

`LlamaServer` runs it (process.py: a loopback port, /health, a log, stopped with its parent) with `--parallel`
slots (continuous batching is on by default in llama-server) and a context of `slots x ctx` positions, so each
slot holds one full-length sequence.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from kfoundry.errors import MissingPathError
from kfoundry.serve.engines.process import ServerProcess, free_port

__all__ = ["BUILD_HINT", "LlamaServer", "find_llama_server", "free_port"]

BUILD_HINT = "build it with scripts/build_llama_server.sh (or pass --llama-server PATH / set KFOUNDRY_LLAMA_SERVER)"


def find_llama_server(explicit: str | Path | None = None) -> Path:
    """The `llama-server` binary to run; FileNotFoundError (one line, with the build command) if there is none."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise MissingPathError(f"llama-server binary not found or not executable: {path}")
        return path
    env = os.environ.get("KFOUNDRY_LLAMA_SERVER")
    if env:
        return find_llama_server(env)
    beside = Path(sys.executable).parent / "llama-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    raise MissingPathError(f"llama.cpp's llama-server was not found; {BUILD_HINT}")


class LlamaServer(ServerProcess):
    """`with LlamaServer(gguf, slots=8, ctx=1024) as srv: ... srv.url ...` runs llama-server until the block ends."""

    name = "llama-server"

    def __init__(self, gguf: str | Path, *, slots: int, ctx: int, threads: int | None = None,
                 binary: str | Path | None = None, extra_args: list[str] | None = None, start_timeout: float = 120):
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise MissingPathError(f"GGUF file not found: {self.gguf}")
        self.binary = find_llama_server(binary)
        self.slots, self.ctx, self.threads = slots, ctx, threads
        self.extra_args = list(extra_args or [])
        super().__init__(start_timeout)

    def command(self) -> list[str]:
        cmd = [str(self.binary), "--model", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "--parallel", str(self.slots), "--ctx-size", str(self.slots * self.ctx),
               "--no-kv-unified",  # a fixed ctx per slot: what our front checks prompts against
               "--no-webui", "--no-warmup", "--alias", "kfoundry"]
        if self.threads:
            cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        return cmd + self.extra_args
