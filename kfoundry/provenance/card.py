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

import yaml

from kfoundry.fileio import read_json
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
    import torch

    from kfoundry.checkpoint import load_config, read_meta
    from kfoundry.model.llama import Transformer

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


def _frontier_line(ev: dict[str, Any], ko: bool) -> str:
    s = ev.get("summary") or {}
    mean = s.get("mean_percent_of_frontier")
    if mean is None:
        return ("프런티어 기준점이 있는 벤치마크가 없어 격차를 계산하지 않았습니다." if ko else
                "No benchmark with a frontier anchor was run, so no frontier gap is computed.")
    n = s.get("benchmarks_with_anchor")
    if ko:
        return (f"기준점이 있는 벤치마크 {n}개 평균으로 프런티어 모델 점수의 {mean:.1f}% (찬스 보정) 수준이며, "
                f"격차는 {100 - mean:.1f}%p입니다.")
    return (f"On {n} benchmark(s) with a frontier anchor the model reaches {mean:.1f}% of the frontier score "
            f"(chance-corrected): a gap of {100 - mean:.1f} points.")


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


def _origin_sentence(g: dict[str, Any], ko: bool) -> str:
    if g["origin"] == "init":
        return ("무작위 초기화에서 시작해 처음부터 학습했습니다. 외부 가중치는 계보 어디에도 없습니다." if ko else
                "Trained from random initialisation: no external weights appear anywhere in its lineage.")
    if g["origin"] == "external":
        name = (g.get("external") or {}).get("name_or_path") or (g.get("external") or {}).get("path")
        return (f"외부 가중치({name})에서 파생된 모델입니다. 처음부터 학습한 모델이 아닙니다." if ko else
                f"Derived from external weights ({name}); this is not a from-scratch model.")
    return ("계보의 시작점이 기록되어 있지 않습니다(원장 이전에 만들어진 체크포인트). 처음부터 학습했다고 "
            "주장할 근거가 없습니다." if ko else
            "The origin of its lineage is not recorded (a checkpoint made before the ledger existed); no claim "
            "of from-scratch training can be backed.")


def render(g: dict[str, Any]) -> str:
    """The README.md text for gathered facts `g`."""
    cfg = g["config"]
    chat = g.get("stage") in CHAT_STAGES
    shape = (f"{cfg.n_layers} layers, hidden size {cfg.dim}, {cfg.n_heads} attention heads "
             f"({cfg.n_kv_heads} key/value), context {cfg.max_seq_len}, vocabulary {cfg.vocab_size}")
    lineage_lines = format_lineage(g["lineage"]) or ["(nothing recorded)"]
    ev = g["evaluations"][0] if g["evaluations"] else None
    heads = "\n".join(f"- `{Path(rd).name}/ledger.jsonl`: `{h}`" for rd, h in g["ledger_heads"].items()) or "- —"
    small = g["params"] < 1_000_000_000

    en = [f"# {g['name']}", "",
          f"A {g['params']:,}-parameter Llama-style decoder ({shape}) built with "
          f"kfoundry, a Korean-first foundry. {_origin_sentence(g, False)}", "",
          "## Intended use", "",
          ("A chat model: prompts should use the chat template shipped in `tokenizer_config.json` "
           "(`tokenizer.apply_chat_template`)." if chat else
           "A base (pretrained) language model: it continues text and is meant for research, teaching, and as a "
           "starting point for fine-tuning. It is not instruction-tuned."),
          "Not intended for decisions about people, medical, legal or financial advice, or any use where an "
          "unverified answer can cause harm.", "",
          "## Training data", "",
          "| source | kind | licence | mix weight |", "|---|---|---|---|",
          *(_sources_rows(g["data"], "not declared — check before redistributing") or ["| not recorded | | | |"]), ""]
    for d in g["data"]:
        cur = d.get("curation")
        if cur:
            en.append(f"Curated with `kfoundry data prepare` (recipe: `{_recipe_name(cur.get('recipe'))}`"
                      f"; data card sha256 `{cur.get('data_card_sha256', '')[:16]}`).")
        sh = d.get("shards") or {}
        en.append(f"Token shards: {_num(sh.get('tokens'))} tokens in {_num(sh.get('docs'))} documents, "
                  f"{len(sh.get('files') or {})} files, each hashed in the ledger.")
    en += ["", "## Training compute", "",
           "| stage | tokens | steps | FLOPs | hardware | seconds |", "|---|---|---|---|---|---|",
           *(_compute_rows(g["compute"]) or ["| not recorded | | | | | |"]), "",
           "FLOPs are measured FLOPs per token (6 per weight plus attention) times tokens seen.", "",
           "## Evaluation", ""]
    if ev:
        en += ["| task | metric | score (%) | % of frontier |", "|---|---|---|---|", *_eval_rows(ev), "",
               _frontier_line(ev, False), ""]
    else:
        en += ["Not evaluated yet: run `kfoundry eval --model CKPT --tasks ...` before publishing.", ""]
    en += ["## Provenance", "", _origin_sentence(g, False), "",
           f"Weights sha256: `{g['weights_sha256']}`", "",
           "Lineage (origin first):", "", "```text", *lineage_lines, "```", "",
           f"Ledger chain: {'intact' if g['chain_ok'] else 'BROKEN: ' + '; '.join(g['chain_problems'])}. "
           "Head hashes (publishing them pins the whole history before them):", "", heads, "",
           "Check it yourself: `kfoundry provenance verify CHECKPOINT` re-hashes every recorded file and "
           "re-derives the initial weights from the recorded seed; `kfoundry provenance audit --model THIS "
           "--against OTHER` compares weight fingerprints with any other model.", "",
           "## Limitations", "",
           ("- A small model: it produces fluent-looking text with frequent factual errors and little reasoning."
            if small else "- It can state false things fluently; verify important answers."),
           "- It reflects its training data, including its biases and gaps; the sources are listed above.",
           "- Korean and English only; other languages were not a training goal.",
           "- No safety tuning beyond what the lineage shows; add your own safeguards before deploying.", ""]

    ko = ["---", "", f"# {g['name']} (한국어)", "",
          f"kfoundry로 만든 라마(Llama) 구조의 디코더 모델로, 파라미터는 {g['params']:,}개입니다 "
          f"(레이어 {cfg.n_layers}개, 은닉 차원 {cfg.dim}, 어텐션 헤드 {cfg.n_heads}개(키/값 {cfg.n_kv_heads}개), "
          f"문맥 길이 {cfg.max_seq_len}, 어휘 {cfg.vocab_size}개). {_origin_sentence(g, True)}", "",
          "## 사용 목적", "",
          ("대화형 모델입니다. 프롬프트는 `tokenizer_config.json`에 들어 있는 채팅 템플릿"
           "(`tokenizer.apply_chat_template`)으로 구성해야 합니다." if chat else
           "사전학습만 마친 기반(base) 언어 모델입니다. 주어진 글을 이어 쓰며, 연구와 교육, 그리고 미세조정의 출발점으로 "
           "쓰기 위한 모델입니다. 지시 따르기 학습은 하지 않았습니다."),
          "사람에 대한 판단, 의료·법률·금융 조언처럼 검증되지 않은 답이 피해를 줄 수 있는 용도에는 쓰지 마십시오.", "",
          "## 학습 데이터", "",
          "| 출처 | 종류 | 라이선스 | 혼합 비율 |", "|---|---|---|---|",
          *(_sources_rows(g["data"], "명시되지 않음 — 재배포 전 확인 필요") or ["| 기록 없음 | | | |"]), ""]
    for d in g["data"]:
        cur = d.get("curation")
        if cur:
            ko.append(f"`kfoundry data prepare`로 정제했습니다(레시피: `{_recipe_name(cur.get('recipe'))}`, "
                      f"데이터 카드 sha256 `{cur.get('data_card_sha256', '')[:16]}`).")
        sh = d.get("shards") or {}
        ko.append(f"토큰 샤드: 문서 {_num(sh.get('docs'))}개, 토큰 {_num(sh.get('tokens'))}개, 파일 "
                  f"{len(sh.get('files') or {})}개이며 파일마다 해시가 원장에 기록되어 있습니다.")
    ko += ["", "## 학습 연산량", "",
           "| 단계 | 토큰 | 스텝 | FLOPs | 하드웨어 | 시간(초) |", "|---|---|---|---|---|---|",
           *(_compute_rows(g["compute"]) or ["| 기록 없음 | | | | | |"]), "",
           "FLOPs는 토큰당 실측 연산량(가중치당 6회 + 어텐션)에 학습한 토큰 수를 곱한 값입니다.", "",
           "## 평가", ""]
    if ev:
        ko += ["| 과제 | 지표 | 점수(%) | 프런티어 대비(%) |", "|---|---|---|---|", *_eval_rows(ev), "",
               _frontier_line(ev, True), ""]
    else:
        ko += ["아직 평가하지 않았습니다. 공개하기 전에 `kfoundry eval --model CKPT --tasks ...`를 실행하십시오.", ""]
    ko += ["## 출처 증명(프로비넌스)", "", _origin_sentence(g, True), "",
           f"가중치 sha256: `{g['weights_sha256']}`", "",
           "계보(시작점부터):", "", "```text", *lineage_lines, "```", "",
           f"원장 해시 체인: {'이상 없음' if g['chain_ok'] else '손상됨: ' + '; '.join(g['chain_problems'])}. "
           "아래 마지막(head) 해시를 공개해 두면 그 이전의 기록 전체가 고정됩니다.", "", heads, "",
           "직접 확인하는 방법: `kfoundry provenance verify 체크포인트`는 기록된 모든 파일의 해시를 다시 계산하고, "
           "기록된 시드로 초기 가중치를 다시 만들어 비교합니다. `kfoundry provenance audit --model 이_모델 "
           "--against 다른_모델`은 임의의 다른 모델과 가중치 지문을 비교합니다.", "",
           "## 한계", "",
           ("- 작은 모델입니다. 그럴듯한 문장을 만들지만 사실 오류가 잦고 추론 능력은 거의 없습니다." if small else
            "- 틀린 내용을 자연스럽게 말할 수 있습니다. 중요한 답은 반드시 확인하십시오."),
           "- 학습 데이터의 편향과 빈틈을 그대로 반영합니다. 출처는 위 표에 있습니다.",
           "- 한국어와 영어만을 목표로 학습했습니다.",
           "- 계보에 나타난 것 외의 안전성 학습은 하지 않았습니다. 서비스에 쓰기 전에 별도의 안전장치를 두십시오.", ""]
    return _metadata(g) + "\n" + "\n".join(en + ko)


def model_card(ckpt: str | Path) -> str:
    return render(gather(ckpt))


def write_model_card(ckpt: str | Path, out_dir: str | Path, name: str = "README.md") -> Path:
    """Write the card into `out_dir` (an export directory, or anywhere next to a checkpoint)."""
    from kfoundry.fileio import atomic_write_text

    path = Path(out_dir) / name
    atomic_write_text(path, model_card(ckpt))
    return path
