"""Benchmark: how many tokens a 32k kfoundry tokenizer spends on Korean and English (FLORES-200 dev).

Not a test: it trains a full-size tokenizer (minutes on 2 cores) and prints our figures next to the
FLORES-200 figures of well-known tokenizers (measured by bench/peer_tokenizers.py), with the ratio ours / theirs.

Training text (all offline and openly licensed; none of it is FLORES):
- Korean: NSMC movie reviews (CC0, ~24M characters), the KorSTS train split (CC BY-SA 4.0, ~0.34M; formal
  sentences translated from STS-B; its dev/test splits are not used) and the Korean half of the `starter`
  corpus (the Constitution shipped with konlpy).
- English: tinyshakespeare (public domain, 1.1M), Python's reference topics (the English half of
  `starter`, PSF licence) and the prose paragraphs of the docstrings of Python's standard library and of
  packages kfoundry depends on (BSD/MIT/Apache; code examples and parameter lists filtered out). The
  reference topics and the docstring prose are repeated `--en-repeat` times (default 3).

Why the extra sources and the repeat: BPE gives its merges to whatever is frequent, and NSMC is 20 times
larger than Shakespeare, so with Shakespeare alone modern English stays at ~0.33 tokens/char. Adding and
upsampling present-day English prose buys English vocabulary; the small formal Korean sets pull the
Korean vocabulary from review slang towards the register FLORES (news, encyclopedia) is written in.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/tokenizer_efficiency.py [--vocab-size 32000] [--en-repeat 3] [--save DIR]
"""

from __future__ import annotations

import argparse
import ast
import csv
import importlib.util
import itertools
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from kfoundry.corpus import CorpusStats, Document, iter_documents
from kfoundry.tokenizer import format_stats, tokenizer_stats, train_tokenizer
from kfoundry.tokenizer.cli import flores_texts

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Peers' FLORES-200 dev tokens per character (Korean, English), measured the same way by bench/peer_tokenizers.py
# from the vocabulary files llama.cpp ships for each model (docs/benchmarks.md gives the run and the sources).
PEERS = {"GPT-2 (50k)": (2.062, 0.206), "Llama-2 (32k)": (1.497, 0.236), "Llama-3 (128k)": (0.610, 0.206),
         "Qwen1.5 (152k)": (0.683, 0.210)}
GOAL_KO, GOAL_EN = 0.50, 0.30

# Packages installed through kfoundry's declared dependencies whose docstrings are mostly English prose.
DOC_PACKAGES = ("transformers", "torch", "numpy", "pandas", "datasets", "matplotlib", "huggingface_hub",
                "networkx", "sympy")

# A prose paragraph: letters, spaces and ordinary punctuation (code, tables and parameter lists are not).
_PROSE_CHAR = re.compile(r"[A-Za-z ,.;:'\"()\-!?]")


def is_prose(paragraph: str) -> bool:
    if len(paragraph) < 120 or ">>>" in paragraph or "::" in paragraph:
        return False
    if sum(1 for c in paragraph if _PROSE_CHAR.match(c)) < 0.97 * len(paragraph):
        return False
    return sum(c.isupper() for c in paragraph) <= 0.08 * len(paragraph)  # not CONSTANT_NAMES or headings


def docstring_prose(root: Path, skip_dirs: tuple[str, ...] = ("test", "tests", "testing", "site-packages")
                    ) -> Iterator[str]:
    """Prose paragraphs from the docstrings of every .py file under `root`, deduplicated, in path order."""
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if any(part in skip_dirs for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                    para = " ".join(para.split())
                    if para not in seen and is_prose(para):
                        seen.add(para)
                        yield para


def english_docs() -> Iterator[str]:
    yield from docstring_prose(Path(sysconfig.get_paths()["stdlib"]))
    for name in DOC_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            yield from docstring_prose(Path(next(iter(spec.submodule_search_locations))))


class Counted:
    """Wrap a text stream and count the characters each source contributed."""

    def __init__(self) -> None:
        self.chars: dict[str, int] = {}

    def __call__(self, name: str, texts: Iterator[str]) -> Iterator[str]:
        self.chars.setdefault(name, 0)
        for t in texts:
            self.chars[name] += len(t)
            yield t


def korsts_train() -> Iterator[str]:
    """Both sentences of each KorSTS train pair (columns: genre, filename, year, id, score, s1, s2)."""
    with open(SHARED / "ko" / "kornlu" / "KorSTS" / "sts-train.tsv", encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)  # header
        for row in rows:
            yield from row[5:7]


def training_texts(counted: Counted, starter: list[Document], english: list[str], en_repeat: int) -> Iterator[str]:
    stats = CorpusStats()
    nsmc = SHARED / "ko" / "nsmc" / "reviews.jsonl.gz"
    shakespeare = SHARED / "en" / "tinyshakespeare" / "input.txt"
    yield from itertools.chain(
        counted("ko: NSMC reviews", (d.text for d in iter_documents(str(nsmc), stats))),
        counted("ko: KorSTS train", korsts_train()),
        counted("ko: starter (konlpy)", (d.text for d in starter if d.lang == "ko")),
        counted("en: tinyshakespeare", (d.text for d in iter_documents(str(shakespeare), stats))),
        counted(f"en: pydoc topics + docstring prose, x{en_repeat}", itertools.chain.from_iterable(
            itertools.repeat(english, en_repeat))),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-size", type=int, default=32_000)
    ap.add_argument("--en-repeat", type=int, default=3, help="times the English prose is repeated (upsampling)")
    ap.add_argument("--flores", default=str(SHARED / "flores200" / "dev"))
    ap.add_argument("--save", help="also save the trained tokenizer here")
    args = ap.parse_args(argv)
    if not (SHARED / "ko" / "nsmc").is_dir():
        print(f"shared data not found at {SHARED} (set KFOUNDRY_SHARED_DATA)", file=sys.stderr)
        return 2

    start = time.perf_counter()
    starter = list(iter_documents("starter"))
    # The English prose is small (~7M characters): extract it once, then repeat it from memory.
    english = [d.text for d in starter if d.lang != "ko"] + list(english_docs())
    print(f"extracted English prose in {time.perf_counter() - start:.0f} s", flush=True)

    counted = Counted()
    start = time.perf_counter()
    texts = training_texts(counted, starter, english, args.en_repeat)
    tok = train_tokenizer(texts, args.vocab_size, max_chars_per_doc=100_000, max_total_chars=10**9)
    seconds = time.perf_counter() - start
    if args.save:
        tok.save(args.save)

    flores = flores_texts(Path(args.flores))
    stats = tokenizer_stats(tok, flores, parallel=(flores["ko"], flores["en"]))
    ko = stats["languages"]["ko"]["tokens_per_char"]
    en = stats["languages"]["en"]["tokens_per_char"]

    print("training text (characters):")
    for name, n in counted.chars.items():
        print(f"  {name:<52}{n:>14,}")
    info = tok.training or {}
    print(f"trained {tok.vocab_size:,}-token vocabulary on {info.get('chars_used', 0):,} characters "
          f"in {seconds:.0f} s ({os.cpu_count()} CPUs)\n")
    print(format_stats(stats))
    print("\nFLORES-200 dev, Korean tokens per character: ours vs peers (bench/peer_tokenizers.py)")
    for peer, (value, value_en) in PEERS.items():
        print(f"  {peer:<16}{value:>6.3f}   ours {ko:.3f}   ours/theirs {ko / value:.2f}   "
              f"(English {value_en:.3f}, ours/theirs {en / value_en:.2f})")
    met = ko <= GOAL_KO and en <= GOAL_EN
    print(f"goal at 32k (Korean <= {GOAL_KO}, English <= {GOAL_EN}): {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
