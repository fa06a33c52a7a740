"""Find and run llama.cpp's `llama-server` as a child process on a loopback port.

The binary is not on PyPI; `scripts/build_llama_server.sh` builds it with cmake from the llama.cpp source that
the llama-cpp-python sdist carries (the version the test extra pins) and installs it next to the venv's
python. `find_llama_server` looks, in order, at an explicit path, `$KFOUNDRY_LLAMA_SERVER`, the directory of
the running python (the venv's bin/), and `PATH`.

`LlamaServer` starts it with `--parallel` slots (continuous batching is on by default in llama-server) and a
context of `slots x ctx` positions, so each slot holds one full-length sequence; waits for its /health to say
the model is loaded; and stops it (SIGTERM, then SIGKILL) when closed. Its log goes to a file whose tail is
quoted when it fails to start.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx

BUILD_HINT = "build it with scripts/build_llama_server.sh (or pass --llama-server PATH / set KFOUNDRY_LLAMA_SERVER)"


def find_llama_server(explicit: str | Path | None = None) -> Path:
    """The `llama-server` binary to run; FileNotFoundError (one line, with the build command) if there is none."""
    if explicit:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FileNotFoundError(f"llama-server binary not found or not executable: {path}")
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
    raise FileNotFoundError(f"llama.cpp's llama-server was not found; {BUILD_HINT}")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a killed `kfoundry serve`
    never leaves a llama-server behind holding the model and a port (PR_SET_PDEATHSIG = 1)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`with LlamaServer(gguf, slots=8, ctx=1024) as srv: ... srv.url ...` runs llama-server until the block ends."""

    def __init__(self, gguf: str | Path, *, slots: int, ctx: int, threads: int | None = None,
                 binary: str | Path | None = None, extra_args: list[str] | None = None, start_timeout: float = 120):
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.gguf}")
        self.binary = find_llama_server(binary)
        self.slots, self.ctx, self.threads = slots, ctx, threads
        self.extra_args = list(extra_args or [])
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._logdir = tempfile.TemporaryDirectory(prefix="kfoundry-llama-server-")
        self.log_path = Path(self._logdir.name) / "llama-server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [str(self.binary), "--model", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "--parallel", str(self.slots), "--ctx-size", str(self.slots * self.ctx),
               "--no-kv-unified",  # a fixed ctx per slot: what our front checks prompts against
               "--no-webui", "--no-warmup", "--alias", "kfoundry"]
        if self.threads:
            cmd += ["--threads", str(self.threads), "--threads-batch", str(self.threads)]
        return cmd + self.extra_args

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> Self:
        self.port = free_port()
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:  # 503 while the model loads, 200 when it is ready
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"llama-server not ready after {self.start_timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def close(self) -> None:
        self.stop()
        self._logdir.cleanup()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
