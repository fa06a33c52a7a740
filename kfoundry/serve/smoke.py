"""An untrained checkpoint for exercising the serving path (tests, load benchmarks, a deployment smoke test).

Serving does not care whether the weights are any good: batching, streaming, limits and errors behave the
same. A randomly initialised model of the right shape, with a real tokenizer trained in a second on a few
Korean and English sentences, lets every serving test run in seconds without a training run. Its answers
are gibberish by construction.
"""

from __future__ import annotations

from pathlib import Path

from kfoundry.checkpoint import save_checkpoint
from kfoundry.config import ModelConfig
from kfoundry.model.llama import Transformer
from kfoundry.tokenizer import train_tokenizer

SAMPLE_TEXTS = [
    "대한민국은 민주공화국이다. 모든 국민은 인간으로서의 존엄과 가치를 가지며, 행복을 추구할 권리를 가진다.",
    "안녕하세요, 만나서 반갑습니다. 오늘은 날씨가 맑고 따뜻하네요. 점심은 김치찌개를 먹었어요 😀",
    "서울에서 부산까지 KTX로 약 2시간 30분이 걸립니다. 요금은 59,800원입니다.",
    "The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you.",
    "Language models predict the next token from the tokens before it, one step at a time.",
    "2026년 11월 29일, 가격은 12,345원 (3.14%) 🎉 Let's go!",
]


def random_checkpoint(path: str | Path, *, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                      ffn_dim: int = 128, max_seq_len: int = 1024, vocab_size: int = 512,
                      model_vocab_size: int | None = None, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a checkpoint with random weights and a small trained tokenizer; return its path.

    `vocab_size` is the tokenizer's; `model_vocab_size` (default: the same) may be larger, as in a model whose
    vocabulary was padded, and gives the output layer a realistic cost.
    """
    tok = train_tokenizer(SAMPLE_TEXTS * 8, vocab_size)
    cfg = ModelConfig(vocab_size=max(model_vocab_size or 0, tok.vocab_size), dim=dim, n_layers=n_layers,
                      n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim, max_seq_len=max_seq_len,
                      tie_embeddings=True)
    model = Transformer.build(cfg, seed=seed)
    return save_checkpoint(path, model, tok, meta={"stage": "random-init", "purpose": "serving smoke test"},
                           overwrite=overwrite)
