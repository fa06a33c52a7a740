"""The model card: `README.md` with Hugging Face metadata, in English and in Korean, written by `export hf`.

Nothing in it is typed by hand. Every number is read from what the run recorded:

    intended use        from the checkpoint's stage (a base model, or a chat model after SFT/DPO)
    data                the ledger's `data` entries on the lineage: sources, licences, curation recipe, tokens
    training compute    per stage on the lineage: tokens (ledger), FLOPs (metrics.jsonl's FLOPs per token x
                        tokens), hardware and time (metrics.jsonl)
    evaluation          the ledger's `evaluation` entries for these weights (or RUN/eval/*.json), with the
                        distance to the frontier
    provenance          the lineage from random initialisation (or from external weights), the weights hash and
                        the ledger head hashes, which pin the history once the card is published
    limitations         what a model of this size and data can and cannot be trusted with

A field the run did not record is written as "not recorded"; the card never guesses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from kfoundry.checkpoint import load_config, read_meta
from kfoundry.fileio import atomic_write_text, read_json
from kfoundry.model.llama import Transformer
from kfoundry.provenance import ledger
from kfoundry.provenance.record import resolve_in, run_dir_of, weights_digest
from kfoundry.provenance.verify import Node, format_lineage, lineage, origin_of

CHAT_STAGES = {"sft", "dpo"}


# ------------------------------------------------------------------------------------------------- gathering


def _entries_of(run_dir: str) -> dict[str, dict[str, Any]]:
    return ledger.by_hash(ledger.read(run_dir))


def _read_metrics(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The first `start` and last `end` events of a run's metrics.jsonl."""
    out: dict[str, dict[str, Any]] = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("event") == "start":
            out.setdefault("start", rec)
        elif rec.get("event") == "end":
            out["end"] = rec
    return out


def gather(ckpt: str | Path) -> dict[str, Any]:
    """Everything the card shows, as plain data (also what `card.json`-style consumers would want)."""
    ckpt = Path(ckpt).resolve()
    cfg = load_config(ckpt)
    with torch.device("meta"):
        n_params = Transformer(cfg).num_params()
    meta = read_meta(ckpt)
    nodes = lineage(ckpt)
    flat = _flatten(nodes)
    chain_problems = []
    for rd in dict.fromkeys(n.run_dir for n in flat if n.run_dir):
        chain_problems += ledger.check_chain(rd)

    data, compute, seen_data = [], [], set()
    runs: dict[str, dict[str, Any]] = {}
    for n in flat:
        if n.kind != "checkpoint" or not n.run_dir:
            continue
        run = runs.setdefault(n.run_dir, {"stage": n.info.get("stage"), "tokens": 0, "step": 0})
        run["tokens"] = max(run["tokens"], n.info.get("tokens") or 0)
        run["step"] = max(run["step"], n.info.get("step") or 0)
        entry = _entries_of(n.run_dir).get(n.info.get("data") or "")
        # the same shards trained on again (continued pretraining) are listed once
        if entry and (entry.get("shards") or {}).get("meta_sha256") not in seen_data:
            seen_data.add((entry.get("shards") or {}).get("meta_sha256"))
            data.append({k: entry.get(k) for k in ("corpus", "sources", "curation", "shards")})
    for rd, run in runs.items():
        m = _read_metrics(Path(rd))
        start, end = m.get("start", {}), m.get("end", {})
        fpt = start.get("flops_per_token")
        flops = fpt * run["tokens"] if fpt and run["tokens"] else (6.0 * n_params * run["tokens"] or None)
        compute.append({"run": rd, "stage": run["stage"], "tokens": run["tokens"], "steps": run["step"],
                        "flops": flops, "flops_estimate": "measured FLOPs per token x tokens" if fpt else "6 N D",
                        "device": start.get("device"), "world_size": start.get("world_size"),
                        "peak_source": start.get("peak_source"), "train_seconds": end.get("train_seconds")})
    compute.reverse()  # origin first

    weights = weights_digest(ckpt)
    evaluations = _evaluations(ckpt, weights, flat)
    external = next((n.info for n in flat if n.kind == "external"), None)
    origin = origin_of(nodes) or "origin-unknown"
    heads = {rd: ledger.head(rd) for rd in dict.fromkeys(n.run_dir for n in flat if n.run_dir)}
    return {"name": ckpt.name if ckpt.parent.name != "ckpt" else ckpt.parent.parent.name,
            "checkpoint": str(ckpt), "stage": meta.get("stage"), "params": n_params, "config": cfg,
            "weights_sha256": weights, "origin": origin, "external": external, "lineage": nodes,
            "chain_ok": not chain_problems, "chain_problems": chain_problems, "ledger_heads": heads,
            "data": data, "compute": compute, "evaluations": evaluations}


def _flatten(nodes: list[Node]) -> list[Node]:
    out = []
    for n in nodes:
        out.append(n)
        for b in n.branches:
            out += _flatten(b)
    return out


def _evaluations(ckpt: Path, weights: str | None, flat: list[Node]) -> list[dict[str, Any]]:
    """Evaluations of exactly these weights: ledger entries first, else eval.json files in the run's eval/."""
    found: list[dict[str, Any]] = []
    for rd in dict.fromkeys([str(run_dir_of(ckpt))] + [n.run_dir for n in flat if n.run_dir]):
        for e in ledger.read(rd):
            if e.get("kind") == "evaluation" and weights and e.get("weights_sha256") == weights:
                found.append({"tasks": e.get("tasks") or [], "bpb": e.get("bpb") or {},
                              "summary": e.get("summary") or {}, "protocol": e.get("protocol"),
                              "source": f"ledger {rd}"})
    if found:
        return found
    eval_dir = run_dir_of(ckpt) / "eval"
    for f in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        try:
            payload = read_json(f)
        except (json.JSONDecodeError, OSError):
            continue
        if isinstance(payload, dict) and payload.get("model") and \
                resolve_in(run_dir_of(ckpt), payload["model"]).resolve() == ckpt:
            bpb = {k: (v.get("bpb") if isinstance(v, dict) else v) for k, v in (payload.get("bpb") or {}).items()}
            found.append({"tasks": payload.get("tasks") or [], "bpb": bpb, "summary": payload.get("summary") or {},
                          "protocol": payload.get("protocol"), "source": str(f)})
    return found


# ------------------------------------------------------------------------------------------------- rendering


def _num(v: Any, fmt: str = "{:,}") -> str:
    return fmt.format(v) if isinstance(v, (int, float)) and v is not None else "—"


def _sources_rows(data: list[dict[str, Any]], unknown: str) -> list[str]:
    rows = []
    for d in data:
        for s in d.get("sources") or [{"source": d.get("corpus"), "licence": None}]:
            rows.append(f"| `{s.get('source')}` | {s.get('kind', '—')} | {s.get('licence') or unknown} | "
                        f"{_num(s.get('weight'), '{:g}')} |")
    return rows


def _recipe_name(recipe: Any) -> str:
    """A curation recipe by name (the full recipe is in the data card the ledger hashes)."""
    if isinstance(recipe, dict):
        return str(recipe.get("name") or "custom")
    return str(recipe)


def _compute_rows(compute: list[dict[str, Any]]) -> list[str]:
    rows = []
    for c in compute:
        hw = c.get("device") or "—"
        if c.get("world_size") and c["world_size"] > 1:
            hw += f" x {c['world_size']}"
        secs = c.get("train_seconds")
        rows.append(f"| {c.get('stage')} | {_num(c.get('tokens'))} | {_num(c.get('steps'))} | "
                    f"{_num(c.get('flops'), '{:.3g}')} | {hw} | {_num(secs, '{:,.1f}')} |")
    return rows


def _eval_rows(ev: dict[str, Any]) -> list[str]:
    rows = []
    for t in ev.get("tasks") or []:
        score = t.get("score")
        pct = t.get("percent_of_frontier")
        shown = _num(score * 100 if score is not None else None, "{:.1f}")
        rows.append(f"| {t.get('task')} | {t.get('metric')} | {shown} | {_num(pct, '{:.1f}')} |")
    for lang, bpb in (ev.get("bpb") or {}).items():
        rows.append(f"| bits per byte ({lang}) | bpb | {_num(bpb, '{:.3f}')} | — |")
    return rows


# Every sentence of the card, in English and in Korean. One renderer (`_render_half`) lays out either language
# from its table, so the two halves always have the same sections, tables and facts. `{name}` fields are filled
# in with str.format; a template without fields is used as it is.
CARD_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "# {name}",
        "intro": "A {params:,}-parameter Llama-style decoder ({n_layers} layers, hidden size {dim}, {n_heads} "
                 "attention heads ({n_kv_heads} key/value), context {ctx}, vocabulary {vocab}) built with kfoundry, "
                 "a Korean-first foundry. {origin}",
        "origin_init": "Trained from random initialisation: no external weights appear anywhere in its lineage.",
        "origin_external": "Derived from external weights ({name}); this is not a from-scratch model.",
        "origin_unknown": "The origin of its lineage is not recorded (a checkpoint made before the ledger existed); "
                          "no claim of from-scratch training can be backed.",
        "use_heading": "## Intended use",
        "use_chat": "A chat model: prompts should use the chat template shipped in `tokenizer_config.json` "
                    "(`tokenizer.apply_chat_template`).",
        "use_base": "A base (pretrained) language model: it continues text and is meant for research, teaching, and "
                    "as a starting point for fine-tuning. It is not instruction-tuned.",
        "not_for": "Not intended for decisions about people, medical, legal or financial advice, or any use where an "
                   "unverified answer can cause harm.",
        "data_heading": "## Training data",
        "data_columns": "| source | kind | licence | mix weight |",
        "licence_unknown": "not declared — check before redistributing",
        "data_none": "| not recorded | | | |",
        "curated": "Curated with `kfoundry data prepare` (recipe: `{recipe}`; data card sha256 `{card}`).",
        "shards": "Token shards: {tokens} tokens in {docs} documents, {files} files, each hashed in the ledger.",
        "compute_heading": "## Training compute",
        "compute_columns": "| stage | tokens | steps | FLOPs | hardware | seconds |",
        "compute_none": "| not recorded | | | | | |",
        "flops_note": "FLOPs are measured FLOPs per token (6 per weight plus attention) times tokens seen.",
        "eval_heading": "## Evaluation",
        "eval_columns": "| task | metric | score (%) | % of frontier |",
        "frontier": "On {n} benchmark(s) with a frontier anchor the model reaches {mean:.1f}% of the frontier score "
                    "(chance-corrected): a gap of {gap:.1f} points.",
        "no_frontier": "No benchmark with a frontier anchor was run, so no frontier gap is computed.",
        "not_evaluated": "Not evaluated yet: run `kfoundry eval --model CKPT --tasks ...` before publishing.",
        "provenance_heading": "## Provenance",
        "weights": "Weights sha256: `{sha}`",
        "lineage": "Lineage (origin first):",
        "chain": "Ledger chain: {status}. Head hashes (publishing them pins the whole history before them):",
        "chain_ok": "intact",
        "chain_broken": "BROKEN: {problems}",
        "check": "Check it yourself: `kfoundry provenance verify CHECKPOINT` re-hashes every recorded file and "
                 "re-derives the initial weights from the recorded seed; `kfoundry provenance audit --model THIS "
                 "--against OTHER` compares weight fingerprints with any other model.",
        "limits_heading": "## Limitations",
        "limit_small": "- A small model: it produces fluent-looking text with frequent factual errors and little "
                       "reasoning.",
        "limit_large": "- It can state false things fluently; verify important answers.",
        "limit_data": "- It reflects its training data, including its biases and gaps; the sources are listed above.",
        "limit_languages": "- Korean and English only; other languages were not a training goal.",
        "limit_safety": "- No safety tuning beyond what the lineage shows; add your own safeguards before deploying.",
    },
    "ko": {
        "title": "# {name} (한국어)",
        "intro": "kfoundry로 만든 라마(Llama) 구조의 디코더 모델로, 파라미터는 {params:,}개입니다 (레이어 {n_layers}개, "
                 "은닉 차원 {dim}, 어텐션 헤드 {n_heads}개(키/값 {n_kv_heads}개), 문맥 길이 {ctx}, 어휘 {vocab}개). "
                 "{origin}",
        "origin_init": "무작위 초기화에서 시작해 처음부터 학습했습니다. 외부 가중치는 계보 어디에도 없습니다.",
        "origin_external": "외부 가중치({name})에서 파생된 모델입니다. 처음부터 학습한 모델이 아닙니다.",
        "origin_unknown": "계보의 시작점이 기록되어 있지 않습니다(원장 이전에 만들어진 체크포인트). 처음부터 학습했다고 "
                          "주장할 근거가 없습니다.",
        "use_heading": "## 사용 목적",
        "use_chat": "대화형 모델입니다. 프롬프트는 `tokenizer_config.json`에 들어 있는 채팅 템플릿"
                    "(`tokenizer.apply_chat_template`)으로 구성해야 합니다.",
        "use_base": "사전학습만 마친 기반(base) 언어 모델입니다. 주어진 글을 이어 쓰며, 연구와 교육, 그리고 미세조정의 "
                    "출발점으로 쓰기 위한 모델입니다. 지시 따르기 학습은 하지 않았습니다.",
        "not_for": "사람에 대한 판단, 의료·법률·금융 조언처럼 검증되지 않은 답이 피해를 줄 수 있는 용도에는 쓰지 마십시오.",
        "data_heading": "## 학습 데이터",
        "data_columns": "| 출처 | 종류 | 라이선스 | 혼합 비율 |",
        "licence_unknown": "명시되지 않음 — 재배포 전 확인 필요",
        "data_none": "| 기록 없음 | | | |",
        "curated": "`kfoundry data prepare`로 정제했습니다(레시피: `{recipe}`, 데이터 카드 sha256 `{card}`).",
        "shards": "토큰 샤드: 문서 {docs}개, 토큰 {tokens}개, 파일 {files}개이며 파일마다 해시가 원장에 기록되어 있습니다.",
        "compute_heading": "## 학습 연산량",
        "compute_columns": "| 단계 | 토큰 | 스텝 | FLOPs | 하드웨어 | 시간(초) |",
        "compute_none": "| 기록 없음 | | | | | |",
        "flops_note": "FLOPs는 토큰당 실측 연산량(가중치당 6회 + 어텐션)에 학습한 토큰 수를 곱한 값입니다.",
        "eval_heading": "## 평가",
        "eval_columns": "| 과제 | 지표 | 점수(%) | 프런티어 대비(%) |",
        "frontier": "기준점이 있는 벤치마크 {n}개 평균으로 프런티어 모델 점수의 {mean:.1f}% (찬스 보정) 수준이며, "
                    "격차는 {gap:.1f}%p입니다.",
        "no_frontier": "프런티어 기준점이 있는 벤치마크가 없어 격차를 계산하지 않았습니다.",
        "not_evaluated": "아직 평가하지 않았습니다. 공개하기 전에 `kfoundry eval --model CKPT --tasks ...`를 실행하십시오.",
        "provenance_heading": "## 출처 증명(프로비넌스)",
        "weights": "가중치 sha256: `{sha}`",
        "lineage": "계보(시작점부터):",
        "chain": "원장 해시 체인: {status}. 아래 마지막(head) 해시를 공개해 두면 그 이전의 기록 전체가 고정됩니다.",
        "chain_ok": "이상 없음",
        "chain_broken": "손상됨: {problems}",
        "check": "직접 확인하는 방법: `kfoundry provenance verify 체크포인트`는 기록된 모든 파일의 해시를 다시 계산하고, "
                 "기록된 시드로 초기 가중치를 다시 만들어 비교합니다. `kfoundry provenance audit --model 이_모델 "
                 "--against 다른_모델`은 임의의 다른 모델과 가중치 지문을 비교합니다.",
        "limits_heading": "## 한계",
        "limit_small": "- 작은 모델입니다. 그럴듯한 문장을 만들지만 사실 오류가 잦고 추론 능력은 거의 없습니다.",
        "limit_large": "- 틀린 내용을 자연스럽게 말할 수 있습니다. 중요한 답은 반드시 확인하십시오.",
        "limit_data": "- 학습 데이터의 편향과 빈틈을 그대로 반영합니다. 출처는 위 표에 있습니다.",
        "limit_languages": "- 한국어와 영어만을 목표로 학습했습니다.",
        "limit_safety": "- 계보에 나타난 것 외의 안전성 학습은 하지 않았습니다. 서비스에 쓰기 전에 별도의 안전장치를 두십시오.",
    },
}
CARD_LANGUAGES = ("en", "ko")  # the order of the halves in README.md


def _frontier_line(ev: dict[str, Any], t: dict[str, str]) -> str:
    s = ev.get("summary") or {}
    mean = s.get("mean_percent_of_frontier")
    if mean is None:
        return t["no_frontier"]
    return t["frontier"].format(n=s.get("benchmarks_with_anchor"), mean=mean, gap=100 - mean)


def _metadata(g: dict[str, Any]) -> str:
    tags = ["kfoundry", "llama", "korean", "from-scratch" if g["origin"] == "init" else
            "derived-from-external-weights" if g["origin"] == "external" else "provenance-incomplete"]
    datasets = sorted({s["path"] for d in g["data"] for s in (d.get("sources") or [])
                       if s.get("kind") == "hf" and s.get("path")})
    meta: dict[str, Any] = {"language": ["ko", "en"], "library_name": "transformers",
                            "pipeline_tag": "text-generation", "license": "unknown", "tags": tags}
    if datasets:
        meta["datasets"] = datasets
    ext = g.get("external") or {}
    if ext.get("name_or_path"):
        meta["base_model"] = ext["name_or_path"]
    meta["kfoundry"] = {"weights_sha256": g["weights_sha256"], "origin": g["origin"],
                        "ledger_heads": list(g["ledger_heads"].values()), "ledger_intact": g["chain_ok"]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _origin_sentence(g: dict[str, Any], t: dict[str, str]) -> str:
    if g["origin"] == "init":
        return t["origin_init"]
    if g["origin"] == "external":
        ext = g.get("external") or {}
        return t["origin_external"].format(name=ext.get("name_or_path") or ext.get("path"))
    return t["origin_unknown"]


def _render_half(g: dict[str, Any], t: dict[str, str]) -> list[str]:
    """The card's lines in one language: `t` is that language's CARD_TEXT table."""
    cfg = g["config"]
    origin = _origin_sentence(g, t)
    ev = g["evaluations"][0] if g["evaluations"] else None
    heads = "\n".join(f"- `{Path(rd).name}/ledger.jsonl`: `{h}`" for rd, h in g["ledger_heads"].items()) or "- —"
    status = t["chain_ok"] if g["chain_ok"] else t["chain_broken"].format(problems="; ".join(g["chain_problems"]))

    lines = [t["title"].format(name=g["name"]), "",
             t["intro"].format(params=g["params"], n_layers=cfg.n_layers, dim=cfg.dim, n_heads=cfg.n_heads,
                               n_kv_heads=cfg.n_kv_heads, ctx=cfg.max_seq_len, vocab=cfg.vocab_size, origin=origin), "",
             t["use_heading"], "",
             t["use_chat"] if g.get("stage") in CHAT_STAGES else t["use_base"],
             t["not_for"], "",
             t["data_heading"], "",
             t["data_columns"], "|---|---|---|---|",
             *(_sources_rows(g["data"], t["licence_unknown"]) or [t["data_none"]]), ""]
    for d in g["data"]:
        cur = d.get("curation")
        if cur:
            lines.append(t["curated"].format(recipe=_recipe_name(cur.get("recipe")),
                                             card=cur.get("data_card_sha256", "")[:16]))
        sh = d.get("shards") or {}
        lines.append(t["shards"].format(tokens=_num(sh.get("tokens")), docs=_num(sh.get("docs")),
                                        files=len(sh.get("files") or {})))
    lines += ["", t["compute_heading"], "",
              t["compute_columns"], "|---|---|---|---|---|---|",
              *(_compute_rows(g["compute"]) or [t["compute_none"]]), "",
              t["flops_note"], "",
              t["eval_heading"], ""]
    if ev:
        lines += [t["eval_columns"], "|---|---|---|---|", *_eval_rows(ev), "", _frontier_line(ev, t), ""]
    else:
        lines += [t["not_evaluated"], ""]
    lines += [t["provenance_heading"], "", origin, "",
              t["weights"].format(sha=g["weights_sha256"]), "",
              t["lineage"], "", "```text", *(format_lineage(g["lineage"]) or ["(nothing recorded)"]), "```", "",
              t["chain"].format(status=status), "", heads, "",
              t["check"], "",
              t["limits_heading"], "",
              t["limit_small"] if g["params"] < 1_000_000_000 else t["limit_large"],
              t["limit_data"], t["limit_languages"], t["limit_safety"], ""]
    return lines


def render(g: dict[str, Any]) -> str:
    """The README.md text for gathered facts `g`: the metadata, then the card in each language, split by rules."""
    halves = [_render_half(g, CARD_TEXT[lang]) for lang in CARD_LANGUAGES]
    lines = halves[0]
    for half in halves[1:]:
        lines += ["---", "", *half]
    return _metadata(g) + "\n" + "\n".join(lines)


def model_card(ckpt: str | Path) -> str:
    return render(gather(ckpt))


def write_model_card(ckpt: str | Path, out_dir: str | Path, name: str = "README.md") -> Path:
    """Write the card into `out_dir` (an export directory, or anywhere next to a checkpoint)."""
    path = Path(out_dir) / name
    atomic_write_text(path, model_card(ckpt))
    return path
