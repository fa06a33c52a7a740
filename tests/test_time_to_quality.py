"""bench/time_to_quality.py, run small: the baseline sweep keeps the rate the tuning text prefers, our branches
are charged exactly their tokens and FLOPs (Newton-Schulz included), the ratios are ours / baseline at the first
branch that reaches the baseline's held-out quality, and the cache gives back what a separate process computed.

The benchmark's figures come from its own runs (docs/benchmarks.md); this only keeps its arithmetic honest."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

from conftest import torch_threads
from kfoundry.config import preset
from kfoundry.data.loader import PackedLoader
from kfoundry.tokenizer import KTokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("한국어 문장과 English words, 숫자 2026년 12월 6일, 이모지 🙂🚀. 모델은 처음부터 학습합니다.\n"
        "서울에서 부산까지 KTX로 2시간 30분 걸립니다. The quick brown fox jumps over the lazy dog.\n") * 12


@pytest.fixture(scope="module")
def ttq():
    spec = importlib.util.spec_from_file_location("time_to_quality", ROOT / "bench" / "time_to_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    module.SIZES["tiny"] = dataclasses.asdict(preset("cpu-tiny").model)
    return module


@pytest.fixture(scope="module")
def data(ttq, micro_data, tmp_path_factory):
    tok_dir, shards = micro_data
    tok = KTokenizer.load(tok_dir)
    seq = preset("cpu-tiny").train.seq_len
    text = tmp_path_factory.mktemp("ttq") / "eval.txt"
    text.write_text(TEXT, encoding="utf-8")
    x, y = next(iter(PackedLoader(shards, split="val", batch_size=4, seq_len=seq, loop=False)))
    return {"shards": shards, "device": torch.device("cpu"), "token_bytes": torch.tensor(tok.token_bytes()),
            "eval": ttq.text_windows(text, tok, seq, 1024), "tune": ttq.text_windows(text, tok, seq, 768),
            "val": torch.cat([x, y[:, -1:]], dim=1), "key": ["test", tok.hash], "tok": tok, "text": text}


def test_text_windows_read_nfd_as_nfc(ttq, data, tmp_path):
    nfd = tmp_path / "nfd.txt"
    nfd.write_text(unicodedata.normalize("NFD", TEXT), encoding="utf-8")
    seq = preset("cpu-tiny").train.seq_len
    assert torch.equal(ttq.text_windows(nfd, data["tok"], seq, 1024), data["eval"])
    assert data["eval"].shape[1] == seq + 1
    short = tmp_path / "short.txt"
    short.write_text("짧은 글\n", encoding="utf-8")
    with pytest.raises(ValueError, match="too short"):
        ttq.text_windows(short, data["tok"], seq, 1024)


def test_a_small_comparison_adds_up_and_the_cache_returns_it(ttq, data, tmp_path):
    budget = 8 * 256 * 6  # 6 steps of the tiny shape for each side
    run = lambda: ttq.run_size("tiny", 1, budget, [3e-3, 1e-2], [0.5, 1.0], data, lambda m: None, [],  # noqa: E731
                               tmp_path / "cache")
    with torch_threads(1):
        out = run()

    sweep = out["baseline_sweep"]
    assert [s["lr"] for s in sweep] == [3e-3, 1e-2]
    assert out["baseline"] == min(sweep, key=lambda s: s["tune_bpb"]) and out["target_eval_bpb"] == out["baseline"]["eval_bpb"]
    assert out["baseline_lr_at_edge"] is True  # of two rates, the kept one is always at an edge
    for s in sweep:
        assert s["tokens"] == budget and s["flops"] == pytest.approx(out["flops_per_token"] * budget)
        assert 0 < s["cpu_seconds"] and all(math.isfinite(s[k]) and s[k] > 0 for k in ("tune_bpb", "eval_bpb", "val_bpb"))

    # Ours: a branch per fraction, each charged its own tokens and Newton-Schulz FLOPs; the full one is scored on val.
    assert out["muon_flops_per_step"] > 0
    half, full = out["ours_branches"]
    assert (half["fraction"], half["steps"], half["tokens"]) == (0.5, 3, budget // 2)
    assert (full["fraction"], full["steps"], full["tokens"]) == (1.0, 6, budget) and "val_bpb" in full
    for b in (half, full):
        assert b["flops"] == pytest.approx(out["flops_per_token"] * b["tokens"] + out["muon_flops_per_step"] * b["steps"])
    assert out["ours_full_budget"] == full

    # The first branch at or under the target is "reached", and the ratios are that branch over the baseline.
    first = next((b for b in out["ours_branches"] if b["eval_bpb"] <= out["target_eval_bpb"]), None)
    assert out["reached"] == first
    if first is not None:
        assert out["ratios"] == ttq.ratios(first, out["baseline"])
    else:
        assert "ratios" not in out
    assert ttq.ratios(half, out["baseline"]) == {k: pytest.approx(half[k] / out["baseline"][k])
                                                for k in ("tokens", "flops", "seconds", "cpu_seconds")}

    # A second call (another process, in real use) finds every run in the cache and computes nothing.
    ttq.CACHED_ONLY = True
    try:
        again = run()
    finally:
        ttq.CACHED_ONLY = False
    assert all(s.get("cached") for s in again["baseline_sweep"] + again["ours_branches"])
    assert [s["eval_bpb"] for s in again["baseline_sweep"]] == [s["eval_bpb"] for s in sweep]
    assert [b["eval_bpb"] for b in again["ours_branches"]] == [b["eval_bpb"] for b in out["ours_branches"]]


def test_a_kept_rate_at_the_edge_of_the_sweep_is_flagged(ttq):
    sweep = [{"lr": lr} for lr in (1e-3, 2e-3, 4e-3)]
    assert not ttq.at_sweep_edge(sweep, sweep[1])
    assert ttq.at_sweep_edge(sweep, sweep[0]) and ttq.at_sweep_edge(sweep, sweep[2])
    assert not ttq.at_sweep_edge(sweep[:1], sweep[0])  # one rate is a cache-filling call, not a sweep
