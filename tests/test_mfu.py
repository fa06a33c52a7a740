"""MFU is never above 100% because of a stale CPU peak: the cache keeps the best probe ever measured for a key,
and a run that beats the cached peak re-probes it. Every test points the cache at tmp_path (KFOUNDRY_CACHE)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from kfoundry.train import mfu as M

CPU = torch.device("cpu")
OTHER_KEY = "some-other-cpu|threads=3|torch=0.0"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KFOUNDRY_CACHE", str(tmp_path))
    return tmp_path / "cpu_peak.json"


def seed(cache, peak: float, threads: range | None = None) -> None:
    """A cache holding `peak` for this machine (at the current thread count, or at each of `threads`), as if it
    had been probed while the machine was busy, plus an unrelated machine's entry."""
    key = M.cpu_peak_key()
    keys = [key] if threads is None else [re.sub(r"threads=\d+", f"threads={n}", key) for n in threads]
    cache.write_text(json.dumps({**{k: peak for k in keys}, OTHER_KEY: 5.0}))


def stored(cache) -> dict[str, float]:
    return json.loads(cache.read_text())


def test_cache_keeps_the_highest_probe(cache, monkeypatch):
    probes = iter([3e9, 2e9, 4e9])
    monkeypatch.setattr(M, "measure_cpu_peak", lambda: next(probes))
    assert M.cpu_peak_flops() == 3e9  # first probe, cached
    assert M.cpu_peak_flops() == 3e9  # read from the cache, not measured again
    assert M.cpu_peak_flops(refresh=True) == 3e9  # a probe on a busy machine (2e9) does not lower it
    assert stored(cache)[M.cpu_peak_key()] == 3e9
    assert M.cpu_peak_flops(refresh=True) == 4e9  # a better one raises it
    assert stored(cache)[M.cpu_peak_key()] == 4e9


def test_a_stale_low_peak_is_reprobed_and_corrected(cache):
    seed(cache, 1e6)  # far below any CPU's fp32 matmul rate
    peak, source = M.peak_flops(CPU)
    assert peak == 1e6 and "probe" in source
    achieved = 5e8  # more than the cached peak: the cached figure is provably too low
    assert achieved / peak > 1  # what the old code reported as MFU
    mfu, new_peak = M.checked_mfu(achieved, peak, CPU)
    assert new_peak > achieved and mfu == pytest.approx(achieved / new_peak) and 0 < mfu <= 1
    assert stored(cache)[M.cpu_peak_key()] == new_peak  # the next run starts from the corrected figure
    assert stored(cache)[OTHER_KEY] == 5.0  # other machines' entries survive the rewrite
    assert M.peak_flops(CPU)[0] == new_peak
    # torchrun: the peak covers every rank, so the re-probed per-rank figure is scaled by the world size
    seed(cache, 1e6)
    mfu2, peak2 = M.checked_mfu(2 * achieved, 2e6, CPU, world_size=2)
    assert peak2 == pytest.approx(2 * stored(cache)[M.cpu_peak_key()]) and 0 < mfu2 <= 1


def test_mfu_is_unknown_when_no_probe_bounds_the_run(cache, monkeypatch):
    seed(cache, 1e9)
    monkeypatch.setattr(M, "measure_cpu_peak", lambda: 2e9)
    assert M.checked_mfu(1e9, 4e9, CPU) == (0.25, 4e9)  # within the peak: no probe, nothing changes
    mfu, peak = M.checked_mfu(3e9, 1e9, CPU)  # re-probed at 2e9: 150% of it would still be reported
    assert (mfu, peak) == (None, None)  # so MFU is unknown, and the caller stops re-probing (no peak left)
    assert stored(cache)[M.cpu_peak_key()] == 2e9  # the better probe is still kept
    assert M.checked_mfu(3e9, None, CPU) == (None, None) and M.checked_mfu(None, 1e9, CPU) == (None, 1e9)
    # a datasheet peak cannot be re-measured: exceeding it gives no MFU, and the table figure stands
    cuda = torch.device("cuda")
    assert M.checked_mfu(2e15, 989e12, cuda) == (None, 989e12)
    assert M.checked_mfu(494.5e12, 989e12, cuda) == (0.5, 989e12)


def test_a_probe_leaves_the_global_random_stream_alone():
    """A re-probe can happen in the middle of a run, whose random state is checkpointed for exact resume."""
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    assert M.measure_cpu_peak(n=64, seconds=0.01) > 0
    assert torch.equal(torch.rand(4), expected)


def test_pretraining_never_reports_mfu_above_one_with_a_stale_probe(cache, micro_data, tmp_path):
    from kfoundry.config import resolve
    from kfoundry.train import loop

    seed(cache, 1.0, threads=range(1, 257))  # whatever thread count the run uses, its cached peak is 1 FLOP/s
    tok_dir, shards = micro_data
    cfg = resolve("test-micro", overrides=["train.max_steps=6", "train.log_every=3", "train.eval_every=6",
                                           "train.ckpt_every=6"])
    summary = loop.pretrain(cfg, tmp_path / "run", shard_dir=shards, tokenizer_dir=tok_dir, progress=False,
                            log=lambda m: None)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in logged if "mfu" in r and r.get("event") != "end"]
    assert len(mfus) == 2 and all(m is not None and 0 < m <= 1 for m in mfus), mfus
    assert summary["mfu"] is not None and 0 < summary["mfu"] <= 1
    assert summary["peak_flops"] > 1e6  # the re-probed peak, not the stale one
    assert stored(cache)[M.cpu_peak_key()] == summary["peak_flops"]
