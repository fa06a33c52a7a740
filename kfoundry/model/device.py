"""Which device a command runs on: one rule for training, evaluation, generation and serving.

- `auto` (or nothing): the GPU when PyTorch sees one (CUDA), else the CPU. Apple's MPS is never chosen by
  itself (some of the kernels the model uses are missing there); name it to use it.
- A named device (`cpu`, `cuda`, `cuda:1`, `mps`, ...) is used as given when this machine has that kind. When it
  does not, the command runs on the CPU with a warning instead of failing: lm-eval's command line asks for
  `cuda:0` by default, and a recipe written for a GPU should still run (slowly) on a laptop.
- A string PyTorch does not know as a device is a configuration error, said in one line.

Under `torchrun` each process then takes its own GPU (`cuda:LOCAL_RANK`): see `kfoundry.train.distributed`.
"""

from __future__ import annotations

import logging

import torch

from kfoundry.errors import ConfigError

log = logging.getLogger(__name__)


def available(kind: str) -> bool:
    """Whether this machine can run tensors of device type `kind` (`cpu`, `cuda`, `mps`, `xpu`, ...)."""
    if kind == "cpu":
        return True
    if kind == "mps":
        return torch.backends.mps.is_available()
    backend = getattr(torch, kind, None)
    return bool(getattr(backend, "is_available", lambda: False)())


def pick_device(preference: str | torch.device | None = "auto") -> torch.device:
    """The device to run on for a preference (see the module docstring for the rule)."""
    if preference is None or str(preference) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {str(preference)!r} (use auto, cpu, cuda, cuda:N or mps)") from e
    if not available(device.type):
        log.warning("device %s requested but this machine has no %s; using the CPU", preference, device.type)
        return torch.device("cpu")
    return device
