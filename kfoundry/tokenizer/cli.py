"""`kfoundry tokenizer train` and `kfoundry tokenizer stats`.

    kfoundry tokenizer train --corpus SPEC --vocab-size N --out DIR [--max-chars-per-doc C] [--max-total-chars T]
    kfoundry tokenizer stats --tokenizer DIR --text FILE_OR_DIR [--json]

`train` writes the tokenizer directory (see kfoundry.tokenizer.ktokenizer) plus `train_config.json` (the
resolved arguments) and `corpus_stats.json` (what the corpus reader read, dropped and cut), all in one
atomic rename. `stats --text` takes a FLORES-style folder (`kor_Hang.dev`, `eng_Latn.dev`, one sentence per
line, aligned) for per-language figures and the Korean/English ratio, or a plain text file (one text per
line).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kfoundry.config import write_config
from kfoundry.corpus import CorpusStats, iter_documents
from kfoundry.errors import DataError, MissingPathError
from kfoundry.fileio import atomic_dir, atomic_write_json
from kfoundry.text import hangul_share, nfc
from kfoundry.tokenizer.ktokenizer import KTokenizer, check_replaceable
from kfoundry.tokenizer.stats import format_stats, tokenizer_stats
from kfoundry.tokenizer.train import train_tokenizer

# FLORES-200 file stems we recognise, and the short codes the stats use.
FLORES_LANGS = {"kor_Hang": "ko", "eng_Latn": "en"}
FLORES_SPLITS = (".dev", ".devtest")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer and measure its efficiency")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    p.set_defaults(func=lambda args: p.print_help() or 2)

    t = sub.add_parser("train", help="train a tokenizer on a corpus",
                       description="Train a byte-level BPE tokenizer (Llama-3 pre-tokenizer, NFC) on a corpus.")
    t.add_argument("--corpus", required=True, help="corpus SPEC: starter, a file or folder, hf:NAME, or a weighted mix")
    t.add_argument("--vocab-size", type=int, required=True, help="total vocabulary, special tokens included")
    t.add_argument("--out", required=True, help="tokenizer directory to write (an older tokenizer there is replaced)")
    t.add_argument("--max-chars-per-doc", type=int, default=10_000, help="cut longer documents (default 10,000)")
    t.add_argument("--max-total-chars", type=int, default=100_000_000,
                   help="stop reading the corpus after this many characters (default 100M)")
    t.add_argument("--min-frequency", type=int, default=2, help="a pair is merged only if seen this often (default 2)")
    t.add_argument("--seed", type=int, default=0, help="tie-breaking seed for mixed corpora (default 0)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("stats", help="tokens per character/word, Korean/English ratio, Hangul coverage",
                       description="Measure a tokenizer on a FLORES-style folder or a plain text file.")
    s.add_argument("--tokenizer", required=True, help="tokenizer directory")
    s.add_argument("--text", required=True,
                   help="a folder with kor_Hang.dev/eng_Latn.dev (FLORES-200 layout) or a text file, one text per line")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=cmd_stats)


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_replaceable(out)  # before an hour of training, not after
    resolved = {
        "command": "tokenizer train",
        "corpus": args.corpus,
        "vocab_size": args.vocab_size,
        "max_chars_per_doc": args.max_chars_per_doc,
        "max_total_chars": args.max_total_chars,
        "min_frequency": args.min_frequency,
        "seed": args.seed,
    }
    corpus_stats = CorpusStats()
    docs = iter_documents(args.corpus, corpus_stats, max_chars_per_doc=args.max_chars_per_doc, seed=args.seed)
    tok = train_tokenizer((d.text for d in docs), args.vocab_size, max_chars_per_doc=args.max_chars_per_doc,
                          max_total_chars=args.max_total_chars, min_frequency=args.min_frequency)
    with atomic_dir(out, overwrite=True) as tmp:
        tok.write_files(tmp)
        write_config(resolved, tmp, name="train_config.json")
        atomic_write_json(tmp / "corpus_stats.json", corpus_stats.to_dict())
    info = tok.training or {}
    print(f"tokenizer: {out}  vocab {tok.vocab_size:,} (asked {args.vocab_size:,})  sha256 {tok.hash[:12]}")
    print(f"trained on {info.get('chars_used', 0):,} characters from {info.get('docs_used', 0):,} documents "
          f"in {info.get('seconds', 0):.1f} s" + ("  (stopped at --max-total-chars)"
                                                   if info.get("stopped_at_max_total_chars") else ""))
    return 0


def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file, NFC, without line endings."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return [nfc(line) for line in text.splitlines()]


def flores_texts(folder: Path) -> dict[str, list[str]]:
    """Language code -> lines, from FLORES-200 files in `folder` (`.dev` preferred over `.devtest`)."""
    found: dict[str, list[str]] = {}
    for stem, lang in FLORES_LANGS.items():
        for split in FLORES_SPLITS:
            f = folder / f"{stem}{split}"
            if f.is_file():
                found[lang] = read_lines(f)
                break
    if not found:
        names = ", ".join(f"{stem}.dev" for stem in FLORES_LANGS)
        raise DataError(f"{folder} holds no FLORES-style files (expected {names})")
    return found


def file_language(lines: list[str]) -> str:
    """'ko', 'en' or 'other' for a whole file, from its script (a plain file carries no language tag)."""
    sample = "\n".join(lines)[:100_000]
    if hangul_share(sample) >= 0.3:
        return "ko"
    letters = [c for c in sample if c.isalpha()]
    return "en" if letters and sum(c.isascii() for c in letters) / len(letters) >= 0.5 else "other"


def collect_stats(tok: Any, text_path: Path) -> dict[str, Any]:
    if text_path.is_dir():
        by_lang = flores_texts(text_path)
        parallel = None
        if "ko" in by_lang and "en" in by_lang:
            if len(by_lang["ko"]) != len(by_lang["en"]):
                raise DataError(f"{text_path}: Korean and English files differ in line count "
                                 f"({len(by_lang['ko'])} vs {len(by_lang['en'])}); they must be aligned")
            parallel = (by_lang["ko"], by_lang["en"])
        stats = tokenizer_stats(tok, by_lang, parallel)
    elif text_path.is_file():
        lines = read_lines(text_path)
        stats = tokenizer_stats(tok, {file_language(lines): lines})
    else:
        raise MissingPathError(f"text not found: {text_path}")
    stats["text"] = str(text_path)
    return stats


def cmd_stats(args: argparse.Namespace) -> int:
    tok = KTokenizer.load(args.tokenizer)
    stats = collect_stats(tok, Path(args.text))
    if args.json:
        json.dump(stats, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(f"text: {stats['text']}")
        print(format_stats(stats))
    return 0
