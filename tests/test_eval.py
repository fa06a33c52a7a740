"""kfoundry.eval without a trained model: report math, the frontier table, the KoBEST pack and its prompts,
scoring arithmetic (off-by-one, truncation, shared contexts), the adapter's requests, contamination, the plugin."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kfoundry.checkpoint import save_checkpoint
from kfoundry.config import ModelConfig
from kfoundry.eval import contamination, frontier, kobest, scoring
from kfoundry.model.llama import Transformer
from kfoundry.text import nfc

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = [
    "대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있고, 모든 권력은 국민으로부터 나온다.",
    "모든 국민은 법 앞에 평등하다. 문장: 오늘 기분 최고 😀 긍부정: 긍정",
    "The quick brown fox jumps over the lazy dog. Python is a programming language.",
    "In 2026, 12,345 people 😀 visited Seoul; 오늘 날씨 좋네요 🎉 질문: 답변: 예 아니오",
] * 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-weight model with a real tokenizer, saved as a checkpoint (context 24 tokens, so truncation and
    rolling windows are exercised by short texts)."""
    from kfoundry.tokenizer import train_tokenizer

    tok = train_tokenizer(TRAIN_TEXT, 400)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=24, tie_embeddings=True, init_std=0.2)  # large init: clearly distinct logits
    model = Transformer.build(cfg, seed=0).eval()
    path = save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", model, tok)
    return model, tok, path


def direct_logprob(model, ctx, cont, max_len):
    """The reference: one plain forward over (ctx + cont) truncated as lm-eval does, no batching or packing."""
    full = (list(ctx) + list(cont))[-(max_len + 1):]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full[:-1]]))[0].float(), -1)
    rows = logp[-len(cont):]
    target = torch.tensor(cont)
    return float(rows.gather(-1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


# ------------------------------------------------------------------------------------------ report arithmetic


def test_chance_correction_percent_of_frontier_and_target():
    assert frontier.chance_corrected(0.25, 0.25) == 0.0
    assert frontier.chance_corrected(1.0, 0.25) == 1.0
    assert frontier.chance_corrected(0.625, 0.25) == pytest.approx(0.5)
    assert frontier.chance_corrected(0.10, 0.25) == pytest.approx(-0.2)  # below chance is negative, not clipped
    # KMMLU with a 78.32 anchor: a guesser is 0 %, the anchor itself is 100 %
    assert frontier.percent_of_frontier(0.25, 0.7832, 0.25) == pytest.approx(0.0)
    assert frontier.percent_of_frontier(0.7832, 0.7832, 0.25) == pytest.approx(100.0)
    assert frontier.percent_of_frontier(0.5166, 0.7832, 0.25) == pytest.approx(50.0, abs=1e-6)
    # 95 % target on the chance-corrected scale, and the points still missing
    assert frontier.target_score(0.7832, 0.25, 0.95) == pytest.approx(0.25 + 0.95 * 0.5332)
    assert frontier.distance_to_target(0.70, 0.7832, 0.25) == pytest.approx(0.25 + 0.95 * 0.5332 - 0.70)
    assert frontier.distance_to_target(0.80, 0.7832, 0.25) < 0  # target met
    # free-form (chance 0): a plain ratio
    assert frontier.percent_of_frontier(0.46, 0.92, 0.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="above chance"):
        frontier.percent_of_frontier(0.5, 0.2, 0.25)
    with pytest.raises(ValueError):
        frontier.chance_corrected(0.5, 1.0)


def test_averaging():
    # size-weighted (lm-eval weight_by_size) vs macro (every benchmark once)
    assert frontier.weighted_mean([0.5, 1.0], [300, 100]) == pytest.approx(0.625)
    assert frontier.macro_mean([0.5, 1.0]) == pytest.approx(0.75)
    se = frontier.pooled_stderr([0.02, 0.04], [300, 100])
    assert se == pytest.approx(math.sqrt((0.75 * 0.02) ** 2 + (0.25 * 0.04) ** 2))
    with pytest.raises(ValueError):
        frontier.weighted_mean([0.5], [1, 2])


def test_frontier_table_is_complete_and_cited():
    table = frontier.load_table()
    given = {  # the figures the project started from (percent)
        "kmmlu": {"GPT-4o": 72.5, "Qwen3-235B-A22B (without reasoning)": 73.6, "A.X 4.0": 78.3},
        "kmmlu_pro": {"GPT-4o": 67.0, "DeepSeek-V3.2": 72.1},
        "click": {"GPT-4o": 80.2, "DeepSeek-V3.2": 86.3},
        "haerae": {"Qwen2.5-72B": 80.8},
        "hrm8k": {"Qwen3-235B-A22B-Thinking": 92.0},
    }
    for key, anchors in given.items():
        bench = table.benchmarks[key]
        got = {a.model: 100 * a.score for a in bench.anchors}
        for model, score in anchors.items():
            assert got[model] == pytest.approx(score, abs=0.06), (key, model)
        for a in bench.anchors:
            assert a.source and set(frontier.PROTOCOL_KEYS) <= set(a.protocol), (key, a.model)
            assert a.verified or "not located" in a.source or a.note, (key, a.model)
    assert table.benchmarks["kmmlu"].chance == 0.25 and table.benchmarks["haerae"].chance == 0.20
    assert table.benchmarks["kmmlu"].anchor().model == "A.X 4.0"
    assert table.for_task("kobest_hellaswag").chance == 0.25 and table.for_task("nope") is None
    assert table.target_fraction == 0.95


def test_frontier_table_rejects_bad_entries(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text(yaml.safe_dump({"benchmarks": {"x": {"chance": 25, "anchors": [{"model": "m", "score": 120}]}}}))
    with pytest.raises(ValueError, match="percentage"):
        frontier.load_table(bad)
    bad.write_text(yaml.safe_dump({"benchmarks": {"x": {"chance": 25, "frontier_anchor": "zz",
                                                         "anchors": [{"model": "m", "score": 50}]}}}))
    with pytest.raises(ValueError, match="frontier_anchor"):
        frontier.load_table(bad)
    bad.write_text(yaml.safe_dump({"benchmarks": {"a": {"tasks": ["t"]}, "b": {"tasks": ["t"]}}}))
    with pytest.raises(ValueError, match="already claimed"):
        frontier.load_table(bad)


def test_report_rows_from_lm_eval_results():
    from kfoundry.eval.report import build_rows, summarize

    table = frontier.load_table()
    results = {
        "results": {
            "haerae": {"acc,none": 0.60, "acc_stderr,none": 0.01, "acc_norm,none": 0.55},
            "kobest_boolq": {"acc,none": 0.70, "acc_stderr,none": 0.02, "f1,none": 0.68, "f1_stderr,none": "N/A"},
            "kobest_copa": {"acc,none": 0.40, "acc_stderr,none": 0.02},
            "kobest": {"acc,none": 0.5, "acc_stderr,none": 0.015},
        },
        "group_subtasks": {"kobest": ["kobest_boolq", "kobest_copa"]},
        "n-shot": {"haerae": 0, "kobest_boolq": 5, "kobest_copa": 5, "kobest": 5},
        "n-samples": {"haerae": {"effective": 1500}, "kobest_boolq": {"effective": 100},
                      "kobest_copa": {"effective": 300}},
        "configs": {"haerae": {"test_split": "test"}, "kobest_boolq": {"validation_split": "validation",
                                                                      "metadata": {"split": "dev"}},
                    "kobest_copa": {"validation_split": "validation", "metadata": {"split": "dev"}}},
    }
    rows = {r["task"]: r for r in build_rows(results, table)}
    h = rows["haerae"]
    assert h["score"] == 0.60 and h["stderr"] == 0.01 and h["n"] == 1500 and h["split"] == "test"
    assert h["chance_corrected"] == pytest.approx(0.5)
    assert h["percent_of_frontier"] == pytest.approx(100 * 0.5 / ((0.808 - 0.2) / 0.8))
    assert h["distance_to_target"] == pytest.approx(0.2 + 0.95 * 0.608 - 0.60)
    assert h["other_metrics"] == {"acc_norm": 0.55}
    assert any("unverified" in w for w in h["warnings"]) and any("shots: not recorded" in w for w in h["warnings"])
    b = rows["kobest_boolq"]
    assert b["anchor"] is None and b["chance_corrected"] == pytest.approx(0.4) and b["other_metrics"]["f1"] == 0.68
    assert any("dev split" in w for w in b["warnings"])
    g = rows["kobest"]  # a group: size-weighted chance of its subtasks (both 50 %) and summed sizes
    assert g["group"] and g["n"] == 400 and g["chance"] == pytest.approx(0.5) and g["chance_corrected"] == 0.0
    s = summarize(list(rows.values()), 0.95)
    assert s["benchmarks_with_anchor"] == 1 and s["mean_percent_of_frontier"] == pytest.approx(h["percent_of_frontier"])
    assert s["benchmarks_at_target"] == 0


def test_protocol_warning_names_each_difference():
    a = frontier.Anchor("M", 0.8, "src", None, {"shots": 5, "mode": "chat", "metric": "acc"}, True)
    assert frontier.protocol_differences({"shots": 5, "mode": "chat", "metric": "acc"}, a) == []
    diffs = frontier.protocol_differences({"shots": 0, "mode": "base", "metric": "acc"}, a)
    assert diffs == ["shots: ours 0, M 5", "mode: ours base, M chat"]


# ------------------------------------------------------------------------------------------------ the KoBEST pack


def test_kobest_loader_maps_every_file(shared_data):
    root = shared_data / "eval" / "kobest"
    sizes = {"boolq": 700, "copa": 500, "wic": 610, "hellaswag": 500, "sentineg": 400}
    for subset, n_dev in sizes.items():
        dev = kobest.read_subset(root, subset, "validation")
        train = kobest.read_subset(root, subset, "train")
        assert len(dev) == n_dev and len(train) > n_dev
        labels = {d["label"] for d in dev + train}
        assert labels == (set(range(4)) if subset == "hellaswag" else {0, 1}), subset
        assert all(nfc(v) == v for d in dev for v in d.values() if isinstance(v, str))
    first = kobest.read_subset(root, "copa", "validation")[0]
    assert first == {"premise": "전쟁이 시작되었다.", "question": "결과", "alternative_1": "병사들이 집으로 돌아왔다.",
                     "alternative_2": "병사들이 전투에 파견되었다.", "label": 1}  # Answer 2 -> label 1
    # sentineg's train and dev files order their columns differently; both map by name
    assert kobest.read_subset(root, "sentineg", "train")[0]["sentence"].strip()
    with pytest.raises(ValueError, match="unknown KoBEST subset"):
        kobest.read_subset(root, "nope", "train")


def test_kobest_tsv_quirks(tmp_path, mixed_texts):
    assert kobest.unquote_field('"거꾸로된 ""v"" 모양"') == '거꾸로된 "v" 모양'  # CSV-quoted
    assert kobest.unquote_field('"국제시장"은 영화이다') == '"국제시장"은 영화이다'  # raw, keeps its quotes
    assert kobest.unquote_field('"a" and "b"') == '"a" and "b"'
    d = tmp_path / "sentineg"
    d.mkdir()
    rows = [t.replace("\t", " ") for t in mixed_texts if t]
    (d / "dev.tsv").write_text("ID\tLabel\tText\n" + "".join(f"{i}\t{i % 2}\t{t}\n" for i, t in enumerate(rows)),
                               encoding="utf-8")
    docs = kobest.read_subset(tmp_path, "sentineg", "validation")
    assert [x["sentence"] for x in docs] == [nfc(t) for t in rows]  # NFD Hangul arrives composed
    (d / "dev.tsv").write_text("ID\tLabel\tText\n1\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"dev.tsv:2: 2 columns"):
        kobest.read_subset(tmp_path, "sentineg", "validation")
    (d / "dev.tsv").write_text("ID\tLabel\tText\n1\t7\tx\n", encoding="utf-8")
    with pytest.raises(ValueError, match="out of range"):
        kobest.read_subset(tmp_path, "sentineg", "validation")


def test_prompts_match_lm_eval_kobest(shared_data):
    """Our prompt functions render exactly what lm-eval's kobest utilities render, on every dev document."""
    from lm_eval.tasks.kobest import utils as upstream

    root = shared_data / "eval" / "kobest"
    copa = kobest.read_subset(root, "copa", "validation")
    for d in copa:
        assert kobest.copa_doc_to_text(d) == upstream.copa_doc_to_text(d)
        assert kobest.copa_doc_to_target(d) == upstream.copa_doc_to_target(d)
        assert kobest.copa_doc_to_choice(d) == upstream.copa_doc_to_choice(d)
    for d in kobest.read_subset(root, "wic", "validation"):
        assert kobest.wic_doc_to_text(d) == upstream.wic_doc_to_text(d)
    for d in kobest.read_subset(root, "sentineg", "validation"):
        assert kobest.sentineg_doc_to_text(d) == upstream.sentineg_doc_to_text(d)
    import datasets

    hs = datasets.Dataset.from_list(kobest.read_subset(root, "hellaswag", "validation")[:50])
    assert list(kobest.hellaswag_process_docs(hs)) == list(upstream.hellaswag_process_doc(hs))


def test_pack_yaml_matches_lm_eval_kobest():
    """Same task names, templates, choices, metrics and aggregations as lm-eval's kobest YAMLs; only the data
    source (and the evaluated split: dev, since test is not distributed) differ."""
    from lm_eval.tasks._yaml_loader import load_yaml

    import lm_eval

    ours_dir = ROOT / "kfoundry" / "eval" / "tasks" / "kobest"
    theirs_dir = Path(lm_eval.__file__).parent / "tasks" / "kobest"
    for name in ("boolq", "copa", "wic", "hellaswag", "sentineg"):
        ours = load_yaml(ours_dir / f"kobest_{name}.yaml", resolve_func=False, recursive=True)
        theirs = load_yaml(theirs_dir / f"kobest_{name}.yaml", resolve_func=False, recursive=True)
        assert ours["task"] == theirs["task"] and ours["output_type"] == theirs["output_type"]
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
            a, b = ours[key], theirs[key]
            if "/" in str(b):  # a !function reference: compare the function names (bodies: test above)
                a, b = str(a).rsplit(".", 1)[-1], str(b).rsplit(".", 1)[-1]
            assert a == b, (name, key)
        assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in theirs["metric_list"]]
        assert ours["training_split"] == theirs["training_split"] == "train"
    group = load_yaml(ours_dir / "_kobest.yaml", resolve_func=False)
    upstream_group = load_yaml(theirs_dir / "_kobest.yaml", resolve_func=False)
    assert group["task"] == upstream_group["task"]
    assert group["aggregate_metric_list"] == upstream_group["aggregate_metric_list"]


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    for k in (2, 4):
        for _ in range(20):
            golds = [rng.randrange(k) for _ in range(rng.randint(1, 40))]
            preds = [rng.randrange(k) for _ in golds]
            assert kobest.macro_f1(list(zip(golds, preds))) == pytest.approx(f1_score(golds, preds, average="macro"))
    assert kobest.macro_f1([(1, 1), (1, 1)]) == 1.0
    with pytest.raises(ValueError):
        kobest.macro_f1([])


# --------------------------------------------------------------------------------------------------- scoring


def test_scoring_matches_plain_forward_in_every_layout(tiny):
    """Packed shared contexts, right padding, truncation from the left, one-token contexts and continuations:
    every request scores what a plain forward of that single request gives."""
    model, _, _ = tiny
    L = model.cfg.max_seq_len
    rng = random.Random(1)
    V = model.cfg.vocab_size
    requests = [([5], [7]), ([0], [9, 10, 11])]  # one-token context (BOS-like), one- and multi-token answers
    for _ in range(15):
        ctx = [rng.randrange(V) for _ in range(rng.randint(1, 40))]  # often longer than the context (24)
        for _ in range(rng.randint(1, 4)):  # choices sharing that context
            requests.append((ctx, [rng.randrange(V) for _ in range(rng.randint(1, 8))]))
    requests.append(([1, 2, 3], []))  # empty continuation: probability 1
    got = scoring.score(model, requests, token_budget=150, max_rows=3)
    for (ctx, cont), (logp, greedy) in zip(requests, got):
        if not cont:
            assert (logp, greedy) == (0.0, True)
            continue
        ref_logp, ref_greedy = direct_logprob(model, ctx, cont, L)
        assert logp == pytest.approx(ref_logp, abs=1e-4) and greedy == ref_greedy
    with pytest.raises(ValueError, match="non-empty context"):
        scoring.score(model, [([], [1])])


def test_continuation_longer_than_the_context_is_scored_in_pieces(tiny):
    """lm-eval's `hf` model refuses a continuation longer than the context; we score it in chunks, each with as
    much preceding text as fits, and add them up (chain rule)."""
    model, _, _ = tiny
    L = model.cfg.max_seq_len
    ctx, cont = list(range(3, 13)), [(7 * i) % 300 + 3 for i in range(2 * L + 5)]
    pieces = scoring.split_request(ctx, cont, L)
    full = ctx + cont
    assert [t for _, k in pieces for t in k] == cont  # every continuation token exactly once
    at = len(ctx)
    for c, k in pieces:
        assert len(c) + len(k) - 1 <= L and 1 <= len(c)  # fits the model
        assert list(c) == full[at - len(c):at]  # conditioned on exactly the text before it
        at += len(k)
    assert len(pieces) == 3 and len(pieces[0][1]) == L
    (logp, greedy), = scoring.score(model, [(ctx, cont)])
    parts = [direct_logprob(model, c, k, L) for c, k in pieces]
    assert logp == pytest.approx(sum(p[0] for p in parts), abs=1e-3) and greedy == all(p[1] for p in parts)
    # a continuation that fits is one piece, truncated exactly as lm-eval's hf model does
    assert scoring.split_request(list(range(40)), [1, 2], L) == [(tuple(range(40))[-(L - 1):], (1, 2))]


def test_shared_context_is_run_once():
    groups = scoring.group_requests([([1, 2, 3], [4]), ([1, 2, 3], [5, 6]), ([9], [4]), ([1, 2, 3], [7, 8, 9])], 64)
    assert [g.context for g in groups] == [(1, 2, 3), (9,)]
    assert groups[0].length == 3 + 0 + 1 + 2  # context once, then each answer minus its last token
    # longest row first; a batch holds rows x (its first, longest row) padded tokens
    assert scoring.batches(groups, token_budget=12, max_rows=8) == [[groups[0], groups[1]]]
    assert scoring.batches(groups, token_budget=11, max_rows=8) == [[groups[0]], [groups[1]]]
    assert scoring.batches(groups, token_budget=100, max_rows=1) == [[groups[0]], [groups[1]]]


def test_rolling_windows_match_lm_eval():
    import lm_eval.utils as U

    for n in range(0, 70):
        toks = list(range(10, 10 + n))
        ours = scoring.rolling_windows(toks, 0, 16)
        theirs = [U.make_disjoint_window(w) for w in U.get_rolling_token_windows(toks, 0, 16, 1)]
        assert [(list(a), list(b)) for a, b in theirs] == ours
        assert [t for _, cont in ours for t in cont] == toks  # every token predicted exactly once


# --------------------------------------------------------------------------------------------------- adapter


def test_adapter_requests(tiny, mixed_texts):
    from lm_eval.api.instance import Instance

    from kfoundry.eval.lm import KFoundryLM

    model, tok, path = tiny
    lm = KFoundryLM(model=str(path), device="cpu", batch_size=4)
    L = lm.max_length
    assert lm.prefix_token_id == tok.bos_id and lm.eot_token_id == tok.eos_id
    # tokenization: BOS first, not twice when the text already starts with it
    assert lm.tok_encode("안녕") == [tok.bos_id, *tok.encode("안녕")]
    assert lm.tok_encode("<|begin_of_text|>안녕") == [tok.bos_id, *tok.encode("안녕")]
    assert lm.tok_encode("안녕", add_special_tokens=False) == tok.encode("안녕")

    def req(kind, *args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    texts = [t for t in mixed_texts if t]
    pairs = [("", texts[0][:10]), (texts[2], " 예"), (texts[3] + " ", "아니오"), (texts[4], texts[1][:12])]
    got = lm.loglikelihood([req("loglikelihood", c, k) for c, k in pairs], disable_tqdm=True)
    # empty context: conditioned on BOS alone
    assert got[0][0] == pytest.approx(direct_logprob(model, [tok.bos_id], tok.encode(texts[0][:10]), L)[0], abs=1e-4)
    # trailing space moves to the continuation; continuation tokens are those after the context's in the whole
    ctx, cont = texts[3], " 아니오"
    whole, c_ids = lm.tok_encode(ctx + cont), lm.tok_encode(ctx)
    assert got[2][0] == pytest.approx(direct_logprob(model, c_ids, whole[len(c_ids):], L)[0], abs=1e-4)
    # rolling: a short text is one window from BOS; a long one is split, and the total is the sum of its windows
    short, long = texts[2][:10], " ".join(texts) * 2
    r = lm.loglikelihood_rolling([req("loglikelihood_rolling", short), req("loglikelihood_rolling", long)],
                                 disable_tqdm=True)
    ids = tok.encode(short)
    assert r[0] == pytest.approx(direct_logprob(model, [tok.bos_id], ids, L)[0], abs=1e-4)
    ids = tok.encode(long)
    assert len(ids) > 2 * L
    expected = sum(direct_logprob(model, c, k, L)[0] for c, k in scoring.rolling_windows(ids, tok.bos_id, L))
    assert r[1] == pytest.approx(expected, abs=1e-3)


def test_adapter_generate_until_batches_and_stops(tiny):
    from lm_eval.api.instance import Instance

    from kfoundry.eval.lm import KFoundryLM
    from kfoundry.model.generate import SamplingParams, generate

    model, tok, path = tiny
    lm = KFoundryLM(model=str(path), device="cpu", batch_size=3)
    prompts = ["대한민국은", "The quick", "오늘 😀", "In 2026,"]
    kw = {"until": [], "max_gen_toks": 8}
    out = lm.generate_until([Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts)],
                            disable_tqdm=True)
    for p, text in zip(prompts, out):  # batched (with left padding) == one prompt at a time
        alone = generate(model, [lm.tok_encode(p)], SamplingParams(max_new_tokens=8),
                         stop_ids={tok.eos_id, tok.eot_id}, pad_id=tok.pad_id)[0]
        assert text == tok.decode(alone, skip_special=True)
    full = next(t for t in out if len(t) >= 4)
    stop = full[2:4]
    cut = lm.generate_until([Instance("generate_until", {}, (prompts[out.index(full)], {"until": [stop],
                                                                                         "max_gen_toks": 8}), 0)],
                            disable_tqdm=True)
    assert cut == [full[: full.find(stop)]]


def test_adapter_rejects_bad_arguments(tiny):
    from kfoundry.eval.lm import KFoundryLM

    with pytest.raises(ValueError, match="model=CHECKPOINT_DIR"):
        KFoundryLM()
    with pytest.raises(ValueError, match="dtype"):
        KFoundryLM(model=str(tiny[2]), dtype="int3")
    with pytest.raises(FileNotFoundError):
        KFoundryLM(model="/nonexistent/ckpt")


# ----------------------------------------------------------------------------------------------- contamination


def test_ngram_hashes_and_planted_overlap(tiny, tmp_path, mixed_texts):
    from kfoundry.data.shards import write_shards
    from kfoundry.corpus import Document

    _, tok, _ = tiny
    h = contamination.ngram_hashes(np.array([1, 2, 3, 1, 2, 3]), 3)
    assert len(h) == 4 and h[0] == h[3] and len(set(h.tolist())) == 3
    assert len(contamination.ngram_hashes(np.array([1, 2]), 3)) == 0
    assert contamination.ngram_hashes(np.array([0, 0, 1]), 2)[0] != contamination.ngram_hashes(np.array([0, 1]), 2)[0]
    secret = "비밀 문서의 문장은 훈련 데이터에 그대로 들어 있었다. The leaked benchmark answer is 42, 틀림없이."
    # the secret twice: a split left empty borrows one document, the other copy stays in train
    docs = [Document(text=nfc(t), id=f"d{i}", source="test", lang="ko") for i, t in enumerate(
        [t for t in mixed_texts if t] * 3 + [secret, secret])]
    meta = write_shards(iter(docs), tok, tmp_path / "shards", val_fraction=0.0, seed=0)
    shard_dir = tmp_path / "shards"
    report = contamination.check({"leaky": [{"q": secret, "choices": ["a", "b"]}, {"q": "전혀 다른 새 질문입니다 ???"}],
                                  "clean": [{"q": "모델이 본 적 없는 아주 새로운 질문 문장 하나"}]},
                                 tok, shard_dir, n=8)
    assert report["leaky"]["documents"] == 2 and report["leaky"]["documents_flagged"] == 1
    assert report["clean"]["documents_flagged"] == 0 and report["clean"]["ngram_overlap"] == 0.0
    grouped = contamination.add_groups(report, {"all": ["leaky", "clean"]})
    assert grouped["all"]["documents"] == 3 and grouped["all"]["documents_flagged"] == 1
    assert meta["splits"]["train"]["docs"] >= len(docs) - 1


def test_contamination_refuses_other_tokenizers_shards(tiny, tmp_path):
    from kfoundry.tokenizer import train_tokenizer

    other = train_tokenizer(["완전히 다른 말뭉치 other corpus"] * 50, 300)
    from kfoundry.corpus import Document
    from kfoundry.data.shards import write_shards

    write_shards(iter([Document(text="짧은 글 short", id=f"a{i}", source="t", lang="ko") for i in range(2)]), other,
                 tmp_path / "s", val_fraction=0.0, seed=0)
    with pytest.raises(ValueError, match="tokenizer"):
        contamination.check({"t": [{"q": "x"}]}, tiny[1], tmp_path / "s")


# -------------------------------------------------------------------------------------------------- plugin


def test_plugin_hook_registers_kfoundry_and_keeps_builtins(tmp_path):
    """The .pth start-up hook (what `kfoundry eval --install-lm-eval-plugin` installs) makes lm-eval's own
    registry resolve `kfoundry`, lazily, while `hf` still resolves. Run in a fresh interpreter whose extra site
    directory holds the .pth, so the real environment is untouched."""
    from kfoundry.eval.plugin import install_startup_hook

    pth = install_startup_hook(tmp_path)
    assert pth.read_text().startswith("import ")
    code = ("import site, sys; site.addsitedir(sys.argv[1])\n"
            "from lm_eval.api.registry import get_model, model_registry\n"
            "assert 'kfoundry.eval.lm' not in sys.modules  # lazy until asked for\n"
            "cls = get_model('kfoundry'); print(cls.__module__, cls.__name__)\n"
            "assert 'hf' in model_registry and 'vllm' in model_registry\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "kfoundry.eval.lm KFoundryLM"
