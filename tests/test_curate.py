"""`kfoundry data prepare` end to end, on a corpus built from the shared NSMC reviews with things planted in it:

- distinct documents (30 consecutive reviews each) and edited copies of some of them (1-3 word edits, a
  changed punctuation mark or an extra line) -> MinHash must find >= 95 % of the copies and merge nothing else;
- exact copies that differ only in case, spacing and punctuation -> exact dedup;
- a sentence from KoBEST BoolQ inside a review -> decontamination;
- Korean personal data -> placeholders in the curated text;
- bad input: malformed JSON, invalid UTF-8, binary junk, empty and enormous documents, mojibake, NFD.

One run (two worker processes) is shared by most tests; resuming after a failure and the command line
are tested on a small corpus of their own.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kfoundry.data.curate import prepare
from kfoundry.data.curate.accounting import check_identity

ROOT = Path(__file__).resolve().parents[1]
N_DISTINCT, REVIEWS_PER_DOC, N_COPIES, N_EXACT = 240, 30, 80, 10
BAD_LINES = [
    b'{"text": "\\u0000\\u0001\\u0002\\u0003\\u0004\\u0005 junk \\u0006\\u0007\\u0008\\u000e"}',  # binary junk
    b'{"text": "ok", "broken',  # malformed JSON
    b'{"text": "\xff\xfe bad utf8"}',  # invalid UTF-8
    b"\x89PNG\r\x1a\x00\x00binary",  # binary junk line: not UTF-8
    b"[1, 2, 3]",  # not an object
    b'{"title": "no text field"}',  # missing field
    b'{"text": ""}',  # empty
    b'{"text": "   \\n\\t  "}',  # whitespace only
]
PII_SENTENCES = [("주민등록번호 900101-1234568 로 가입했어요", "900101-1234568"), ("연락처 010-9876-5432", "010-9876-5432"),
                 ("메일 movie.fan@naver.com 으로 주세요", "movie.fan@naver.com"),
                 ("신한은행 110-123-456789 로 환불 부탁", "110-123-456789")]


def edit(text: str, rng: random.Random) -> str:
    """An edited copy: 1-3 word replacements, deletions or insertions, sometimes a punctuation change."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.4:
            words[i] = rng.choice(["정말", "진짜", "완전", "너무"])
        elif op < 0.7 and len(words) > 10:
            del words[i]
        else:
            words.insert(i, rng.choice(["그리고", "근데", "아무튼"]))
    out = " ".join(words)
    if rng.random() < 0.5:
        out = out.replace(".", "!", 1)
    if rng.random() < 0.3:
        out += "\n(퍼온 글)"
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("curate")
    src = base / "corpus"
    src.mkdir()
    with gzip.open(shared_data / "ko" / "nsmc" / "reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        reviews = [r for r in (json.loads(line)["text"].strip() for line in itertools.islice(f, 12000)) if len(r) > 8]
    rng = random.Random(7)
    docs = ["\n".join(reviews[i * REVIEWS_PER_DOC:(i + 1) * REVIEWS_PER_DOC]) for i in range(N_DISTINCT)]
    records = [{"text": d, "kind": "distinct", "group": i} for i, d in enumerate(docs)]
    records += [{"text": edit(docs[i], rng), "kind": "copy", "group": i} for i in range(N_COPIES)]
    exact_groups = range(N_COPIES, N_COPIES + N_EXACT)
    records += [{"text": "  " + docs[i].upper().replace("\n", " \n ") + " !!", "kind": "exact", "group": i}
                for i in exact_groups]
    with open(shared_data / "eval" / "kobest" / "boolq" / "dev.tsv", encoding="utf-8") as f:
        next(f)
        passage = next(f).split("\t")[1]
    sentence = next(s for s in passage.split(". ") if len(s.split()) >= 14)
    records.append({"text": f"{reviews[-1]}\n{sentence}.\n{reviews[-2]}", "kind": "kobest", "group": -1})
    for j, (sent, _value) in enumerate(PII_SENTENCES):
        records.append({"text": f"{reviews[-3 - j]} {sent} {reviews[-10 - j]}", "kind": "pii", "group": j})
    records += [
        {"text": "The quick brown fox jumps over the lazy dog. " * 3, "kind": "english", "group": 0},
        {"text": "안녕하세요, 반갑습니다 여러분".encode("utf-8").decode("cp1252", errors="replace"), "kind": "utf8_mojibake",
         "group": 0},
        {"text": "오늘 본 영화는 정말 재미있었다".encode("cp949").decode("latin-1"), "kind": "cp949_mojibake", "group": 0},
        {"text": "\u1112\u1161\u11ab\u1100\u1173\u11af 리뷰 NFD 😀", "kind": "nfd", "group": 0},
        {"text": "주민등록번호 900101-1234568 " + "가" * 1_200_000, "kind": "enormous", "group": 0},
    ]
    rng.shuffle(records)
    with open(src / "reviews.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (src / "bad.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")
    out = base / "out"
    card = prepare(str(src), out, recipe="clean", workers=2, tasks=4, vocab_size=400,
                   decontam=[str(shared_data / "eval" / "kobest")])
    return out, card, records


def read_jsonl_gz(folder: Path) -> list[dict]:
    rows = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh]
    return rows


@pytest.mark.slow
def test_accounting_identity(planted):
    out, card, records = planted
    assert card["identity"]["ok"], card["identity"]["failures"]
    steps = {s["step"]: s for s in card["steps"]}
    assert list(steps) == ["read", "normalize", "language", "decontaminate", "exact_dedup", "near_dedup", "pii"]
    assert steps["read"]["docs_in"] == len(records) + len(BAD_LINES)
    for s in card["steps"]:
        assert s["docs_in"] == s["docs_kept"] + sum(r["docs"] for r in s["removed"].values())
        assert s["chars_in"] == s["chars_kept"] + sum(r["chars"] for r in s["removed"].values())
    curated = read_jsonl_gz(out / "curated")
    assert len(curated) == card["totals"]["docs_curated"] == steps["pii"]["docs_kept"]
    assert check_identity(card["steps"], len(curated))["ok"]
    # every removal is in an exclusion file, with its reason
    for name, s in steps.items():
        if name == "read":
            continue
        removed = read_jsonl_gz(out / "removed" / name)
        assert len(removed) == s["docs_removed"]
        assert all(r["filter_reason"] in s["removed"] for r in removed)


@pytest.mark.slow
def test_bad_input_is_counted_by_name(planted):
    out, card, _ = planted
    steps = {s["step"]: s for s in card["steps"]}
    read = {k: v["docs"] for k, v in steps["read"]["removed"].items()}
    assert read == {"malformed_json": 1, "invalid_utf8": 2, "not_an_object": 1, "missing_field": 1, "empty": 2}
    norm = {k: v["docs"] for k, v in steps["normalize"]["removed"].items()}
    assert norm == {"binary_junk": 1, "too_long": 1}
    changes = steps["normalize"]["changes"]
    assert changes["mojibake_fixed"] >= 1 and changes["mojibake_cp949_fixed"] == 1
    assert steps["read"]["changes"]["nfc_changed"] == 1  # the corpus reader normalizes NFD at entry
    texts = {r["meta"]["kind"]: r["text"] for r in read_jsonl_gz(out / "curated")}
    assert texts["utf8_mojibake"] == "안녕하세요, 반갑습니다 여러분"
    assert texts["cp949_mojibake"] == "오늘 본 영화는 정말 재미있었다"
    assert texts["nfd"].startswith("한글 리뷰")


@pytest.mark.slow
def test_near_duplicates_found_without_false_merges(planted):
    out, card, _ = planted
    kept = {(r["meta"]["kind"], r["meta"]["group"]) for r in read_jsonl_gz(out / "curated")}
    removed = [(r["meta"]["kind"], r["meta"]["group"], r["removed_by"]) for name in ("exact_dedup", "near_dedup")
               for r in read_jsonl_gz(out / "removed" / name)]
    found = sum(1 for g in range(N_COPIES) if (("distinct", g) in kept) != (("copy", g) in kept))
    assert found / N_COPIES >= 0.95
    for kind, group, _step in removed:  # only planted copies (or their originals) were merged
        assert (kind == "copy" and group < N_COPIES) or kind == "exact" or (
            kind == "distinct" and group < N_COPIES + N_EXACT), (kind, group)
    for g in range(N_COPIES + N_EXACT):  # no cluster vanished entirely
        assert ("distinct", g) in kept or ("copy", g) in kept or ("exact", g) in kept
    assert all(("distinct", g) in kept for g in range(N_COPIES + N_EXACT, N_DISTINCT))
    exact = {g for k, g, step in removed if step == "exact_dedup"}
    assert exact == set(range(N_COPIES, N_COPIES + N_EXACT))  # case/space/punctuation variants are exact copies
    # the kept member of a planted pair knows its cluster size (for upsampling)
    sizes = {(r["meta"]["kind"], r["meta"]["group"]): r["minhash_cluster_size"] for r in read_jsonl_gz(out / "curated")}
    assert sum(1 for g in range(N_COPIES) if sizes.get(("distinct", g), sizes.get(("copy", g))) == 2) >= 0.95 * N_COPIES
    assert card["dedup"]["kept_in_clusters"] >= 0.95 * N_COPIES
    # the data card splits cluster sizes by length band; the planted pairs are long documents
    bands = card["dedup"]["cluster_size_by_band"]
    assert sum(sum(h.values()) for h in bands.values()) == card["totals"]["docs_curated"]
    long_pairs = sum(h.get("2", 0) for b, h in bands.items() if int(b.split("-")[0].rstrip("+")) >= 500)
    assert long_pairs == card["dedup"]["cluster_size_hist"]["2"] >= 0.95 * N_COPIES
    md = (out / "data_card.md").read_text(encoding="utf-8")
    assert "| length | documents | in a cluster (size > 1) |" in md


@pytest.mark.slow
def test_planted_kobest_sentence_removed(planted):
    out, card, _ = planted
    removed = read_jsonl_gz(out / "removed" / "decontaminate")
    assert [r["meta"]["kind"] for r in removed] == ["kobest"]
    assert removed[0]["contaminated_task"].startswith("kobest_boolq")
    assert card["decontamination"]["removed"] == 1 and card["decontamination"]["items_indexed"] > 20_000


@pytest.mark.slow
def test_pii_replaced_and_outputs_written(planted):
    out, card, _ = planted
    curated = read_jsonl_gz(out / "curated")
    pii_docs = [r for r in curated if r["meta"]["kind"] == "pii"]
    assert len(pii_docs) == len(PII_SENTENCES)
    for r in pii_docs:
        sentence, value = PII_SENTENCES[r["meta"]["group"]]
        assert value not in r["text"] and "<|" in r["text"]
    assert card["pii"] == {"account": 1, "email": 1, "phone": 1, "rrn": 1}
    assert {r["lang"] for r in curated} == {"ko", "en"}
    for name in ("data_card.md", "data_card.json", "length_hist.png", "cluster_sizes.png"):
        assert (out / name).is_file()
    assert (out / "length_hist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "data_card.md").read_text(encoding="utf-8")
    assert "identity" in md and "**holds**" in md and "too_long" in md and "near_duplicate" in md
    # the enormous document starts with a 주민등록번호: its removal example is shown redacted
    (example,) = next(s for s in card["steps"] if s["step"] == "normalize")["examples"]["too_long"]
    assert example["text"].startswith("주민등록번호 <|rrn|>")
    assert "900101-1234568" not in md and "900101-1234568" not in (out / "data_card.json").read_text(encoding="utf-8")
    meta = json.loads((out / "shards" / "meta.json").read_text(encoding="utf-8"))
    assert meta["docs"] == len(curated)
    assert (out / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_finished_run_is_not_redone(planted):
    out, card, _ = planted
    stamp = (out / "logs" / "filter" / "stats.json").stat().st_mtime_ns
    again = prepare(str(out.parent / "corpus"), out, recipe="clean", workers=1, tasks=4, vocab_size=400,
                    decontam=[str(Path(card["decontamination"]["sets"][0]))])
    assert again["totals"] == card["totals"]
    assert (out / "logs" / "filter" / "stats.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        prepare(str(out.parent / "corpus"), out, recipe="ko-web", tasks=4)


# ---------------------------------------------------------------------------------------------------------
# Resume after a failure, and the command line


# The kill-and-resume test (SIGKILL of a real `kfoundry data prepare` process, then the half-written output
# refused as a corpus and resumed) is tests/test_curate_scale.py::test_sigkilled_prepare_is_refused_as_a_corpus_then_resumes.


def test_corpus_of_only_bad_records(tmp_path):
    """Nothing usable: every record is counted under its reason, no stage fails, nothing is curated."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")
    card = prepare(str(src), tmp_path / "out", recipe="ko-web", tasks=2, decontam=[])
    assert card["identity"]["ok"] and card["totals"]["docs_curated"] == 0
    assert card["totals"]["docs_read"] == len(BAD_LINES) == card["totals"]["docs_removed"]
    assert "shards" not in card["outputs"]


def test_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, "-m", "kfoundry", "data", "prepare", "--out", str(tmp_path / "o")]
    for extra, message in ((["--corpus", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                           (["--corpus", "starter", "--recipe", "nope"], "unknown recipe"),
                           (["--corpus", "starter", "--executor", "slurm", "--no-decontam"], "partition"),
                           (["--corpus", "starter", "--decontam", str(tmp_path / "none")], "not found")):
        proc = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("kfoundry: error:") and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_cluster_executors_are_chained(tmp_path):
    """slurm and ray get the same stages, each depending on the one before (not run here)."""
    from kfoundry.data.curate import load_recipe
    from kfoundry.data.curate.finalize import Finalize
    from kfoundry.data.curate.stages import build_plan, make_executors

    plan = build_plan("starter", tmp_path, load_recipe("ko-web"), 8, decontam_index=None,
                      finalize=Finalize(tmp_path, {}))
    names = [s.name for s in plan.stages]
    assert names == ["ingest", "filter", "exact_find", "dedup", "buckets", "cluster", "final", "finalize"]
    assert [s.tasks for s in plan.stages] == [1, 8, 1, 8, 14, 1, 8, 1]
    slurm = make_executors(plan, "slurm", 64, {"partition": "cpu", "time": "04:00:00"})
    assert [type(e).__name__ for e in slurm] == ["SlurmPipelineExecutor"] * len(names)
    assert all(b.depends is a for a, b in zip(slurm, slurm[1:])) and slurm[0].depends is None
    ray = make_executors(plan, "ray", 16)
    assert all(b.depends is a for a, b in zip(ray, ray[1:]))


# ---------------------------------------------------------------------------------------------------------
# Near-duplicates in short text


def _minhash_removed(docs: list[str], tmp: Path, char_n_grams: int) -> tuple[set[int], dict[int, int]]:
    """Run datatrove's MinHash stages with our signature step on `docs` (one task); return the indices the
    cluster stage removes and the cluster size of each kept index that is in a cluster."""
    import struct

    from datatrove.data import Document
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster
    from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets

    from kfoundry.data.curate import load_recipe
    from kfoundry.data.curate.stages import ShingleMinhashSignature, minhash_config

    recipe = load_recipe("ko-web")
    cfg = minhash_config(recipe)
    sigs, buckets, remove = tmp / "sigs", tmp / "buckets", tmp / "remove"
    stages = [
        ([[Document(text=t, id=str(i)) for i, t in enumerate(docs)],
          ShingleMinhashSignature(str(sigs), config=cfg, char_n_grams=char_n_grams,
                                  char_max_chars=recipe.dedup.char_max_chars)], 1),
        ([MinhashDedupBuckets(str(sigs), str(buckets), config=cfg)], cfg.num_buckets),
        ([MinhashDedupCluster(str(buckets), str(remove), config=cfg, save_cluster_size=True)], 1),
    ]
    for k, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(tmp / f"logs{k}")).run()
    data = (remove / "000000.remove").read_bytes() if (remove / "000000.remove").exists() else b""
    removed = {x for (x,) in struct.iter_unpack("<I", data)}
    sizes = {}
    if (remove / "000000.sizes").exists():
        sizes = dict(struct.iter_unpack("<II", (remove / "000000.sizes").read_bytes()))
    return removed, sizes


def _syllable_edit(text: str, rng: random.Random) -> str:
    """One Hangul syllable changed to another, one syllable appended."""
    positions = [i for i, c in enumerate(text) if "가" <= c <= "힣"]
    i = rng.choice(positions)
    other = chr(rng.randrange(0xAC00, 0xD7A4))
    return text[:i] + other + text[i + 1:] + chr(rng.randrange(0xAC00, 0xD7A4))


@pytest.mark.slow
def test_short_near_copies_collapse_without_false_merges(tmp_path, shared_data):
    """200 NSMC reviews of >= 60 characters, each with a copy that has one syllable changed and one appended,
    among 5,000 other distinct reviews: character shingles collapse >= 95 % of the pairs and merge nothing
    else; FineWeb-2's word 5-grams (char_n_grams 0) miss most of the pairs."""
    from datatrove.data import Document

    from kfoundry.data.curate.stages import exact_key

    seen, reviews = set(), []
    with gzip.open(shared_data / "ko" / "nsmc" / "reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"].strip()
            key = exact_key(Document(text=text, id=""))
            if len(text) >= 60 and key not in seen:
                seen.add(key)
                reviews.append(text)
                if len(reviews) == 5200:
                    break
    rng = random.Random(11)
    distinct, held_out = reviews[:5000], reviews[5000:]
    docs = distinct + held_out + [_syllable_edit(t, rng) for t in held_out]
    pair = {5000 + i: 5200 + i for i in range(200)}  # original index -> copy index

    removed, sizes = _minhash_removed(docs, tmp_path / "char", 4)
    collapsed = sum(1 for a, b in pair.items() if (a in removed) != (b in removed))
    assert collapsed >= 0.95 * len(pair)
    assert removed <= set(pair) | set(pair.values())  # nothing among the 5,000 distinct reviews merged
    assert not any(a in removed and b in removed for a, b in pair.items())  # one of each pair survives
    assert sum(1 for a, b in pair.items() if sizes.get(a, sizes.get(b)) == 2) == collapsed

    word_removed, _ = _minhash_removed(docs, tmp_path / "word", 0)
    word_collapsed = sum(1 for a, b in pair.items() if (a in word_removed) != (b in word_removed))
    assert word_collapsed < 0.8 * len(pair), word_collapsed  # what today's word shingles miss


def test_char_shingles_ignore_spacing_and_handle_any_text():
    import numpy as np

    from kfoundry.data.curate.card import length_band
    from kfoundry.data.curate.stages import char_shingles

    a = char_shingles("재밌어요 정말 최고", 4)
    b = char_shingles("재밌어요정말   최고", 4)
    assert a.shape == (5, 1) and a.dtype == np.uint64 and np.array_equal(a, b)
    assert char_shingles("가나", 4).shape == (1, 1)  # shorter than n: the text itself is one shingle
    assert char_shingles("  \n ", 4).shape == (0, 1)
    mixed = "한글 English 123 😀"
    nfd = "\u1112\u1161\u11ab\u1100\u1173\u11af English 123 😀"  # NFD jamo are other code points than NFC
    assert len(set(char_shingles(mixed, 4).ravel()) & set(char_shingles(nfd, 4).ravel())) > 0
    assert len(set(char_shingles(mixed, 4).ravel())) == len(mixed.replace(" ", "")) - 3
    assert [length_band(n) for n in (0, 59, 60, 500, 1999, 10000, 10 ** 7)] == [
        "0-59", "0-59", "60-199", "500-1999", "500-1999", "10000+", "10000+"]
