"""The eval report: `eval.json` for machines, `eval.md` and `eval.html` for people, `eval.png` for a glance.

Per task it shows the raw score with its standard error, the chance-corrected score, the frontier anchor it is
compared with, the percentage of that anchor, the raw points still missing to the 95 % target, the contamination
check, and a warning whenever the run's protocol (shots, chat or base, metric) differs from the anchor's. The
numbers come from lm-eval's results dict and frontier.py; nothing here measures anything.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from kfoundry.eval import frontier as fr
from kfoundry.fileio import atomic_write_json, atomic_write_text


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _split(config: dict[str, Any]) -> str:
    """The split lm-eval evaluated: test when the task has one, else validation."""
    if config.get("test_split"):
        return str(config["test_split"])
    return str(config.get("validation_split") or "?")


def build_rows(results: dict[str, Any], table: fr.FrontierTable, *, mode: str = "base") -> list[dict[str, Any]]:
    """One row per task and group of an lm-eval results dict, with the frontier arithmetic filled in."""
    res = results.get("results", {})
    groups = results.get("group_subtasks", {})
    n_shot = results.get("n-shot", {})
    n_samples = results.get("n-samples", {})
    configs = results.get("configs", {})
    rows = []
    for task, metrics in res.items():
        bench = table.for_task(task)
        subtasks = groups.get(task, [])
        available = sorted({k.split(",")[0] for k in metrics if "," in k and "_stderr" not in k})
        metric = bench.metric if bench and bench.metric in available else ("acc" if "acc" in available else
                                                                         (available[0] if available else None))
        if metric is None:
            continue
        key = next(k for k in metrics if k.split(",")[0] == metric)
        score = _num(metrics.get(key))
        stderr = _num(metrics.get(key.replace(metric, f"{metric}_stderr", 1)))
        if subtasks:
            n = sum(int(n_samples.get(t, {}).get("effective", 0)) for t in subtasks)
            splits = sorted({_split(configs.get(t, {})) for t in subtasks if t in configs})
            shots = n_shot.get(task, n_shot.get(subtasks[0]) if subtasks else None)
        else:
            n = int(n_samples.get(task, {}).get("effective", 0))
            splits = [_split(configs.get(task, {}))]
            shots = n_shot.get(task)
        row: dict[str, Any] = {
            "task": task, "group": bool(subtasks), "subtasks": list(subtasks), "metric": metric, "score": score,
            "stderr": stderr, "n": n, "shots": shots, "split": "/".join(splits), "mode": mode,
            "other_metrics": {k.split(",")[0]: _num(v) for k, v in metrics.items()
                              if "," in k and "_stderr" not in k and k != key and _num(v) is not None},
            "benchmark": bench.key if bench else None, "title": bench.title if bench else task,
            "chance": bench.chance if bench else None, "chance_corrected": None, "anchor": None,
            "percent_of_frontier": None, "target": None, "distance_to_target": None, "warnings": [],
        }
        if bench is not None and score is not None:
            row["chance_corrected"] = fr.chance_corrected(score, bench.chance)
            anchor = bench.anchor()
            if anchor is not None:
                row["anchor"] = {"model": anchor.model, "score": anchor.score, "source": anchor.source,
                                 "date": anchor.date, "verified": anchor.verified, "protocol": anchor.protocol}
                row["percent_of_frontier"] = fr.percent_of_frontier(score, anchor.score, bench.chance)
                row["target"] = fr.target_score(anchor.score, bench.chance, table.target_fraction)
                row["distance_to_target"] = fr.distance_to_target(score, anchor.score, bench.chance,
                                                                  table.target_fraction)
                diffs = fr.protocol_differences({"shots": shots, "mode": mode, "metric": metric}, anchor)
                if diffs:
                    row["warnings"].append("protocol differs from the anchor's: " + "; ".join(diffs))
                if not anchor.verified:
                    row["warnings"].append(f"the anchor figure ({anchor.model}) is unverified: {anchor.source}")
        if "dev" in (configs.get(task, {}).get("metadata") or {}).get("split", "") or (
                subtasks and any("dev" == (configs.get(t, {}).get("metadata") or {}).get("split") for t in subtasks)):
            row["warnings"].append("scored on the dev split (offline pack); published KoBEST figures use test")
        rows.append(row)
    _group_chance(rows)
    return rows


def _group_chance(rows: list[dict[str, Any]]) -> None:
    """A group without its own table entry (e.g. `kobest`) averages its subtasks by size, so its chance level is
    the same size-weighted average of theirs; with it the group gets a chance-corrected score too."""
    by_task = {r["task"]: r for r in rows}
    for r in rows:
        kids = [by_task.get(t) for t in r["subtasks"]]
        if not r["group"] or r["chance"] is not None or r["score"] is None or not kids:
            continue
        if any(k is None or k["chance"] is None or k["metric"] != r["metric"] or not k["n"] for k in kids):
            continue
        r["chance"] = fr.weighted_mean([k["chance"] for k in kids], [k["n"] for k in kids])
        r["chance_corrected"] = fr.chance_corrected(r["score"], r["chance"])


def summarize(rows: list[dict[str, Any]], target_fraction: float) -> dict[str, Any]:
    """Macro average over the benchmarks that have a frontier anchor (each benchmark counts once)."""
    anchored = [r for r in rows if r["percent_of_frontier"] is not None]
    out: dict[str, Any] = {"benchmarks_with_anchor": len(anchored), "target_percent": 100 * target_fraction}
    if anchored:
        out["mean_percent_of_frontier"] = fr.macro_mean([r["percent_of_frontier"] for r in anchored])
        out["benchmarks_at_target"] = sum(1 for r in anchored if r["distance_to_target"] <= 0)
    return out


# ------------------------------------------------------------------------------------------------- writing


def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _fmt_score(row: dict[str, Any]) -> str:
    if row["score"] is None:
        return "–"
    se = f" ± {100 * row['stderr']:.1f}" if row["stderr"] is not None else ""
    return f"{100 * row['score']:.1f}{se}"


def _contamination_cell(c: dict[str, Any] | None) -> str:
    if not c:
        return "not checked"
    return f"{c['documents_flagged']}/{c['documents']} docs ({100 * c['ngram_overlap']:.1f}% of {c['n']}-grams)"


def table_rows(payload: dict[str, Any]) -> list[list[str]]:
    """The main results table as text cells (shared by markdown and HTML)."""
    contamination = payload.get("contamination", {}).get("tasks", {})
    out = []
    for r in payload["tasks"]:
        a = r["anchor"]
        out.append([
            ("↳ " if not r["group"] and any(r["task"] in g["subtasks"] for g in payload["tasks"]) else "") + r["task"],
            r["metric"], _fmt_score(r), str(r["n"]), str(r["shots"]), _pct(r["chance"], 0),
            _pct(r["chance_corrected"]),
            "–" if a is None else f"{a['model']} {100 * a['score']:.1f}{'' if a['verified'] else '*'}",
            "–" if r["percent_of_frontier"] is None else f"{r['percent_of_frontier']:.1f}%",
            _pct(r["target"]),
            "–" if r["distance_to_target"] is None else f"{100 * r['distance_to_target']:+.1f}",
            _contamination_cell(contamination.get(r["task"])),
        ])
    return out


HEADER = ["task", "metric", "score ± se", "n", "shots", "chance", "chance-corr.", "frontier anchor",
          "% of frontier", "95% target", "to go (pts)", "contamination"]


def render_markdown(payload: dict[str, Any], png_name: str | None) -> str:
    p = payload["protocol"]
    lines = [f"# Evaluation: `{payload['model']}`", "",
             f"{payload['created']} · backend `{payload['backend']}` · lm-eval {payload.get('lm_eval_version', '?')}",
             "", "## Protocol", "",
             f"- shots: {p['num_fewshot'] if p['num_fewshot'] is not None else 'task default'}; mode: {p['mode']}; "
             f"limit: {p['limit'] or 'none'} documents per task",
             f"- tasks: {', '.join(p['tasks'])}"
             + (f" (offline pack from `{p['task_dir']}`)" if p.get("task_dir") else ""),
             "- scores in percent; chance-corrected = (score − chance) / (100 − chance); % of frontier compares "
             "chance-corrected scores; the target is 95 % of the anchor on that scale; * = anchor not verified "
             "against its source", "", "## Results", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table_rows(payload)]
    s = payload["summary"]
    if s.get("benchmarks_with_anchor"):
        lines += ["", f"**Frontier gap:** {s['mean_percent_of_frontier']:.1f}% of the frontier on average over "
                      f"{s['benchmarks_with_anchor']} anchored benchmark(s); {s['benchmarks_at_target']} at the "
                      f"{s['target_percent']:.0f}% target."]
    else:
        lines += ["", "No evaluated task has a frontier anchor (see kfoundry/eval/frontier.yaml)."]
    warnings = [(r["task"], w) for r in payload["tasks"] for w in r["warnings"]] + \
               [("run", w) for w in payload.get("warnings", [])]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- **{t}**: {w}" for t, w in warnings]
    if png_name:
        lines += ["", f"![scores]({png_name})"]
    bpb = payload.get("bpb") or {}
    lines += ["", "## Bits per byte (held-out text)", ""]
    if bpb:
        lines += ["| language | bits/byte | texts | bytes | bytes/token | source |", "|---|---|---|---|---|---|"]
        for lang, b in bpb.items():
            v = "–" if b.get("bpb") is None else f"{b['bpb']:.4f}"
            bpt = f"{b['bytes_per_token']:.2f}" if b.get("bytes_per_token") else "–"
            lines.append(f"| {lang} | {v} | {b['texts']} | {b['bytes']} | {bpt} | `{b['source']}` |")
    else:
        lines.append("not measured")
    c = payload.get("contamination") or {}
    lines += ["", "## Contamination", ""]
    if c.get("tasks"):
        lines += [f"{c['n']}-token overlap with the training split of `{c['shards']}`.", "",
                  "| task | documents | flagged | n-grams | in training | overlap |", "|---|---|---|---|---|---|"]
        for task, t in c["tasks"].items():
            lines.append(f"| {task} | {t['documents']} | {t['documents_flagged']} | {t['ngrams']} | "
                         f"{t['ngrams_in_training']} | {100 * t['ngram_overlap']:.2f}% |")
    else:
        lines.append(c.get("skipped", "not checked"))
    lines += ["", "## Frontier anchors used", ""]
    seen = set()
    for r in payload["tasks"]:
        a = r["anchor"]
        if a and (r["benchmark"], a["model"]) not in seen:
            seen.add((r["benchmark"], a["model"]))
            lines.append(f"- {r['title']}: {a['model']} {100 * a['score']:.2f} — {a['source']}"
                         f"{'' if a['verified'] else ' (unverified)'}")
    if not seen:
        lines.append("none")
    return "\n".join(lines) + "\n"


def _bpb(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def render_html(payload: dict[str, Any], png_name: str | None) -> str:
    e = html.escape
    p = payload["protocol"]
    head = "".join(f"<th>{e(h)}</th>" for h in HEADER)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table_rows(payload))
    warnings = "".join(f"<li><b>{e(r['task'])}</b>: {e(w)}</li>" for r in payload["tasks"] for w in r["warnings"])
    bpb = "".join(f"<tr><td>{e(lang)}</td><td>{_bpb(b.get('bpb'))}</td><td>{b['texts']}</td><td>{b['bytes']}</td></tr>"
                  for lang, b in (payload.get("bpb") or {}).items())
    img = f'<img src="{e(png_name)}" alt="scores">' if png_name else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kfoundry eval: {e(payload['model'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
th{{background:#f4f4f4}}img{{max-width:100%}}</style></head><body>
<h1>Evaluation: <code>{e(payload['model'])}</code></h1>
<p>{e(payload['created'])} · backend <code>{e(payload['backend'])}</code> · shots {e(str(p['num_fewshot']))} ·
mode {e(p['mode'])} · limit {e(str(p['limit']))}</p>
<table><tr>{head}</tr>{body}</table>
<p>Scores in percent. * = frontier anchor not verified against its source.</p>
{f'<h2>Warnings</h2><ul>{warnings}</ul>' if warnings else ''}
{img}
<h2>Bits per byte</h2><table><tr><th>language</th><th>bits/byte</th><th>texts</th><th>bytes</th></tr>{bpb}</table>
<pre>{e(json.dumps(payload.get('contamination', {}), ensure_ascii=False, indent=1))}</pre>
</body></html>
"""


def plot(payload: dict[str, Any], out_png: Path) -> Path | None:
    """Horizontal bars of raw scores (± se) per task, with chance, anchor and 95 % target marks."""
    rows = [r for r in payload["tasks"] if r["score"] is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2), dpi=120)
    ys = list(range(len(rows)))[::-1]
    ax.barh(ys, [100 * r["score"] for r in rows], xerr=[100 * (r["stderr"] or 0) for r in rows],
            color=["#7a9cc6" if r["group"] else "#4c72b0" for r in rows], capsize=3)
    for y, r in zip(ys, rows):
        if r["chance"] is not None:
            ax.plot([100 * r["chance"]] * 2, [y - 0.4, y + 0.4], color="grey", lw=2)
        if r["anchor"]:
            ax.plot(100 * r["anchor"]["score"], y, marker="*", color="#c44e52", ms=10)
            ax.plot(100 * r["target"], y, marker="|", color="#c44e52", ms=14, mew=2)
    ax.set_yticks(ys, [r["task"] for r in rows])
    ax.set_xlim(0, 100)
    ax.set_xlabel("score (%)   grey: chance   ★: frontier anchor   |: 95% target")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def write_report(out: str | Path, payload: dict[str, Any]) -> dict[str, Path]:
    """Write OUT.json (OUT may be given with or without .json), OUT.md, OUT.html and OUT.png side by side."""
    out = Path(out)
    base = out.with_suffix("") if out.suffix in (".json", ".md", ".html") else out
    base.parent.mkdir(parents=True, exist_ok=True)
    png = plot(payload, base.with_suffix(".png"))
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"), "html": base.with_suffix(".html")}
    if png:
        paths["png"] = png
    payload = {**payload, "files": {k: str(v) for k, v in paths.items()}}
    atomic_write_json(paths["json"], payload)
    atomic_write_text(paths["md"], render_markdown(payload, png.name if png else None))
    atomic_write_text(paths["html"], render_html(payload, png.name if png else None))
    return paths
