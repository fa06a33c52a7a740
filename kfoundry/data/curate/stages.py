"""Assembly: the recipe's steps as datatrove pipelines, one per stage, and executors to run them.

    stage        tasks         pipeline
    ingest       1             CorpusReader -> shard writer                                  -> ingest/
    filter       N             normalize -> language -> quality x3 -> decontaminate -> writer -> filtered/
                               -> ExactDedupSignature
    exact_find   1             ExactFindDedups
    dedup        N             ExactDedupFilter -> writer -> ShingleMinhashSignature         -> unique/
    buckets      num_buckets   MinhashDedupBuckets
    cluster      1             MinhashDedupCluster (keeps cluster sizes)
    final        N             MinhashDedupFilter -> Korean PII -> writer                   -> curated/
    finalize     1             accounting check, data card, tokenizer + token shards

Every step that can remove or change a document is wrapped in `Accounted`, which also gives it an
exclusion writer (`removed/<step>/`). Each stage has its own datatrove logging folder (`logs/<stage>/`)
with its completion markers: a stage whose tasks are all marked complete is skipped on a re-run, and a
killed stage re-runs only its unfinished tasks.

Deduplication runs after filtering (FineWeb-2 deduplicated first): the kept set is the same either way for
exact copies, filtering first means far fewer documents go through MinHash, and the cluster sizes count
copies among documents good enough to keep, which is what upsampling by cluster size needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import multiprocess
import numpy as np
import time
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.executor.ray import RayPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups,
                                      MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text

from kfoundry.data.curate.accounting import Accounted
from kfoundry.data.curate.decontam import Decontaminate
from kfoundry.data.curate.io import CorpusReader, RankJsonlReader, ingest_writer, stage_writer
from kfoundry.data.curate.language import LanguageRouter
from kfoundry.data.curate.normalize import Normalize
from kfoundry.data.curate.pii import RedactPII
from kfoundry.data.curate.quality import build_quality_steps
from kfoundry.data.curate.recipe import Recipe
from kfoundry.data.curate.words import SpaceWords
from kfoundry.errors import ConfigError

EXECUTORS = ("local", "slurm", "ray")
# sha1, not datatrove's default xxhash: datatrove's xxhash helper needs xxhash<4, and our environment has 4.x.
HASH = HashConfig(precision=64, hash_fc="sha1")
# "Exact" means equal after lower-casing, dropping punctuation and collapsing whitespace; digits are kept,
# because "1점" and "10점" are different reviews.
EXACT_NORM = TextNormConfig(lowercase=True, norm_whitespace=True, remove_punctuation=True,
                            norm_unicode_diacritics=False, norm_numbers=False)


def exact_key(doc) -> str:
    """What exact deduplication compares (its hash is the document's exact-dedup signature)."""
    return simplify_text(doc.text, EXACT_NORM)


class KeepClusterSizes(MinhashDedupFilter):
    """MinhashDedupFilter that keeps cluster sizes for a task whose cluster roots were all kept.

    datatrove's filter only loads `<rank>.sizes` when `<rank>.remove` exists; a task whose documents are
    all cluster roots (nothing to remove) has sizes but no removal file, and would lose them. An empty
    removal file makes the filter read the sizes and remove nothing.
    """

    def run(self, data, rank: int = 0, world_size: int = 1):
        if (not self.data_folder.isfile(f"{rank:06d}.remove") and self.load_cluster_sizes
                and self.data_folder.isfile(f"{rank:06d}.sizes")):
            self.data_folder.open(f"{rank:06d}.remove", "wb").close()
        yield from super().run(data, rank, world_size)


@dataclass
class Stage:
    name: str
    tasks: int
    pipeline: list = field(default_factory=list)
    steps: list[str] = field(default_factory=list)  # accounted step names, in order


@dataclass
class Plan:
    """Everything a run needs to know about its stages; `steps` is the accounting order."""

    out: Path
    stages: list[Stage]
    steps: list[str]


# datatrove's default simplification also strips diacritics by way of NFD, which turns every Hangul syllable
# into jamo (Kiwi then cannot analyse it) and costs a Python call per character; our text is NFC already.
SIMPLIFY = TextNormConfig(norm_unicode_diacritics=False)


def minhash_config(recipe: Recipe) -> MinhashConfig:
    """FineWeb-2's MinHash settings by default: 5-word shingles, 14 buckets x 8 hashes, 64-bit hashes.

    Words are whitespace words of the simplified text (eojeols for Korean; see kfoundry.data.curate.words).
    Short documents use character shingles instead (`ShingleMinhashSignature`).
    """
    d = recipe.dedup
    return MinhashConfig(n_grams=d.n_grams, num_buckets=d.num_buckets, hashes_per_bucket=d.hashes_per_bucket,
                         norm_config=SIMPLIFY, hash_config=HASH)


# 64-bit arithmetic for the character-shingle hash: a polynomial over code points, then splitmix64's finalizer
# to spread the bits (MinHash's permutations assume well-mixed shingle hashes).
_POLY = np.uint64(0x100000001B3)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def char_shingles(text: str, n: int) -> np.ndarray:
    """Hashes of the character n-grams of `text` with whitespace removed, as a (count, 1) uint64 array.

    Whitespace is dropped first because Korean spacing is inconsistent ("재밌어요 정말" and "재밌어요정말" are
    the same review). A text shorter than n characters gives one shingle, itself. Vectorized with numpy:
    one pass per n-gram position instead of a hash call per shingle.
    """
    compact = "".join(text.split())
    if not compact:
        return np.empty((0, 1), dtype=np.uint64)
    cps = np.frombuffer(compact.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = min(n, len(cps))
    count = len(cps) - n + 1
    h = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * _POLY + cps[k:k + count] + np.uint64(1)
        h ^= h >> _S30
        h *= _MIX1
        h ^= h >> _S27
        h *= _MIX2
        h ^= h >> _S31
    return h.reshape(-1, 1)


class ShingleMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signature step, with character shingles for short documents.

    Why: word 5-gram shingles cannot see a near-copy in a short document. A 15-word review with one character
    changed and one syllable appended keeps only about 4 of its 11 word 5-grams (Jaccard ~0.2), far below the
    ~0.72 where 14 bands x 8 hashes start to catch a pair. Its character 4-grams (spaces removed) mostly
    survive: in a 60-character review the changed character touches 4 of 57 shingles and the appended
    syllable adds one, Jaccard ~0.85, which the bands catch with probability ~0.99. Character 4-grams of
    Korean are specific enough not to merge different reviews (4 Hangul syllables are about one or two
    words; tests/test_curate.py plants 200 near-copies among 5,000 distinct NSMC reviews). Long documents
    keep FineWeb-2's word 5-grams: there a few edits change few shingles, and character n-grams of long
    pages would make pages that share boilerplate look alike.

    Which shingles a document gets depends only on its own length (`char_max_chars` characters of
    simplified text), so the rule is the same in every task. A near-copy that straddles the boundary is
    compared across two shingle kinds and is not found; the boundary sits where word 5-grams already work
    (about 130 eojeols), so that costs little. Everything downstream (buckets, clusters, the filter) is
    datatrove's, unchanged: only the shingles differ.
    """

    def __init__(self, output_folder, config: MinhashConfig, char_n_grams: int, char_max_chars: int,
                 language=None):
        super().__init__(output_folder, config=config, language=language if language is not None else SpaceWords())
        self.char_n_grams = char_n_grams
        self.char_max_chars = char_max_chars

    def get_shingles(self, text: str) -> np.ndarray:
        simple = simplify_text(text, self.config.norm_config)
        if self.char_n_grams and len(simple) <= self.char_max_chars:
            return char_shingles(simple, self.char_n_grams)
        return super().get_shingles(text)


def build_plan(spec: str, out: Path, recipe: Recipe, tasks: int, *, decontam_index: Path | None,
               finalize: PipelineStep, seed: int = 0) -> Plan:
    """The stages of one run (see the module docstring)."""
    d = out
    stages: list[Stage] = []

    def acc(stage: Stage, name: str, step: PipelineStep, default_reason: str | None = None) -> Accounted:
        stage.steps.append(name)
        return Accounted(name, step, d, default_reason)

    stages.append(Stage("ingest", 1, [CorpusReader(spec, tasks, d, seed), ingest_writer(d / "ingest")],
                        ["read"]))

    filt = Stage("filter", tasks, [RankJsonlReader(d / "ingest")])
    filt.pipeline.append(acc(filt, "normalize", Normalize(recipe.normalize)))
    filt.pipeline.append(acc(filt, "language", LanguageRouter(recipe.language)))
    if recipe.quality is not None:
        for name, step in build_quality_steps(recipe.quality.thresholds, recipe.quality.kiwi_model,
                                              recipe.quality.estimate_short_docs):
            filt.pipeline.append(acc(filt, name, step))
    if decontam_index is not None:
        filt.pipeline.append(acc(filt, "decontaminate", Decontaminate(decontam_index, recipe.decontaminate.n_grams)))
    filt.pipeline.append(stage_writer(d / "filtered"))
    exact = ExactDedupConfig(content_getter=exact_key, hash_config=HASH)
    if recipe.dedup.exact:
        filt.pipeline.append(ExactDedupSignature(str(d / "dedup" / "exact_sigs"), config=exact))
    stages.append(filt)

    if recipe.dedup.exact:
        stages.append(Stage("exact_find", 1, [ExactFindDedups(str(d / "dedup" / "exact_sigs"),
                                                              str(d / "dedup" / "exact_dups"), config=exact)]))

    mh = minhash_config(recipe)
    dedup = Stage("dedup", tasks, [RankJsonlReader(d / "filtered")])
    if recipe.dedup.exact:
        dedup.pipeline.append(acc(dedup, "exact_dedup", ExactDedupFilter(str(d / "dedup" / "exact_dups"),
                                                                         config=exact), "exact_duplicate"))
    dedup.pipeline.append(stage_writer(d / "unique"))
    if recipe.dedup.minhash:
        dedup.pipeline.append(ShingleMinhashSignature(str(d / "dedup" / "minhash_sigs"), config=mh,
                                                      char_n_grams=recipe.dedup.char_n_grams,
                                                      char_max_chars=recipe.dedup.char_max_chars))
    stages.append(dedup)

    if recipe.dedup.minhash:
        stages.append(Stage("buckets", mh.num_buckets, [MinhashDedupBuckets(
            str(d / "dedup" / "minhash_sigs"), str(d / "dedup" / "minhash_buckets"), config=mh)]))
        stages.append(Stage("cluster", 1, [MinhashDedupCluster(
            str(d / "dedup" / "minhash_buckets"), str(d / "dedup" / "minhash_remove"), config=mh,
            save_cluster_size=True)]))

    final = Stage("final", tasks, [RankJsonlReader(d / "unique")])
    if recipe.dedup.minhash:
        final.pipeline.append(acc(final, "near_dedup", KeepClusterSizes(
            str(d / "dedup" / "minhash_remove"), load_cluster_sizes=True), "near_duplicate"))
    if recipe.pii.enabled:
        final.pipeline.append(acc(final, "pii", RedactPII(recipe.pii.types)))
    final.pipeline.append(stage_writer(d / "curated", compressed=True))
    stages.append(final)

    stages.append(Stage("finalize", 1, [finalize]))
    steps = [s for stage in stages for s in stage.steps]
    return Plan(out=d, stages=stages, steps=steps)


# ---------------------------------------------------------------------------------------------------------
# Executors


def check_executor(executor: str, options: dict[str, Any] | None) -> None:
    """Fail before any work on an unknown executor or a Slurm run without partition and time."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    missing = [k for k in ("partition", "time") if executor == "slurm" and k not in (options or {})]
    if missing:
        raise ConfigError("--executor slurm needs " + " ".join(f"--executor-opt {k}=..." for k in missing))


def make_executors(plan: Plan, executor: str, workers: int, options: dict[str, Any] | None = None
                   ) -> list[Any]:
    """One datatrove executor per stage, each depending on the one before (slurm and ray need the chain;
    the local runner below runs them in order itself)."""
    check_executor(executor, options)
    options = dict(options or {})
    made: list[Any] = []
    for stage in plan.stages:
        common = dict(pipeline=stage.pipeline, tasks=stage.tasks, logging_dir=str(plan.out / "logs" / stage.name))
        if executor == "local":
            ex = LocalPipelineExecutor(**common, workers=max(1, min(workers, stage.tasks)), **options)
        elif executor == "slurm":
            ex = SlurmPipelineExecutor(**common, job_name=f"kf-{stage.name}", depends=made[-1] if made else None,
                                       workers=workers if workers > 0 else -1, **options)
        else:
            ex = RayPipelineExecutor(**common, depends=made[-1] if made else None,
                                     workers=workers if workers > 0 else -1, **options)
        made.append(ex)
    return made


# What a worker process needs to unpickle and run any stage: imported once in datatrove's fork server, so that
# the pool of every stage forks workers with them loaded instead of importing them again (1-5 s per worker and
# stage, depending on load: kfoundry, datatrove, numpy, kiwipiepy, huggingface_hub).
WORKER_MODULES = ["kfoundry.data.curate.prepare", "kfoundry.data.shard_tasks"]


def preload_worker_modules() -> None:
    """Have the local executor's fork server import WORKER_MODULES when it starts (no effect once it runs)."""
    # '__main__' is the fork server's default preload; it stays
    multiprocess.get_context("forkserver").set_forkserver_preload(["__main__", *WORKER_MODULES])


def run_local(executors: list[Any], names: list[str], on_stage: Callable[[str, float], None]) -> None:
    """Run local executors one after another; raise if a stage leaves tasks incomplete."""
    if any(getattr(ex, "workers", 1) > 1 and getattr(ex, "start_method", None) == "forkserver" for ex in executors):
        preload_worker_modules()
    for name, ex in zip(names, executors):
        t = time.perf_counter()
        ex.run()
        incomplete = ex.get_incomplete_ranks(skip_completed=True)
        if incomplete:
            raise RuntimeError(f"stage {name}: tasks {incomplete} did not complete; see {ex.logging_dir.path}/logs")
        on_stage(name, time.perf_counter() - t)
