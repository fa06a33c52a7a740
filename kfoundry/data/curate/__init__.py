"""Data curation on datatrove: raw Korean (and English) text in, a pretraining corpus and its data card out.

    kfoundry data prepare --corpus SPEC --out DIR [--recipe ko-web|ko-en-mix|clean|FILE.yaml]
                          [--executor local|slurm|ray] [--workers N]

    from kfoundry.data.curate import prepare, load_recipe
    card = prepare("reviews.jsonl.gz", "out/data", recipe="ko-web", workers=2)

The steps, in the order documents meet them (each module's docstring explains its choices):

    read            kfoundry.corpus readers (bad records counted by name)          io.py
    normalize       NFC, mojibake (CP949 and UTF-8), controls, spaces, lengths     normalize.py
    language        route by Hangul share: ko / mixed / en / other / none          language.py
    quality         datatrove Gopher + FineWeb filters; FineWeb-2 kor_Hang for ko  quality.py, recipes/*.yaml
    decontaminate   datatrove n-gram filter over an index of local eval sets      decontam.py
    exact_dedup     datatrove exact dedup (normalized text hash)                   stages.py
    near_dedup      datatrove MinHash, four stages, cluster sizes kept             stages.py
    pii             Korean personal data -> <|rrn|>, <|phone|>, ...                pii.py
    (finalize)      accounting check, data card, tokenizer + token shards          finalize.py, card.py

What datatrove provides is used as is (filters, dedup blocks, writers, executors); ours are the blocks it has
no counterpart for (Korean normalization, offline language routing, Korean PII, the local evaluation-set
index) and the accounting wrapper (accounting.py) that makes `in = kept + removed` checkable at every step.
"""

from kfoundry.data.curate.prepare import prepare
from kfoundry.data.curate.recipe import Recipe, builtin_recipes, load_recipe

__all__ = ["Recipe", "builtin_recipes", "load_recipe", "prepare"]
