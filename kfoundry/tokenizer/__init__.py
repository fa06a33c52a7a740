"""Byte-level BPE tokenizer: training, the `KTokenizer` wrapper, the chat template, efficiency stats.

    tok = train_tokenizer(texts, vocab_size=32_000)     # texts: any iterable of str, read lazily
    tok.save("run/tokenizer"); tok = KTokenizer.load("run/tokenizer")
    ids = tok.encode("안녕하세요", bos=True); tok.decode(ids, skip_special=True)
    tokenizer_stats(tok, {"ko": ko_lines, "en": en_lines}, parallel=(ko_lines, en_lines))

See docs/tokenizer.md for the design and pipeline.py for each component choice.
"""

from kfoundry.tokenizer.ktokenizer import KTokenizer
from kfoundry.tokenizer.pipeline import SPECIAL_TOKENS
from kfoundry.tokenizer.stats import format_stats, tokenizer_stats
from kfoundry.tokenizer.train import train_tokenizer

__all__ = ["KTokenizer", "SPECIAL_TOKENS", "format_stats", "tokenizer_stats", "train_tokenizer"]
