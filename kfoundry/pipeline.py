"""Run-directory steps shared by `pretrain` and `speedrun`: make the tokenizer and the shards a run needs,
once. A step whose output already exists is skipped, so re-running a command (or resuming) redoes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

from kfoundry.config import RunConfig
from kfoundry.corpus import CorpusStats, iter_documents
from kfoundry.corpus.chunk import split_long_documents
from kfoundry.data.shards import write_shards
from kfoundry.provenance import record_data
from kfoundry.tokenizer import KTokenizer, train_tokenizer


def ensure_tokenizer(run_dir: Path, cfg: RunConfig, log=lambda m: print(m, file=sys.stderr)) -> Path:
    tok_dir = Path(run_dir) / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return tok_dir
    d = cfg.data
    log(f"training a {d.vocab_size}-token BPE tokenizer on corpus {d.corpus!r}")
    stats = CorpusStats()
    texts = (doc.text for doc in iter_documents(d.corpus, stats, max_chars_per_doc=d.max_chars_per_doc))
    tok = train_tokenizer(texts, d.vocab_size, max_chars_per_doc=d.max_chars_per_doc,
                          max_total_chars=d.max_total_chars)
    tok.save(tok_dir)
    return tok_dir


def ensure_shards(run_dir: Path, cfg: RunConfig, tok_dir: Path, log=lambda m: print(m, file=sys.stderr)) -> Path:
    shard_dir = Path(run_dir) / "shards"
    if (shard_dir / "meta.json").is_file():
        return shard_dir
    d = cfg.data
    log(f"tokenizing corpus {d.corpus!r} into {shard_dir}")
    stats = CorpusStats()
    docs = iter_documents(d.corpus, stats, max_chars_per_doc=d.max_chars_per_doc, seed=cfg.train.seed)
    docs = split_long_documents(docs, d.split_chars, stats)
    write_shards(docs, KTokenizer.load(tok_dir), shard_dir, val_fraction=d.val_fraction, seed=cfg.train.seed,
                 stats=stats)

    record_data(run_dir, shard_dir, corpus=d.corpus, tokenizer_dir=tok_dir)  # shard hashes, sources, licences
    return shard_dir


def ensure_curated(run_dir: Path, cfg: RunConfig, recipe: str = "clean",
                   log=lambda m: print(m, file=sys.stderr)) -> Path:
    """Curate the run's corpus into `run_dir/data` with `kfoundry data prepare`; return the curated corpus SPEC.

    The returned folder (`data/curated`, JSONL shards) is a corpus SPEC, so the tokenizer and shard steps
    read it like any other corpus. `recipe` defaults to `clean` (normalize, language, decontamination, dedup,
    PII; no web quality heuristics), because the speedrun's `starter` corpus is laws and documentation, which
    the web heuristics would mostly reject. A finished curation is not redone; an interrupted one resumes.
    Token shards are left to `ensure_tokenizer` / `ensure_shards`, which own `run_dir/tokenizer` and `shards`.
    """
    from kfoundry.data.curate import prepare

    data_dir = Path(run_dir) / "data"
    prepare(cfg.data.corpus, data_dir, recipe=recipe, workers=1, tasks=2, shards=False, seed=cfg.train.seed,
            log=log)
    return data_dir / "curated"
