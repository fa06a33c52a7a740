"""Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

The peak is never assumed. CUDA cards are looked up by name in a table of published dense (no sparsity)
bf16 and fp16 tensor-core peaks with fp32 accumulation (a card missing from the table has no MFU, only
tokens/s); a CPU's peak is *measured* with a large fp32 matmul and cached, because CPU peaks vary with the
core count, vector units, clocks and thread settings of the machine at hand.

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

# Dense (no sparsity) tensor-core peak FLOP/s with fp32 accumulation, which is what PyTorch's bf16/fp16 matmuls
# use, from the vendors' datasheets and architecture whitepapers: (bf16, fp16). SXM parts unless named.
# bf16 is None where the card has no bf16 tensor cores (Volta, Turing): train those in fp16 with a gradient
# scaler, or in fp32; bf16 autocast there runs emulated at a fraction of the fp16 rate, and no bf16 peak exists to
# measure it against. GeForce cards accumulate in fp32 at half their fp16-accumulate rate, so their figures here
# are half the headline "Tensor TFLOPS" (RTX 3090: 71 dense with fp32 accumulate, 142 with fp16 accumulate; its
# 35.6 TFLOPS is the fp32 shader / TF32 tensor rate). Keys are matched as substrings of the device name.
CUDA_PEAK: dict[str, tuple[float | None, float]] = {
    "B200": (2250e12, 2250e12),
    "H200 NVL": (835e12, 835e12),
    "H200": (989e12, 989e12),
    "H100 SXM": (989e12, 989e12),
    "H100 NVL": (835e12, 835e12),
    "H100 PCIe": (756e12, 756e12),
    "H100": (989e12, 989e12),  # "NVIDIA H100 80GB HBM3" is the SXM part
    "H800": (989e12, 989e12),
    "GH200": (989e12, 989e12),
    "A100": (312e12, 312e12),
    "A800": (312e12, 312e12),
    "A10G": (70e12, 70e12),
    "A10": (125e12, 125e12),
    "L40S": (362e12, 362e12),
    "L40": (181e12, 181e12),
    "L4": (121e12, 121e12),
    "RTX A6000": (154.8e12, 154.8e12),
    "RTX 5090": (209.5e12, 209.5e12),
    "RTX 4090": (165.2e12, 165.2e12),
    "RTX 3090": (71e12, 71e12),
    "V100": (None, 125e12),  # SXM2; no bf16
    "T4": (None, 65e12),  # no bf16
}
CUDA_PEAK_BF16 = {k: bf16 for k, (bf16, _) in CUDA_PEAK.items() if bf16}  # the common case, for readers


def cuda_peak_flops(name: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of the card called `name` for matmuls in `dtype` (bf16 or fp16), or None when the table has no
    such figure (an unknown card, bf16 on a card without bf16 tensor cores, or fp32). The longest table key
    contained in the device name wins, so 'NVIDIA H100 PCIe' beats plain 'H100'."""
    column = {torch.bfloat16: 0, torch.float16: 1}.get(dtype)
    if column is None:
        return None
    for key in sorted(CUDA_PEAK, key=len, reverse=True):
        if key.lower() in name.lower():
            return CUDA_PEAK[key][column]
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


def describe_cuda_peak(name: str, dtype: torch.dtype = torch.bfloat16) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it came from or why there is none) for the card called `name`."""
    what = str(dtype).removeprefix("torch.")
    peak = cuda_peak_flops(name, dtype)
    if peak:
        return peak, f"{name} (datasheet {what}, dense, fp32 accumulate)"
    if dtype == torch.bfloat16 and cuda_peak_flops(name, torch.float16):
        return None, f"{name} (no bf16 tensor cores: train in fp16 with a gradient scaler, or fp32; MFU not reported)"
    return None, f"{name} (no {what} peak in the table: MFU not reported)"


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float | None, str]:
    """(peak FLOP/s or None if unknown, a description of where it came from) for training in `dtype` on `device`.

    None is a normal answer (a card missing from the table, or bf16 on a card without it): MFU is then not
    reported, and tokens/s still is."""
    if device.type == "cuda":
        return describe_cuda_peak(torch.cuda.get_device_name(device), dtype)
    return cpu_peak_flops(), f"CPU fp32 matmul probe, {torch.get_num_threads()} threads"
