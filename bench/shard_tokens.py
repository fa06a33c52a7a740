"""Bench: tokenization into shards, tokens/s per core, 1 task vs N datatrove tasks, against a bare-encoder peer.

The corpus (default: the shared NSMC reviews, 678k short documents) is first split into `--files` plain JSONL
files (untimed), so the N tasks each read their own files, as they do on a `data prepare` run's `curated/`.
Every encoder runs on one thread (TOKENIZERS_PARALLELISM=false), so "per core" means per process:

    peer      Hugging Face `tokenizers` encode_batch alone, one thread, on the texts already in memory: the
              cost of the BPE itself, with no reading, no NFC, no writing (the upper bound)
    1 task    `kfoundry data shard --tasks 1` (this process: read, NFC, encode, write parts, merge)
    N tasks   `--tasks N --workers N` on local datatrove processes (N cores), merge included

    HF_HUB_OFFLINE=1 .venv/bin/python bench/shard_tokens.py [--input FILE] [--tasks 2] [--limit N] [--json OUT]

It also checks that the N-task shard files are byte-identical to the 1-task ones. Besides wall time it
measures CPU time (this process from getrusage, its worker processes from psutil), so "tokens per CPU-second" is a
per-core figure that holds even on a shared, overloaded machine; wall-clock tokens/s there mostly measures the
other jobs. The load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per process: figures are per core
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def default_input() -> Path:
    base = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return base / "ko" / "nsmc" / "reviews.jsonl.gz"


class ChildCPU:
    """CPU seconds of every descendant process seen while running (datatrove's pool workers are not always
    reaped in a way getrusage(RUSAGE_CHILDREN) counts): polls psutil every 0.1 s and keeps each pid's last
    reading, so a task loses at most its last 0.1 s."""

    def __init__(self) -> None:
        import psutil

        self._me, self._seen, self._stop = psutil.Process(), {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for child in self._me.children(recursive=True):
                try:
                    t = child.cpu_times()
                    self._seen[child.pid] = t.user + t.system
                except Exception:  # it ended between listing and reading
                    pass
            time.sleep(0.1)

    def __enter__(self) -> ChildCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self._seen.values())


def cpu_seconds() -> float:
    """CPU seconds used so far by this process."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def split_into_files(spec: str, folder: Path, n_files: int, limit: int | None) -> list[str]:
    from kfoundry.corpus import iter_documents

    folder.mkdir(parents=True)
    outs = [open(folder / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(n_files)]
    texts = []
    for i, doc in enumerate(iter_documents(spec)):
        if limit is not None and i >= limit:
            break
        texts.append(doc.text)
    per = -(-len(texts) // n_files)
    for i, t in enumerate(texts):
        outs[i // per].write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    for f in outs:
        f.close()
    return texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", default=str(default_input()), help="corpus SPEC (default: shared NSMC)")
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--files", type=int, default=8, help="files the corpus is split into first")
    ap.add_argument("--limit", type=int, default=None, help="first N documents only")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--json", default=None, help="write the figures here too")
    args = ap.parse_args()

    from kfoundry.corpus import CorpusStats, iter_documents
    from kfoundry.data.shard_tasks import shard_corpus
    from kfoundry.data.shards import write_shards
    from kfoundry.tokenizer import KTokenizer, train_tokenizer

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="kf-shard-bench-"))
    try:
        texts = split_into_files(args.input, work / "corpus", args.files, args.limit)
        tok = train_tokenizer(texts[:50_000], args.vocab_size)
        tok.save(work / "tok")
        tok = KTokenizer.load(work / "tok")
        spec = str(work / "corpus")

        t, c = time.perf_counter(), cpu_seconds()
        encoded = tok.encode_batch(texts)
        peer_s, peer_cpu = time.perf_counter() - t, cpu_seconds() - c
        peer_tokens = sum(len(e) + 2 for e in encoded)  # + BOS/EOS, as stored
        del encoded

        stats = CorpusStats()
        t, c = time.perf_counter(), cpu_seconds()
        one = write_shards(iter_documents(spec, stats), tok, work / "one", stats=stats, val_fraction=0.05)
        one_s, one_cpu = time.perf_counter() - t, cpu_seconds() - c

        t, c = time.perf_counter(), cpu_seconds()
        with ChildCPU() as kids:
            many = shard_corpus(spec, work / "tok", work / "many", tasks=args.tasks, workers=args.tasks,
                                val_fraction=0.05)
        many_s, many_cpu = time.perf_counter() - t, cpu_seconds() - c + kids.seconds
        same = all((work / "one" / p.name).read_bytes() == p.read_bytes()
                   for p in (work / "many").iterdir() if p.name != "run_config.json")
        assert one["tokens"] == many["tokens"] == peer_tokens, (one["tokens"], many["tokens"], peer_tokens)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    tokens = one["tokens"]
    rows = {
        "peer (encode_batch, 1 thread)": (peer_s, peer_cpu, 1),
        "1 task": (one_s, one_cpu, 1),
        f"{args.tasks} tasks": (many_s, many_cpu, args.tasks),
    }
    result = {"input": args.input, "docs": one["docs"], "tokens": tokens, "identical_files": same,
              "load_before": load_before, "load_after": os.getloadavg(), "cpus": os.cpu_count(),
              "rows": {k: {"seconds": s, "cpu_seconds": cpu, "cores": c, "tokens_per_s": tokens / s,
                           "tokens_per_cpu_s": tokens / cpu} for k, (s, cpu, c) in rows.items()}}
    print(f"{one['docs']:,} documents, {tokens:,} tokens; load average before {load_before[0]:.2f} "
          f"after {result['load_after'][0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'':32} {'wall s':>8} {'tokens/s':>10} {'CPU s':>8} {'tokens/CPU-s':>13} {'vs peer':>8}")
    peer_rate = tokens / peer_cpu
    for name, r in result["rows"].items():
        print(f"{name:32} {r['seconds']:8.1f} {r['tokens_per_s']:10,.0f} {r['cpu_seconds']:8.1f} "
              f"{r['tokens_per_cpu_s']:13,.0f} {r['tokens_per_cpu_s'] / peer_rate:7.2f}x")
    print(f"{args.tasks}-task shard files identical to 1-task: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
