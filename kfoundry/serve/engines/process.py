"""An upstream server as a child process on a loopback port: start, wait until healthy, log, stop.

`ServerProcess` is what llama-server (llama_server.py) and vLLM's OpenAI server (vllm.py) share; each says
only which command to run (`command()`). `start()` picks a free port, runs the command with its output in a
log file, and polls `GET /health` until it answers 200 (both servers answer 503 or refuse connections while
the model loads); a process that exits or is not ready in time raises with the tail of its log. The child
gets SIGTERM when its parent dies (Linux), so a killed `kfoundry serve` never leaves an upstream behind
holding the model, the GPU or a port. `stop()` sends SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies (PR_SET_PDEATHSIG = 1)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with Sub(...) as srv: ... srv.url ...` runs `Sub.command()` until the block ends (see the module docstring)."""

    name = "server"

    def __init__(self, start_timeout: float = 120):
        self.start_timeout = start_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self._logdir = tempfile.TemporaryDirectory(prefix=f"kfoundry-{self.name}-")
        self.log_path = Path(self._logdir.name) / f"{self.name}.log"

    def command(self) -> list[str]:
        """The command line that serves on 127.0.0.1:`self.port`."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {self.start_timeout:g}s:\n{self.log_tail()}")
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
