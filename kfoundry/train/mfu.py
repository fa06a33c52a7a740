"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak is never assumed. CUDA cards are looked up by name in a table of published dense (no sparsity)
bf16 tensor-core peaks; a CPU's peak is *measured* with a large fp32 matmul and cached, because CPU
peaks vary with the core count, vector units, clocks and thread settings of the machine at hand.

A probe can only read low (a busy machine slows it down, nothing speeds it up), so the cache keeps the best
probe ever measured for a key, and `checked_mfu` re-probes when a run proves the cached figure too low: MFU
is never reported above 100%.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from kfoundry.fileio import atomic_write_text

# Dense bf16 tensor-core peak FLOP/s from the vendors' datasheets (SXM parts unless named).
CUDA_PEAK_BF16 = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "A10G": 70e12,
    "A10": 125e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 (no bf16 tensor cores)
    "T4": 65e12,  # fp16
}


def cuda_peak_flops(name: str) -> float | None:
    """Longest table key contained in the device name, so 'NVIDIA H100 PCIe' beats plain 'H100'."""
    for key in sorted(CUDA_PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return CUDA_PEAK_BF16[key]
    return None


def _cache_file() -> Path:
    base = Path(os.environ.get("KFOUNDRY_CACHE", Path.home() / ".cache" / "kfoundry"))
    return base / "cpu_peak.json"


def cpu_peak_key() -> str:
    """What a CPU probe depends on: the processor, the thread count and the torch build."""
    return f"{platform.processor() or platform.machine()}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def measure_cpu_peak(n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matmul FLOP/s on this CPU with the current thread count (best of repeated n x n products)."""
    gen = torch.Generator().manual_seed(0)  # not the global generator: a probe mid-run must not shift training
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    torch.mm(a, b)  # warm up (thread pool, caches)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def _read_cache(path: Path) -> dict[str, float]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or half-written by an older kfoundry: start afresh
        return {}
    if not isinstance(cache, dict):
        return {}
    return {k: float(v) for k, v in cache.items() if isinstance(v, (int, float)) and v > 0}


def _store_probe(key: str, probe: float) -> float:
    """Fold `probe` into the cache and return the highest figure now known for `key`.

    A probe is a lower bound on the peak: other processes (or the other ranks of a `torchrun` job, all probing
    at once) can only slow it down, never speed it up. So the cache keeps the best probe ever seen, and the file
    is re-read just before the write, so that ranks writing at the same time keep each other's best figures.
    """
    path = _cache_file()
    cache = _read_cache(path)
    best = max(probe, cache.get(key, 0.0))
    if best > cache.get(key, 0.0):
        cache[key] = best
        try:
            atomic_write_text(path, json.dumps(cache, indent=2))
        except OSError:
            pass  # a read-only home is fine: we simply measure again next time
    return best


def cpu_peak_flops(refresh: bool = False) -> float:
    """This CPU's fp32 matmul peak at the current thread count: the best probe cached for it, or a new probe.

    refresh=True probes again even when a figure is cached; the cache still keeps (and this returns) the higher
    of the two, because a low probe only means the machine was busy while it ran.
    """
    key = cpu_peak_key()
    cached = _read_cache(_cache_file()).get(key)
    if cached and not refresh:
        return cached
    return _store_probe(key, measure_cpu_peak())


def checked_mfu(achieved: float | None, peak: float | None, device: torch.device,
                world_size: int = 1) -> tuple[float | None, float | None]:
    """(MFU, peak) for `achieved` training FLOP/s against `peak` (FLOP/s of all `world_size` ranks together).

    MFU is a share of the peak, so a figure above 1 proves the peak wrong, and is never returned:

    - On a CPU the peak is a probe, and a probe taken while the machine was busy reads low. When `achieved`
      exceeds it, the CPU is probed again, the cache keeps the higher figure (`cpu_peak_flops(refresh=True)`),
      and the returned peak is world_size x that figure (or the old peak, if higher). If the run still beats
      every probe (e.g. it ran in a faster dtype than the fp32 probe), no peak we measured bounds it: the
      result is (None, None), "unknown", which also keeps later calls in the same run from probing again.
    - A datasheet peak (CUDA) cannot be re-measured: MFU is None when it is exceeded, and the peak is kept.

    Returns (None, peak) when there is no peak or no achieved figure. Callers should keep the returned peak
    and pass it to the next call, so a corrected peak is used from then on.
    """
    if not peak or achieved is None:
        return None, peak
    if achieved > peak and device.type == "cpu":
        peak = max(peak, world_size * cpu_peak_flops(refresh=True))
        if achieved > peak:
            return None, None
    if achieved > peak:
        return None, peak
    return achieved / peak, peak


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s or None if unknown, a description of where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cuda_peak_flops(name)
        return peak, f"{name} (datasheet bf16)" if peak else f"{name} (not in the peak table)"
    return cpu_peak_flops(), f"CPU fp32 matmul probe, {torch.get_num_threads()} threads"
