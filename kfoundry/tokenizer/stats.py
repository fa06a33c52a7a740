"""How efficiently a tokenizer encodes each language, in figures comparable with published ones.

Fewer tokens for the same text means a longer effective context, cheaper training and faster generation,
and a language that costs more tokens per sentence is paid for twice (compute and context) by its users
(Petrov et al. 2023, "Language Model Tokenizers Introduce Unfairness Between Languages"). The figures:

- tokens per character: the headline figure; published FLORES-200 Korean values are 2.04 (GPT-2), 1.47
  (Llama-2), 0.96 (GPT-4 cl100k), 0.60 (Llama-3), 0.51 (Llama-4); English is about 0.20 for all of them.
- characters per token, and tokens per whitespace-separated word.
- the Korean/English token ratio on parallel text (the same sentences in both languages): 1.0 is parity.
- the share of Hangul syllables that are a single token, counted two ways:
  `hangul_single_token_share` over the distinct syllables that occur in the text, and
  `ksx1001_single_token_share` over the 2,350 common syllables of the KS X 1001 (EUC-KR) character set,
  a fixed list that does not depend on the text.

Each text is encoded on its own (no BOS/EOS), as the published per-sentence FLORES figures are.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from kfoundry.errors import DataError
from kfoundry.text import is_hangul_syllable, nfc
from kfoundry.tokenizer.ktokenizer import KTokenizer


@functools.cache
def ksx1001_hangul() -> tuple[str, ...]:
    """The 2,350 Hangul syllables of KS X 1001 (rows 0xB0-0xC8, columns 0xA1-0xFE of EUC-KR), in order."""
    return tuple(bytes((row, col)).decode("euc_kr") for row in range(0xB0, 0xC9) for col in range(0xA1, 0xFF))


def single_token_share(tok: KTokenizer, syllables: Sequence[str]) -> float | None:
    """Share of `syllables` that encode to exactly one token (None when there are none)."""
    if not syllables:
        return None
    return sum(len(ids) == 1 for ids in tok.encode_batch(list(syllables))) / len(syllables)


def language_stats(tok: KTokenizer, texts: Sequence[str]) -> dict[str, Any]:
    """Counts and ratios for one language's texts."""
    texts = [nfc(t) for t in texts]
    token_counts = [len(ids) for ids in tok.encode_batch(texts)]
    chars = sum(len(t) for t in texts)
    words = sum(len(t.split()) for t in texts)
    tokens = sum(token_counts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    syllables = sorted({ch for t in texts for ch in t if is_hangul_syllable(ch)})
    return {
        "texts": len(texts),
        "chars": chars,
        "bytes": n_bytes,
        "words": words,
        "tokens": tokens,
        "tokens_per_char": tokens / chars if chars else None,
        "chars_per_token": chars / tokens if tokens else None,
        "tokens_per_word": tokens / words if words else None,
        "bytes_per_token": n_bytes / tokens if tokens else None,
        "hangul_syllables_distinct": len(syllables),
        "hangul_single_token_share": single_token_share(tok, syllables),
    }


def tokenizer_stats(tok: KTokenizer, texts_by_lang: dict[str, list[str]],
                    parallel: tuple[list[str], list[str]] | None = None) -> dict[str, Any]:
    """Efficiency figures per language, plus the Korean/English ratio when `parallel` is given.

    `texts_by_lang` maps a language code ("ko", "en", ...) to its texts. `parallel` is (Korean texts,
    English texts), aligned line by line; the ratio is Korean tokens / English tokens over all pairs.
    """
    out: dict[str, Any] = {
        "tokenizer": {"vocab_size": tok.vocab_size, "hash": tok.hash},
        "languages": {lang: language_stats(tok, texts) for lang, texts in texts_by_lang.items()},
        "ksx1001_syllables": len(ksx1001_hangul()),
        "ksx1001_single_token_share": single_token_share(tok, ksx1001_hangul()),
        "parallel": None,
    }
    if parallel is not None:
        ko, en = parallel
        if len(ko) != len(en):
            raise DataError(f"parallel texts must align: {len(ko)} Korean vs {len(en)} English")
        ko_tokens = sum(len(ids) for ids in tok.encode_batch(list(ko)))
        en_tokens = sum(len(ids) for ids in tok.encode_batch(list(en)))
        out["parallel"] = {
            "pairs": len(ko),
            "ko_tokens": ko_tokens,
            "en_tokens": en_tokens,
            "ko_en_token_ratio": ko_tokens / en_tokens if en_tokens else None,
        }
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of `tokenizer_stats` output."""
    t = stats["tokenizer"]
    lines = [f"tokenizer: vocab {t['vocab_size']:,}, sha256 {t['hash'][:12]}", ""]
    header = f"{'lang':<8}{'texts':>8}{'chars':>11}{'tokens':>11}{'tok/char':>10}{'char/tok':>10}{'tok/word':>10}" \
             f"{'Hangul 1-token':>18}"
    lines += [header, "-" * len(header)]
    for lang, s in stats["languages"].items():
        share = s["hangul_single_token_share"]
        share_text = "-" if share is None else f"{share:.1%} of {s['hangul_syllables_distinct']}"
        lines.append(f"{lang:<8}{s['texts']:>8,}{s['chars']:>11,}{s['tokens']:>11,}"
                     f"{_fmt(s['tokens_per_char'], '.3f'):>10}{_fmt(s['chars_per_token'], '.2f'):>10}"
                     f"{_fmt(s['tokens_per_word'], '.2f'):>10}{share_text:>18}")
    lines.append("")
    lines.append(f"KS X 1001 common Hangul syllables that are one token: {stats['ksx1001_single_token_share']:.1%} "
                 f"of {stats['ksx1001_syllables']:,}")
    p = stats.get("parallel")
    if p:
        lines.append(f"Korean/English token ratio on {p['pairs']:,} parallel lines: "
                     f"{_fmt(p['ko_en_token_ratio'], '.3f')} ({p['ko_tokens']:,} / {p['en_tokens']:,} tokens)")
    return "\n".join(lines)
