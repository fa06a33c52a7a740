"""Shared fixtures. `shared_data` points at ../shared/data (or $KFOUNDRY_SHARED_DATA).

Tests that need it skip with a reason when it is absent; `.ci/run` sets KFOUNDRY_REQUIRE_SHARED=1 so that a
missing shared folder fails CI instead of silently skipping.

Tiny models, built once per session and shared by every test file that asks for them:

- `tiny_tokenizer(texts, vocab_size)` and `tiny_checkpoint(texts, vocab_size, **model)`: a BPE tokenizer trained
  on a file's own texts, and a randomly initialised (seed 0) checkpoint of test-micro's shape with it;
- `micro_data`: the test-micro tokenizer and token shards, from the starter corpus;
- `micro_trained`: a test-micro model (context 128) pretrained for 200 steps on `micro_data`.

They are shared, so they are read-only: a test that would write into one copies it first.
`one_thread` pins torch to one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`);
`torch_threads(n)` does so for one block.
Plain helpers for test files (`from conftest import ...`): `MIXED_TEXTS`, `TINY_TEXTS`, `assert_hf_logits_match`,
`decoder_logits` and `assert_greedy_agrees_where_clear`.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The mixed-script sample every text test uses: Korean, English, digits, emoji, and NFD-decomposed Hangul.
MIXED_TEXTS = [
    "대한민국 헌법 제1조 ① 대한민국은 민주공화국이다.",
    "The quick brown fox jumps over the lazy dog.",
    "2026년 11월 29일, 가격은 12,345원 (3.14%)",
    "오늘 기분 최고 😀🎉 Let's go!",
    "\u1112\u1161\u11ab\u1100\u1173\u11af NFD 한글",  # "한글" decomposed into jamo
    "",
]


def shared_data_dir() -> Path:
    return Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))


# Korean, English, digits and emoji, repeated so a tiny BPE has enough to learn from (test_quantize, test_upscale).
TINY_TEXTS = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "The quick brown fox jumps over the lazy dog. Python is a programming language.",
    "In 2026, 12,345 people 😀 visited Seoul; 오늘 날씨 좋네요 🎉",
] * 20


def assert_hf_logits_match(ckpt, hf_dir, tok, texts, atol: float = 1e-5):
    """Our checkpoint and its Hugging Face export give the same logits, text by text (every non-empty text of
    `texts`, and all of them joined)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kfoundry.checkpoint import load_model

    ours = load_model(ckpt).eval()
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    for text in [t for t in texts if t] + [" ".join(texts)]:
        ids = torch.tensor([tok.encode(text, bos=True)])
        with torch.no_grad():
            a, b = ours(ids), hf(ids).logits
        assert torch.allclose(a, b, atol=atol, rtol=0), f"{text!r}: max diff {(a - b).abs().max()}"
    return hf


def decoder_logits(model, prompt: list[int], tokens: list[int], max_new_tokens: int):
    """The logits `generate` computes for a single prompt (SequenceDecoder, sized as generate sizes it) at each
    position of `tokens`, fed in as if the model had chosen them: [len(tokens), V]."""
    import torch

    from kfoundry.model.decode import SequenceDecoder

    with torch.inference_mode():
        dec = SequenceDecoder(model, len(prompt) + max_new_tokens)
        return torch.stack([dec.prefill(prompt)] + [dec.step(t) for t in tokens[:-1]])


def assert_greedy_agrees_where_clear(want_logits, got_logits, want: list[int], got: list[int], *,
                                     min_compared: int) -> float:
    """Greedy tokens `got` of one computation against `want` of a reference, compared only where the choice is
    clear; returns the measured logit error.

    `want_logits[i]` are the logits that chose `want[i]`, `got_logits[i]` the other computation's logits at the
    same prefix. The error is the largest |difference| between the two; where the reference's top-two gap exceeds
    twice it, no such difference can swap the top two, so the tokens must agree on any CPU. A smaller gap is a
    near tie that rounding may swap (int8 by design, float32 by summation order); after a swap the two continue
    different texts and are compared no further. At least `min_compared` positions must be clear: a large error
    leaves few, so a broken computation cannot pass by being compared nowhere.
    """
    assert len(got) == len(want) == len(want_logits) == len(got_logits)
    err = float((got_logits - want_logits).abs().max())
    top2 = want_logits.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).tolist()
    compared = 0
    for i, (w, g) in enumerate(zip(want, got)):
        if gaps[i] > 2 * err:
            assert g == w, f"position {i}: token {g} != {w} with a top-two gap {gaps[i]:.4g} > 2 x error {err:.4g}"
            compared += 1
        elif g != w:
            break
    assert compared >= min_compared, f"only {compared} of {len(want)} positions clear of 2 x error {err:.4g}"
    return err


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        if os.environ.get("KFOUNDRY_REQUIRE_SHARED"):
            pytest.fail(f"shared data required but missing at {path}")
        pytest.skip(f"shared data not found at {path} (set KFOUNDRY_SHARED_DATA)")
    return path


@pytest.fixture
def mixed_texts() -> list[str]:
    return list(MIXED_TEXTS)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch computes on `n` threads inside the block, and on as many as before after it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine, two threads mostly wait for each other."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """tiny_tokenizer(texts, vocab_size) -> a KTokenizer trained on `texts`, once per session per arguments."""
    from kfoundry.tokenizer import train_tokenizer

    built = {}

    def make(texts, vocab_size: int):
        key = (tuple(texts), vocab_size)
        if key not in built:
            built[key] = train_tokenizer(list(texts), vocab_size)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_tokenizer, tmp_path_factory):
    """tiny_checkpoint(texts, vocab_size, **model) -> (checkpoint dir, tokenizer).

    A seed-0 random model of test-micro's shape (dim 64, 2 layers, 4 heads / 2 key-value heads, ffn 128,
    context 64, tied embeddings; `model` overrides any of these) saved with `tiny_tokenizer(texts, vocab_size)`.
    Built once per session per arguments; read-only.
    """
    import dataclasses

    from kfoundry.checkpoint import save_checkpoint
    from kfoundry.config import resolve
    from kfoundry.model.llama import Transformer

    built = {}

    def make(texts, vocab_size: int, **model):
        key = (tuple(texts), vocab_size, tuple(sorted(model.items())))
        if key not in built:
            tok = tiny_tokenizer(texts, vocab_size)
            cfg = dataclasses.replace(resolve("test-micro").model, vocab_size=tok.vocab_size, **model)
            path = save_checkpoint(tmp_path_factory.mktemp("tiny") / "base", Transformer.build(cfg, seed=0), tok)
            built[key] = (path, tok)
        return built[key]

    return make


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory) -> tuple[Path, Path]:
    """(tokenizer dir, shard dir) for the test-micro preset, built from the starter corpus. Read-only."""
    from kfoundry.config import resolve
    from kfoundry.pipeline import ensure_shards, ensure_tokenizer

    base = tmp_path_factory.mktemp("micro-data")
    cfg = resolve("test-micro")
    tok_dir = ensure_tokenizer(base, cfg, log=lambda m: None)
    return tok_dir, ensure_shards(base, cfg, tok_dir, log=lambda m: None)


MICRO_TRAINED = ["train.max_steps=200", "train.eval_every=200", "train.ckpt_every=200", "model.max_seq_len=128"]


@pytest.fixture(scope="session")
def micro_trained(micro_data, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, shard dir): a test-micro model (~107k parameters, context 128) pretrained for 200 steps on
    `micro_data`. Read-only. Training uses seq_len 64, so the context of 128 changes no weight (the same run
    with context 64 ends bit-identical); it only lets llama.cpp and chat prompts be longer. It trains on one
    thread whichever module asks first, so every test order gets the same weights, at a fraction of the CPU time
    two threads waiting for each other take on a busy machine."""
    from kfoundry.config import resolve
    from kfoundry.train import loop

    tok_dir, shards = micro_data
    cfg = resolve("test-micro", overrides=MICRO_TRAINED)
    with torch_threads(1):
        summary = loop.pretrain(cfg, tmp_path_factory.mktemp("micro-trained") / "run", shard_dir=shards,
                                tokenizer_dir=tok_dir, progress=False, log=lambda m: None)
    return Path(summary["checkpoint"]), shards
