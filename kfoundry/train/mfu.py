"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak is never assumed. CUDA cards are looked up by name in a table of published dense (no sparsity)
bf16 tensor-core peaks; a CPU's peak is *measured* once with a large fp32 matmul and cached, because CPU
peaks vary with the core count, vector units, clocks and thread settings of the machine at hand.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

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


def measure_cpu_peak(n: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matmul FLOP/s on this CPU with the current thread count (best of repeated n x n products)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm up (thread pool, caches)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def cpu_peak_flops(refresh: bool = False) -> float:
    key = f"{platform.processor() or platform.machine()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = _cache_file()
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except json.JSONDecodeError:
            cache = {}
    if not refresh and key in cache:
        return float(cache[key])
    peak = measure_cpu_peak()
    cache[key] = peak
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=2))
    except OSError:
        pass  # a read-only home is fine: we simply measure again next time
    return peak


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s or None if unknown, a description of where it came from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cuda_peak_flops(name)
        return peak, f"{name} (datasheet bf16)" if peak else f"{name} (not in the peak table)"
    return cpu_peak_flops(), f"CPU fp32 matmul probe, {torch.get_num_threads()} threads"
